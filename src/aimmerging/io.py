"""Small file helpers. Every file is written atomically: to a temporary name in the same
directory, flushed, then renamed over the target, so a reader (or a resumed run) never sees a
half-written file."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import yaml

from .errors import ConfigError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status, which reads it without changing it;
    elsewhere it is set and restored under a lock (the only way POSIX offers to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


# The temporary name of :func:`atomic_write`: ``mkstemp`` puts 8 characters of this alphabet
# between the prefix ``.<name>.`` and the suffix ``.tmp`` (``tempfile._RandomNameSequence``).
_TEMP_PREFIX, _TEMP_SUFFIX = ".{}.", ".tmp"
_TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it over ``path``.

    ``mkstemp`` creates the file owner-only (0600); it gets the mode a plain ``open`` would have
    given it (0666 less the umask) before the rename, so results stay readable by a team. An
    ``OSError`` of the write (a full disk) names ``path`` when it names no file; a process killed
    before the rename leaves the temporary file, which :func:`remove_temp_files` recognises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX.format(path.name), suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    return path


def is_temp_file_of(candidate: str, name: str) -> bool:
    """Whether the file name ``candidate`` is a temporary file :func:`atomic_write` made for a
    file called ``name`` (``.<name>.<8 random characters>.tmp``)."""
    prefix = _TEMP_PREFIX.format(name)
    if not (candidate.startswith(prefix) and candidate.endswith(_TEMP_SUFFIX)):
        return False
    return bool(_TEMP_RANDOM.fullmatch(candidate[len(prefix):len(candidate) - len(_TEMP_SUFFIX)]))


def remove_temp_files(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` for the files
    ``names`` (a process killed between the write and the rename); returns them. Only those exact
    names are touched, never another file; the caller must own the directory (hold its lock), so
    that no writer is still using one."""
    directory, names = Path(directory), list(names)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if any(is_temp_file_of(entry.name, n) for n in names) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` written atomically with :func:`atomic_write`. It is serialised in memory
    first: ``torch.save`` to a path on a full disk raises a ``RuntimeError`` (``unexpected pos``)
    that does not say why and leaves part of a file, where a plain write raises
    ``OSError(ENOSPC)`` naming ``path``, which the CLI turns into "free some space and rerun"."""
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_safe(obj: Any) -> Any:
    """A copy of a nested dict/list/tuple structure with every non-finite float (NaN, ±inf) replaced
    by None: ``json.dumps`` would write them as ``NaN``/``Infinity``, which strict JSON readers
    (jq, JavaScript, most other languages) refuse. Everything else is kept as is."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(json_safe(v) for v in obj)
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON: non-finite floats become null (``allow_nan=False`` catches any that slip by)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """One strict JSON object per line, as :func:`atomic_write_json`."""
    atomic_write_text(path, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


YAML_FILE_LIMIT = 2**20  # bytes: a config, task-stream or bench YAML file is a few KiB


class FileRefused(ValueError):
    """:func:`read_bounded` refuses a file: not a regular file, or larger than its limit."""


def size_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the user-supplied file ``path``, read only if it is a regular file of at most
    ``limit`` bytes (a device such as /dev/zero, a FIFO or a larger file is a :class:`FileRefused`
    whose message says why; OSErrors pass through)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused("not a regular file (a device, FIFO or socket cannot be read as data)")
    if st.st_size > limit:
        raise FileRefused(f"file too large ({st.st_size} bytes; the limit is {size_text(limit)})")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise FileRefused(f"file too large (the limit is {size_text(limit)})")
    return data


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """Read a user-supplied YAML file whose top level is a mapping; an empty file is ``{}``.

    Every problem (missing, unreadable, binary, not a regular file, over :data:`YAML_FILE_LIMIT`,
    bad YAML, a key given twice, nested too deeply, not a mapping) is a one-line
    :class:`ConfigError` naming the path, so the CLI prints it instead of a traceback."""
    try:
        text = read_bounded(path, YAML_FILE_LIMIT).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 text ({e.reason})") from None
    except FileRefused as e:
        raise ConfigError(f"{path}: cannot read {what}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML in {what}: {yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML in {what}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping of key: value, found {type(data).__name__}")
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: its problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        text = f"{problem} at line {mark.line + 1} column {mark.column + 1}"
    else:
        text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def commit_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written temporary directory into place (a single rename)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
