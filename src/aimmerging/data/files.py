"""Task data from common file formats, and task streams described by a YAML file.

Readers (each returns ``list[Example]``; :func:`read_examples` picks one from the file name):

==================  ==========================================================================
format              what it reads
==================  ==========================================================================
``jsonl``           ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines skipped)
``json``            ``.json``: a JSON array of objects
``csv``             ``.csv``: a header row, then one row per example (UTF-8)
``parquet``         ``.parquet`` / ``.pq`` (read with ``pyarrow``, which ``datasets`` installs)
``saved``           a directory written by ``datasets.Dataset.save_to_disk`` (a saved
                    ``DatasetDict`` too: its split is chosen with ``split=``)
==================  ==========================================================================

**Columns.** Each row is one example: its prompt is the ``input_field`` column (default
``"input"``) and its answer the ``output_field`` column (default ``"output"``); both must be
strings (an integer answer, e.g. a class id in a Parquet file, is turned into its decimal text);
``id`` is kept when present, otherwise ``<task>-<row>``. Other columns are ignored.

**Chat data.** A row without the ``input_field`` column but with a ``messages`` column (a list
of ``{"role", "content"}``, or that list as a JSON string, as a CSV file holds it) is a
conversation: the **last assistant turn is the answer** and every turn before it the prompt. A
conversation with no assistant turn, or with turns after the last assistant turn, is an error.
The prompt is rendered

* with the tokenizer's chat template when ``tokenizer=`` is given and has one
  (``apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)``), so the
  ``input`` of the example is exactly the text the model sees before its answer; the example is
  marked ``templated``: in either prompt format it is tokenized verbatim (never wrapped in a
  second user turn by ``--prompt-format chat``) and its answer follows with no space;
* otherwise as plain text, one ``role: content`` line per turn and a final ``assistant:`` line::

      system: You are terse.
      user: Which code does table A give to tiger?
      assistant:

  (the plain format then trains on ``" " + answer``, as after any prompt ending in ``:``).

**CSV.** Quoted fields keep their newlines (``"Product: desk lamp\nCategory code:"`` is a
two-line prompt); a UTF-8 byte-order mark before the header is dropped.

**Task-stream files.** :func:`load_stream_file` reads a YAML file naming the tasks of a stream,
in order, and the file of every split (``train`` is required; ``test`` and ``dev`` are optional
and only needed by a run that reads them)::

    input_field: question        # defaults for every task (optional)
    output_field: answer
    tasks:
      sentiment:
        train: data/sentiment/train.jsonl      # relative paths: against the YAML file's folder
        test: data/sentiment/test.jsonl
        dev: data/sentiment/dev.jsonl
      topic:
        train: data/topic.parquet
        test: data/topic_test.csv
        input_field: text                      # per task: input_field, output_field, format
        format: parquet                        # only when the file name does not say it

Precedence of the column names: the task's own keys, then the file's top-level keys, then the
``input_field`` / ``output_field`` arguments of :func:`load_stream_file`, then ``input`` /
``output``. ``format`` overrides the extension the same way.

Every problem (missing or unreadable file, unknown extension, empty file, missing column, a
conversation without an assistant turn, a bad stream file) is a :class:`~aimmerging.errors.DataError`
whose one-line message names the file. So are hostile files: a device, FIFO or socket, a file over
:data:`~aimmerging.data.olora.DATA_FILE_LIMIT` (2 GiB; a stream YAML file: 1 MiB), JSON nested past
Python's recursion limit, a CSV file with a NUL byte, text that is not valid Unicode (a lone
surrogate such as ``"\\ud800"``, which JSON can spell), and a task named twice in a stream file
(a duplicate key, or keys ``1`` and ``'1'``: both are task ``"1"``). ``datasets`` and ``pyarrow``
are optional: they are imported only to read saved datasets and Parquet files, with a one-line
error when missing.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..errors import ConfigError, DataError
from .olora import DATA_FILE_LIMIT, SPLITS, Example, is_unicode_text, parse_json, read_data_text
from .stream import TaskStream

FORMATS = ("jsonl", "json", "csv", "parquet", "saved")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
              ".pq": "parquet"}
MESSAGES_FIELD = "messages"
ASSISTANT = "assistant"
INSTALL_HINT = "pip install 'aimmerging[hf]'"
STREAM_KEYS = ("tasks", "input_field", "output_field", "format")
TASK_KEYS = ("train", "test", "dev", "input_field", "output_field", "format")

Tokenizer = Any  # a transformers tokenizer, or a zero-argument callable returning one (loaded when needed)


# -- raw rows ------------------------------------------------------------------------------------------

def detect_format(path: str | os.PathLike, format: Optional[str] = None) -> str:
    """The reader for ``path``: ``format`` when given, ``saved`` for a directory, else from the extension."""
    path = Path(path)
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"{path}: unknown format '{format}' (formats: {', '.join(FORMATS)})")
        return format
    if path.is_dir():
        return "saved"
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(EXTENSIONS)
        raise DataError(f"{path}: unknown file type '{path.suffix or '(no extension)'}' (expected {known} or a "
                        "directory written by datasets' save_to_disk; or set format: jsonl|json|csv|parquet|saved)")
    return fmt


def _open_text(path: Path) -> str:
    try:
        return read_data_text(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot read: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    for n, line in enumerate(_open_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_json(line, path, f"line {n}: "))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_json(path: Path) -> list:
    text = _open_text(path)
    if not text.strip():
        return []
    try:
        data = parse_json(text, path)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, found {type(data).__name__} "
                        "(one object per line is a .jsonl file)")
    return data


def _read_csv(path: Path) -> list:
    text = _open_text(path)
    if "\0" in text:  # a binary file, or a corrupt one (Python < 3.11's csv refuses it too)
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{path}: malformed CSV: line {line} contains a NUL byte (not a text file?)")
    if text.startswith("\ufeff"):  # the byte-order mark spreadsheet programs write is not part of the header
        text = text[1:]
    try:  # csv reads the line ends itself: a quoted field keeps its newlines ("a\nb" stays two lines)
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None


def _check_regular(path: Path) -> None:
    """A file read whole is a regular file of at most DATA_FILE_LIMIT bytes (DataError otherwise)."""
    if not path.is_file():
        raise DataError(f"{path}: cannot read: not a regular file (a device, FIFO or socket cannot be read as data)")
    if path.stat().st_size > DATA_FILE_LIMIT:
        raise DataError(f"{path}: cannot read: file too large ({path.stat().st_size} bytes; the limit is "
                        f"{DATA_FILE_LIMIT // 2**30} GiB)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs pyarrow ({INSTALL_HINT})") from None
    if not path.exists():
        raise DataError(f"{path}: file not found")
    _check_regular(path)
    try:
        return pq.read_table(path).to_pylist()
    except OSError as e:
        raise DataError(f"{path}: cannot read Parquet file: {_first_line(e)}") from None
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {_first_line(e)}") from None


def _read_saved(path: Path, split: Optional[str]) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs the 'datasets' package ({INSTALL_HINT})") from None
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (a dataset saved with save_to_disk is a directory)")
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json")):
        raise DataError(f"{path}: not a dataset saved with datasets' save_to_disk (no state.json or dataset_dict.json)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors ...
        raise DataError(f"{path}: cannot read the saved dataset: {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            names = ", ".join(ds) or "none"
            want = f"split '{split}'" if split else "a split (split=...)"
            raise DataError(f"{path}: a saved DatasetDict; {want} not found (splits: {names})")
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{path}: expected a saved Dataset, found {type(ds).__name__}")
    return ds.to_list()


def read_rows(path: str | os.PathLike, format: Optional[str] = None, split: Optional[str] = None) -> list:
    """The raw rows (usually dicts) of a data file in one of :data:`FORMATS`."""
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt == "saved":
        return _read_saved(path, split)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt](path)


# -- rows to examples ------------------------------------------------------------------------------------

def _resolve_tokenizer(tokenizer: Tokenizer) -> Any:
    if tokenizer is None or hasattr(tokenizer, "apply_chat_template"):
        return tokenizer
    if callable(tokenizer):  # a loader: called when the first conversation needs rendering
        return tokenizer()
    return tokenizer


def split_chat(messages: Any, where: str) -> tuple[list[dict], str]:
    """(prompt turns, answer) of a conversation: the answer is the last assistant turn, the prompt
    every turn before it. ``where`` prefixes error messages (file and row)."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{where}: '{MESSAGES_FIELD}' is a string but not a JSON list of turns") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{MESSAGES_FIELD}' must be a non-empty list of {{role, content}} turns")
    for t, turn in enumerate(messages):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: turn {t} of '{MESSAGES_FIELD}' is not a {{role, content}} pair of strings")
    last = max((t for t, turn in enumerate(messages) if turn["role"] == ASSISTANT), default=None)
    if last is None:
        raise DataError(f"{where}: '{MESSAGES_FIELD}' has no assistant turn (the last assistant turn is the answer)")
    if last != len(messages) - 1:
        raise DataError(f"{where}: '{MESSAGES_FIELD}' has turns after the last assistant turn "
                        f"(roles after it: {', '.join(m['role'] for m in messages[last + 1:])})")
    if last == 0:
        raise DataError(f"{where}: '{MESSAGES_FIELD}' has no turn before its assistant answer (an empty prompt)")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return prompt, messages[last]["content"]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders conversations with a chat template of its own."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(turns: Sequence[Mapping[str, str]], tokenizer: Any = None) -> str:
    """The prompt text of ``turns``: the tokenizer's chat template with the generation prompt when
    it has one, else one ``role: content`` line per turn and a final ``assistant:`` line."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=True)
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns) + f"\n{ASSISTANT}:"


def _text(value: Any, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field '{field}' is not a string ({type(value).__name__})")


def examples_from_rows(rows: Iterable[Any], *, source: str, task: str, input_field: str = "input",
                       output_field: str = "output", tokenizer: Tokenizer = None) -> list[Example]:
    """Examples from raw rows (dicts); ``source`` names the file in error messages. The first row
    decides the kind: plain (it has ``input_field``) or chat (it has ``messages`` instead)."""
    rows = list(rows)
    if not rows:
        raise DataError(f"{source}: no examples (the file is empty)")
    first = rows[0]
    if not isinstance(first, Mapping):
        raise DataError(f"{source}: row 0: expected an object with fields, found {type(first).__name__}")
    chat = input_field not in first and MESSAGES_FIELD in first
    if not chat:
        for field in (input_field, output_field):
            if field not in first:
                fields = ", ".join(map(str, first)) or "none"
                hint = " or a 'messages' list (chat)" if field == input_field else ""
                raise DataError(f"{source}: missing column '{field}'{hint} (columns: {fields}); "
                                f"set {'input_field' if field == input_field else 'output_field'}")
    resolved = None
    templated = False
    examples: list[Example] = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with fields, found {type(row).__name__}")
        if chat:
            if MESSAGES_FIELD not in row:
                raise DataError(f"{where}: missing column '{MESSAGES_FIELD}'")
            turns, output = split_chat(row[MESSAGES_FIELD], where)
            if resolved is None:
                resolved = _resolve_tokenizer(tokenizer)
                templated = has_chat_template(resolved)
            prompt = render_prompt(turns, resolved)
        else:
            for field in (input_field, output_field):
                if field not in row or row[field] is None:
                    raise DataError(f"{where}: missing value for column '{field}'")
            prompt = _text(row[input_field], input_field, where)
            output = _text(row[output_field], output_field, where)
        if not prompt.strip():
            raise DataError(f"{where}: the prompt ('{MESSAGES_FIELD if chat else input_field}') is empty")
        rid = row.get("id")
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else f"{task}-{i}"
        for field, text in ((MESSAGES_FIELD if chat else input_field, prompt), (output_field, output), ("id", rid)):
            if not is_unicode_text(text):
                raise DataError(f"{where}: field '{field}' is not valid Unicode text (a lone surrogate)")
        examples.append(Example(id=rid, input=prompt, output=output, task=task, templated=chat and templated))
    return examples


def stream_from_rows(data: Mapping[str, Mapping[str, Any]], *, input_field: Optional[str] = None,
                     output_field: Optional[str] = None, tokenizer: Tokenizer = None) -> TaskStream:
    """In-memory tasks ``{task: {split: rows}}`` read as ``--data`` reads files: each split a list
    of rows (plain rows with ``input_field``/``output_field`` columns, chat rows with ``messages``),
    of :class:`Example` objects, or a ``datasets.Dataset``; ``tokenizer`` (or a loader) renders
    chat prompts (module docs). What :func:`aimmerging.run` does with a mapping."""
    if not isinstance(data, Mapping) or not data:
        raise DataError("a task stream mapping needs at least one task: {task: {'train': [...], 'test': [...]}}")
    parsed: dict[str, dict[str, list[Example]]] = {}
    for name, splits in data.items():
        task = str(name)
        if not isinstance(splits, Mapping):
            raise DataError(f"task '{task}': expected a mapping of split -> examples, got {type(splits).__name__}")
        unknown = sorted(set(map(str, splits)) - set(SPLITS))
        if unknown:
            raise DataError(f"task '{task}': unknown split(s) {', '.join(unknown)} (splits: {', '.join(SPLITS)})")
        parsed[task] = {}
        for split, rows in splits.items():
            where = f"task '{task}', {split}"
            if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
                raise DataError(f"{where}: expected a list of rows ({{'input', 'output'}} or {{'messages'}} "
                                f"mappings), got {type(rows).__name__}")
            rows = list(rows)
            if not rows:
                raise DataError(f"task '{task}': the {split} split is empty")
            if all(isinstance(r, Example) for r in rows):
                parsed[task][str(split)] = rows
                continue
            parsed[task][str(split)] = examples_from_rows(
                rows, source=where, task=task, input_field=input_field or "input",
                output_field=output_field or "output", tokenizer=tokenizer)

    def reader(task: str, split: str) -> list[Example]:
        if split not in parsed[task]:
            raise DataError(f"task '{task}' has no {split} split")
        return parsed[task][split]

    return TaskStream(list(parsed), reader, "in-memory examples")


def read_examples(path: str | os.PathLike, *, task: Optional[str] = None, input_field: str = "input",
                  output_field: str = "output", format: Optional[str] = None, tokenizer: Tokenizer = None,
                  split: Optional[str] = None) -> list[Example]:
    """Every example of one data file (any of :data:`FORMATS`, chosen from the extension unless
    ``format`` is given). ``task`` (default: the file's stem) is the examples' task name; ``split``
    picks the split of a saved ``DatasetDict``; ``tokenizer`` renders chat prompts (module docs)."""
    path = Path(path)
    rows = read_rows(path, format, split)
    return examples_from_rows(rows, source=str(path), task=task or path.stem, input_field=input_field,
                              output_field=output_field, tokenizer=tokenizer)


def read_jsonl(path: str | os.PathLike, **kw: Any) -> list[Example]:
    """Examples of a JSON-lines file (keywords as :func:`read_examples`)."""
    return read_examples(path, format="jsonl", **kw)


def read_json(path: str | os.PathLike, **kw: Any) -> list[Example]:
    """Examples of a JSON file holding an array of objects (keywords as :func:`read_examples`)."""
    return read_examples(path, format="json", **kw)


def read_csv(path: str | os.PathLike, **kw: Any) -> list[Example]:
    """Examples of a CSV file with a header row (keywords as :func:`read_examples`)."""
    return read_examples(path, format="csv", **kw)


def read_parquet(path: str | os.PathLike, **kw: Any) -> list[Example]:
    """Examples of a Parquet file (keywords as :func:`read_examples`)."""
    return read_examples(path, format="parquet", **kw)


def read_saved_dataset(path: str | os.PathLike, **kw: Any) -> list[Example]:
    """Examples of a directory written by ``datasets.Dataset.save_to_disk`` (keywords as
    :func:`read_examples`; ``split=`` for a saved ``DatasetDict``)."""
    return read_examples(path, format="saved", **kw)


# -- task-stream files -------------------------------------------------------------------------------------

def _field(value: Any, key: str, where: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def load_stream_file(path: str | os.PathLike, *, input_field: Optional[str] = None,
                     output_field: Optional[str] = None, tokenizer: Tokenizer = None) -> TaskStream:
    """The :class:`TaskStream` a stream YAML file describes (format in the module docs).

    The file's structure is checked and every file it names must exist now; the data files are
    read when a split is first needed (and then cached by the stream). ``input_field`` /
    ``output_field`` are the defaults for tasks whose YAML sets neither; ``tokenizer`` (or a
    zero-argument callable returning one) renders the prompts of chat data."""
    path = Path(path)
    plans = stream_file_plan(path, input_field=input_field, output_field=output_field)
    lazy = {"tokenizer": tokenizer}

    def get_tokenizer() -> Any:  # loaded once, only when a conversation needs rendering
        lazy["tokenizer"] = _resolve_tokenizer(lazy["tokenizer"])
        return lazy["tokenizer"]

    def reader(task: str, split: str) -> list[Example]:
        plan = plans[task]
        file = plan["files"].get(split)
        if file is None:
            raise DataError(f"{path}: task '{task}' has no {split} file")
        return read_examples(file, task=task, input_field=plan["input_field"], output_field=plan["output_field"],
                             format=plan["format"], tokenizer=get_tokenizer if tokenizer is not None else None,
                             split=split)

    return TaskStream(list(plans), reader, f"stream file {path}")


def stream_file_plan(path: str | os.PathLike, *, input_field: Optional[str] = None,
                     output_field: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """What a stream YAML file names, checked (module docs), nothing read: ``{task: {"files":
    {split: path}, "format", "input_field", "output_field"}}`` in the file's task order."""
    from ..io import read_yaml_mapping

    path = Path(path)
    try:
        spec = read_yaml_mapping(path, "task-stream file")
    except ConfigError as e:
        raise DataError(str(e)) from None
    unknown = sorted(set(map(str, spec)) - set(STREAM_KEYS))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)} (keys: {', '.join(STREAM_KEYS)})")
    tasks = spec.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise DataError(f"{path}: 'tasks' must map each task name to its files, e.g. "
                        "tasks: {my-task: {train: train.jsonl, test: test.jsonl}}")
    defaults = {
        "input_field": _field(spec.get("input_field"), "input_field", str(path)) or input_field or "input",
        "output_field": _field(spec.get("output_field"), "output_field", str(path)) or output_field or "output",
        "format": _field(spec.get("format"), "format", str(path)),
    }
    if defaults["format"] is not None and defaults["format"] not in FORMATS:
        raise DataError(f"{path}: unknown format '{defaults['format']}' (formats: {', '.join(FORMATS)})")
    base = path.parent
    plans: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        task = str(name)
        where = f"{path}: task '{task}'"
        if task in plans:  # keys 1 and '1' are both task "1"
            raise DataError(f"{where} is listed twice (task names are compared as text)")
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: expected a mapping with train/test/dev files, got {type(entry).__name__}")
        bad = sorted(set(map(str, entry)) - set(TASK_KEYS))
        if bad:
            raise DataError(f"{where}: unknown key(s) {', '.join(bad)} (keys: {', '.join(TASK_KEYS)})")
        if "train" not in entry:
            raise DataError(f"{where}: no 'train' file")
        fmt = _field(entry.get("format"), "format", where) or defaults["format"]
        if fmt is not None and fmt not in FORMATS:
            raise DataError(f"{where}: unknown format '{fmt}' (formats: {', '.join(FORMATS)})")
        files: dict[str, Path] = {}
        for split in SPLITS:
            if split not in entry:
                continue
            src = entry[split]
            if not isinstance(src, str) or not src.strip():
                raise DataError(f"{where}: '{split}' must be a file path, got {src!r}")
            file = Path(os.path.expanduser(src))
            file = file if file.is_absolute() else base / file
            if not file.exists():
                raise DataError(f"{where}: {split} file {file} not found")
            if not file.is_dir() and not file.is_file():
                raise DataError(f"{where}: {split} file {file} is not a regular file (a device, FIFO or socket "
                                "cannot be read as data)")
            detect_format(file, fmt)  # an unknown extension fails now, not mid-run
            files[split] = file
        plans[task] = {"files": files, "format": fmt,
                       "input_field": _field(entry.get("input_field"), "input_field", where) or defaults["input_field"],
                       "output_field": _field(entry.get("output_field"), "output_field", where) or defaults["output_field"]}
    return plans


__all__ = ["FORMATS", "detect_format", "examples_from_rows", "has_chat_template", "load_stream_file", "read_csv",
           "read_examples", "read_json", "read_jsonl", "read_parquet", "read_rows", "read_saved_dataset",
           "render_prompt", "split_chat", "stream_file_plan", "stream_from_rows"]
