"""Small file helpers. Every file is written atomically: to a temporary name in the same
directory, flushed, then renamed over the target, so a reader (or a resumed run) never sees a
half-written file."""

from __future__ import annotations

import json
import math
import os
import shutil
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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it over ``path``.

    ``mkstemp`` creates the file owner-only (0600); it gets the mode a plain ``open`` would have
    given it (0666 less the umask) before the rename, so results stay readable by a team."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """Read a user-supplied YAML file whose top level is a mapping; an empty file is ``{}``.

    Every problem (missing, unreadable, binary, bad YAML, not a mapping) is a one-line
    :class:`ConfigError` naming the path, so the CLI prints it instead of a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML in {what}: {yaml_problem(e)}") from None
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
