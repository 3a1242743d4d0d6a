"""Read task files in the O-LoRA JSON format.

A data directory holds ``<dir>/{train,dev,test}/<task>.json``; each file is a JSON array of
objects with string fields ``id``, ``input`` and ``output`` (the AIMMerging reference names its
files ``<task>_T5.json``; both spellings are accepted). ``input`` is the whole prompt (instruction,
options, text, ending in ``Answer:``) and ``output`` the gold answer.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import FileRefused, read_bounded

SPLITS = ("train", "dev", "test")
RUN_SPLITS = ("train", "test")  # read by every run (dev only with model selection or --eval-split dev)
REQUIRED_FIELDS = ("id", "input", "output")
# The largest data file read (bytes): task files are read whole into memory, and a file past this
# (or a device like /dev/zero, or a FIFO) is refused with one line instead of exhausting memory.
DATA_FILE_LIMIT = 2 * 2**30


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8: JSON may spell a lone surrogate (``"\\ud800"``),
    which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_data_text(path: Path) -> str:
    """The UTF-8 text of a data file (at most :data:`DATA_FILE_LIMIT` bytes, a regular file);
    OSError and UnicodeDecodeError pass through, a refused file is a DataError naming it."""
    try:
        return read_bounded(path, DATA_FILE_LIMIT).decode("utf-8")
    except FileRefused as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def parse_json(text: str, path: Path, where: str = "") -> object:
    """``json.loads`` whose nesting past Python's recursion limit is a DataError naming the file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: {where}malformed JSON: nested too deeply") from None


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    output: str
    task: str
    # ``input`` is already a chat template's rendering (a conversation's turns and the generation
    # prompt): it is tokenized verbatim, never wrapped in another user turn (data.formatting)
    templated: bool = False


def task_file(data_dir: str | Path, split: str, task: str) -> Path | None:
    """The file holding ``split`` of ``task``, or None when there is none.

    Both spellings side by side (``t.json`` and ``t_T5.json``) is a DataError: picking one would
    silently train or score on data the user may not have meant (often an old copy)."""
    found = [Path(data_dir) / split / name for name in (f"{task}.json", f"{task}_T5.json")]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{found[0]} and {found[1]}: two files for {split} of task '{task}'; "
                        "keep one of them")
    return found[0] if found else None


def list_tasks(data_dir: str | Path) -> list[str]:
    """Task names found in any split folder, sorted."""
    names: set[str] = set()
    for split in SPLITS:
        folder = Path(data_dir) / split
        if folder.is_dir():
            names.update(p.stem.removesuffix("_T5") for p in folder.glob("*.json"))
    return sorted(names)


def check_records(records: object, path: Path) -> list[str]:
    """Every problem with the parsed content of one task file, each as one line naming the file."""
    if not isinstance(records, list):
        return [f"{path}: expected a JSON array of objects, found {type(records).__name__}"]
    if not records:
        return [f"{path}: the task file is empty (no examples)"]
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"{path}: item {i}: expected an object, found {type(rec).__name__}")
            continue
        for field in REQUIRED_FIELDS:
            if field not in rec:
                problems.append(f"{path}: item {i}: missing field '{field}'")
            elif not isinstance(rec[field], str):
                problems.append(f"{path}: item {i}: field '{field}' is not a string")
            elif not is_unicode_text(rec[field]):
                problems.append(f"{path}: item {i}: field '{field}' is not valid Unicode text (a lone surrogate)")
        if isinstance(rec.get("input"), str) and not rec["input"].strip():
            problems.append(f"{path}: item {i}: field 'input' is empty")
        rid = rec.get("id")
        if isinstance(rid, str):
            if rid in seen:
                problems.append(f"{path}: item {i}: duplicate id '{rid}' (first at item {seen[rid]})")
            else:
                seen[rid] = i
    return problems


def parse_task_file(path: Path) -> tuple[list | None, list[str]]:
    """(records, problems): the raw JSON content and every problem found in it."""
    try:
        records = parse_json(read_data_text(path), path)
    except json.JSONDecodeError as e:
        return None, [f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"]
    except UnicodeDecodeError as e:
        return None, [f"{path}: not UTF-8 text: {e.reason}"]
    except OSError as e:
        return None, [f"{path}: cannot read: {e.strerror}"]
    except DataError as e:  # not a regular file, too large, nested too deeply
        return None, [str(e)]
    return records, check_records(records, path)


def read_task(data_dir: str | Path, split: str, task: str) -> list[Example]:
    """All examples of one split of one task; raises DataError naming the file on any problem."""
    path = task_file(data_dir, split, task)
    if path is None:
        available = list_tasks(data_dir)
        hint = f" (tasks found: {', '.join(available)})" if available else ""
        raise DataError(f"no {split} file for task '{task}' in {data_dir}/{split}/{hint}")
    records, problems = parse_task_file(path)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `aimmerging data validate {data_dir}`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return [Example(id=r["id"], input=r["input"], output=r["output"], task=task) for r in records]


@dataclass
class SplitReport:
    count: int
    labels: Counter


def validate_dir(data_dir: str | Path) -> tuple[dict[str, dict[str, SplitReport]], list[str], list[str]]:
    """Check a whole data directory.

    Returns (report, errors, warnings): per task and split the example count and label counts,
    the problems that make a file unusable or a task unrunnable (a file missing from a split every
    run reads: train and test), and oddities worth knowing (no dev file, which only model selection
    reads; a label in dev/test never seen in train).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return {}, [f"{data_dir}: not a directory"], []
    tasks = list_tasks(data_dir)
    if not tasks:
        return {}, [f"{data_dir}: no task files found (expected {data_dir}/train/<task>.json)"], []
    report: dict[str, dict[str, SplitReport]] = {}
    errors: list[str] = []
    warnings: list[str] = []
    for task in tasks:
        report[task] = {}
        for split in SPLITS:
            try:
                path = task_file(data_dir, split, task)
            except DataError as e:
                errors.append(str(e))
                continue
            if path is None:
                (errors if split in RUN_SPLITS else warnings).append(f"{task}: no {split} file")
                continue
            records, problems = parse_task_file(path)
            errors.extend(problems)
            if records is None or not isinstance(records, list):
                continue
            labels = Counter(r["output"] for r in records if isinstance(r, dict) and isinstance(r.get("output"), str)
                             and is_unicode_text(r["output"]))  # printable: a lone surrogate is an error above
            report[task][split] = SplitReport(count=len(records), labels=labels)
        train = report[task].get("train")
        for split in ("dev", "test"):
            other = report[task].get(split)
            if train and other and 0 < len(train.labels) <= 50:
                unseen = sorted(set(other.labels) - set(train.labels))
                if unseen:
                    warnings.append(f"{task}: {split} labels never seen in train: {', '.join(map(repr, unseen))}")
    return report, errors, warnings
