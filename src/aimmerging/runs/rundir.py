"""The run directory: lock it, check it fits the config, initialise it, commit finished stages,
verify them on resume, and write the run-level files.

The layout (every file name) is in :mod:`aimmerging.runs.layout`.

A stage is written in ``stages/.tmp-<name>/`` and renamed into place only when everything in it
is written, so a run killed at any moment resumes at its first unfinished stage. Only the main
process writes.

**The lock.** A run holds an exclusive ``flock`` on ``RUN_DIR/.lock`` from before its config
check to its end (only the main process of a multi-process run takes it). The file holds the
holder's pid, host and command line, which a second run on the same directory names when it is
refused. Only the live lock counts: the kernel drops it when its holder dies, so a lock file
left by a killed run does not block the resume. The holder deletes the file when it is done.
A ``.lock`` that is a symbolic link, a hard link or not a regular file is refused in one line,
never written through (it would truncate the file it leads to).

**Paths.** Every stage folder and predictions file is built here (``stage_dir``,
``tmp_stage_dir``, ``predictions_file``) and refused unless it resolves inside the run directory;
task names are also checked where they enter (``data.stream.check_task_name``).

**What a resume trusts.** Every finished stage is verified before the run goes on (a damaged
one is refused with one line naming the file and what to do, never read silently):

* ``scores.json``: valid JSON of the expected shape (index, name and row of the planned stage,
  one score in [0, 1] per task that stage evaluates, numeric counters and timings);
* its ``sha256`` entry, written at commit: a digest of the record itself (a hand-edited score
  would give a false BWT) and of every file of the stage but the markdown ones (predictions,
  trace, adapter, method state), all compared on resume;
* recomputation, which also covers stages written before the checksums existed: each score is
  the mean of the ``score`` fields of ``predictions/<task>.jsonl`` (within 1e-9), whose ids are
  the task's evaluation examples in order; every trace line is a JSON object; the adapter loads
  and holds finite values only; the method state loads.

``results.json`` is a cache of what the stages hold (it is only read for the peak memory of
earlier invocations): a damaged one is ignored with a warning and written anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, UserError
from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text, atomic_write_yaml, commit_dir, json_safe, read_json, read_jsonl
from ..io import atomic_torch_save, file_sha256, remove_temp_files
from .layout import (LOCK, SCORES, SUMMARY, TMP_PREFIX, ZERO_SHOT, RunLayout, adapter_dir, method_state_file,
                     predictions_file, scores_file, stage_trace)
from .results import summary_markdown

log = logging.getLogger("aimmerging")

LOCK_NAME = LOCK
CHECKSUM_KEY = "sha256"  # scores.json: {"record": digest of the rest of the record, "files": {path: digest}}
SCORE_TOLERANCE = 1e-9
ADAPTER_FILE = "adapter_model.safetensors"
_COUNTERS = ("steps", "merges", "tokens", "skipped_steps", "skipped_replay_steps", "memory_size", "best_step")
_AMOUNTS = ("wall_s", "peak_rss_mb", "stage_peak_rss_mb", "stage_peak_cuda_mb")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # the lock is not inherited by programs the run starts
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a .lock that is a symbolic link is refused, not followed


class DamagedStage(UserError):
    """A finished stage's file is damaged, edited or does not belong to this run."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _record_digest(record: dict) -> str:
    """The digest of a stage record as it reads back from scores.json (key order does not matter)."""
    plain = json.loads(json.dumps(json_safe(record), allow_nan=False))
    text = json.dumps(plain, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _checksummed_files(stage_dir: Path) -> list[str]:
    """The files of a stage folder its checksums cover: all but scores.json and markdown (PEFT's
    model card), as paths relative to the folder."""
    return sorted(p.relative_to(stage_dir).as_posix() for p in stage_dir.rglob("*")
                  if p.is_file() and p.name != SCORES and p.suffix != ".md")


def _first_missing(path: Path) -> Optional[Path]:
    """The top-most directory of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _file_name(name: str, what: str) -> str:
    """``name`` when it is one plain file name (no separator, not ``.``/``..``, no NUL), else a
    one-line UserError: a stage folder or a predictions file is never a path."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise UserError(f"{what} {name!r}: not a plain file name; aimmerging writes only inside its run directory")
    return name


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._layout = RunLayout(self.path)
        self._lock_fd: Optional[int] = None
        self._created: Optional[Path] = None  # the top-most directory the lock created

    # -- files -----------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self._layout.config

    @property
    def results_file(self) -> Path:
        return self._layout.results

    @property
    def trace_file(self) -> Path:
        return self._layout.trace

    @property
    def lock_file(self) -> Path:
        return self._layout.lock

    def stage_dir(self, dirname: str) -> Path:
        return self._inside(self._layout.stage(_file_name(dirname, "stage folder")))

    def tmp_stage_dir(self, dirname: str) -> Path:
        return self._inside(self._layout.tmp_stage(_file_name(dirname, "stage folder")))

    def predictions_file(self, dirname: str, task: str, *, tmp: bool = False) -> Path:
        """``predictions/<task>.jsonl`` of a stage (of its temporary folder with ``tmp``)."""
        folder = self.tmp_stage_dir(dirname) if tmp else self.stage_dir(dirname)
        return self._inside(predictions_file(folder, _file_name(task, "task name")))

    def _inside(self, path: Path) -> Path:
        """``path`` when it resolves inside the run directory, else a one-line UserError. Task names
        are checked where they enter (``data.stream.check_task_name``); this is the second line of
        defence, which also catches a symbolic link (``stages``, a stage folder) leading elsewhere."""
        root = self.path.resolve()
        real = path.resolve()
        if root not in real.parents:
            raise UserError(f"{path}: resolves to {real}, outside the run directory {self.path} (a name that is "
                            "a path, or a symbolic link); aimmerging writes only inside its run directory")
        return path

    # -- the lock --------------------------------------------------------------------------------------
    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> None:
        """Take the run directory's lock (creating the directory when it is new), or refuse at once
        with one line naming the run that holds it. A directory that exists and is not a run
        directory is refused first, with nothing written into it. Idempotent."""
        if self._lock_fd is not None:
            return
        self._refuse_foreign()
        created = _first_missing(self.path)
        for _ in range(20):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                # never through a link: O_NOFOLLOW refuses a symlink (ELOOP), the fstat below a hard
                # link or a device, so a planted .lock cannot make the run overwrite another file
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
            except FileNotFoundError:  # the directory was removed under us (a run releasing it): again
                continue
            except OSError as e:
                if self.lock_file.is_symlink():
                    raise self._linked_lock("a symbolic link") from None
                where = e.filename or self.path
                raise UserError(f"{where}: cannot create the run directory's lock file ({e.strerror or e}); "
                                "choose another --output-dir") from None
            st = os.fstat(fd)
            if st.st_nlink == 0:  # deleted by the run releasing it, between our open and now: again
                os.close(fd)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise self._linked_lock("not a regular file" if not stat.S_ISREG(st.st_mode)
                                        else f"a hard link ({st.st_nlink} names for one file)")
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                holder = self._holder(fd)
                os.close(fd)
                raise UserError(f"{self.path} is in use by another aimmerging run ({holder}); wait for it to "
                                "finish, or choose another --output-dir") from None
            except (ImportError, OSError) as e:  # no flock here (some network file systems, not POSIX)
                os.close(fd)
                log.warning("cannot lock %s (%s): running without a lock; make sure no other run uses "
                            "this directory", self.lock_file, getattr(e, "strerror", None) or e)
                return
            # the previous holder may have deleted the file between our open and our flock: then the
            # lock we hold is on a file nobody else will see; take the one at the path instead
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "command": _one_line(shlex.join([sys.executable, *sys.argv]), 1000),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            except OSError as e:
                os.close(fd)
                raise UserError(f"{self.lock_file}: cannot write the lock file ({e.strerror or e}); "
                                "choose another --output-dir") from None
            self._lock_fd, self._created = fd, created
            return
        raise UserError(f"{self.lock_file}: could not take the lock, other runs keep taking and releasing it; "
                        "rerun the command once they are done")

    def unlock(self) -> None:
        """Release the lock: delete the lock file (and the directory, when this run created it
        and wrote nothing into it), then drop the lock. Idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.lock_file)):
                os.unlink(self.lock_file)  # still holding the lock: a run that opened it retries
            if self._created is not None:
                for d in [self.path, *self.path.parents]:
                    os.rmdir(d)  # only empty ones; stops with an OSError at the first that is not
                    if d == self._created:
                        break
        except OSError:
            pass
        finally:
            os.close(fd)

    def _linked_lock(self, what: str) -> UserError:
        return UserError(f"{self.lock_file} is {what}; aimmerging never writes its lock through a link: "
                         "delete that file (it is not aimmerging's), then rerun the same command")

    def _holder(self, fd: Optional[int] = None) -> str:
        """'pid N on HOST, started ..., command ...' from the lock file (it is written just after
        the lock is taken: wait a moment for it)."""
        text = ""
        for attempt in range(20):
            if attempt:
                time.sleep(0.05)
            try:
                if fd is not None:
                    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                else:
                    text = self.lock_file.read_text(encoding="utf-8", errors="replace")[:4096]
                info = json.loads(text)
                return (f"pid {int(info['pid'])} on {_one_line(info.get('host'), 100)}, "
                        f"started {_one_line(info.get('started'), 40)}: {_one_line(info.get('command'), 200)}")
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return f"its process is unknown: {self.lock_file} is {'empty' if not text.strip() else 'unreadable'}"

    def _refuse_if_busy(self) -> None:
        """Refuse when a run holds the lock; writes nothing (the lock file is only opened to read)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        except OSError:
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = self._holder(fd)
            raise UserError(f"{self.path} is in use by another aimmerging run ({holder}); wait for it to "
                            "finish, or choose another --output-dir") from None
        except (ImportError, OSError):
            pass
        finally:
            os.close(fd)

    def _refuse_foreign(self) -> None:
        """Refuse a path that exists and is not a run directory (or an empty one). Writes nothing."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not an aimmerging run directory; choose another --output-dir")
        if self.config_file.is_file() or not any(p.name != LOCK_NAME for p in self.path.iterdir()):
            return
        if not self.locked:
            self._refuse_if_busy()  # a run replacing its directory may be between two of its files
        raise ConfigError(f"{self.path} exists and is not an aimmerging run directory; choose another --output-dir")

    # -- before the run ------------------------------------------------------------------------------
    def check(self, cfg) -> bool:
        """Check that the directory is new or holds a run of this config. Returns True when an
        existing run with another config (or a damaged config.yaml) is to be replaced
        (``--overwrite``). Writes nothing."""
        from ..config import load_yaml

        if self.config_file.is_file():
            hint = "choose another --output-dir, or pass --overwrite to delete that run and start anew"
            try:
                old = load_yaml(self.config_file)
            except ConfigError as e:
                if cfg.overwrite:
                    return True
                raise ConfigError(f"{e}; the run's config is damaged: {hint}") from None
            new = cfg.fingerprint()
            if old.get("data_dir"):
                old["data_dir"] = os.path.normpath(str(old["data_dir"]))
            missing = sorted(k for k in new if k not in old)
            if missing and not cfg.overwrite:
                listed = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
                raise ConfigError(f"{self.config_file}: damaged or written by another version (no value for: {listed}); {hint}")
            differ = sorted(k for k in new if old.get(k) != new[k])
            if differ and not cfg.overwrite:
                raise ConfigError(f"{self.path} holds a run with a different config (differs in: {', '.join(differ)}; "
                                  f"see {self.config_file}); {hint}")
            return bool(differ)
        self._refuse_foreign()
        return False

    def init(self, cfg, replace: bool) -> None:
        """Create (or replace) the directory, write config.yaml, drop leftovers of a killed run.

        Replacing deletes everything but the lock file and the old config.yaml first, then writes
        the new config: a run killed while replacing still holds the old config, so the same
        command with --overwrite finishes the job."""
        self.path.mkdir(parents=True, exist_ok=True)
        if replace:
            for p in sorted(self.path.iterdir()):
                if p.name in (LOCK_NAME, self.config_file.name):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        atomic_write_yaml(self.config_file, cfg.to_dict())
        self._layout.stages.mkdir(exist_ok=True)
        for tmp in self._layout.stages.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run
            shutil.rmtree(tmp, ignore_errors=True)
        # ... and the temporary files of a run killed between writing a run-level file and its rename
        remove_temp_files(self.path, (self.config_file.name, self.results_file.name, self.trace_file.name, SUMMARY))

    def previous_results(self) -> Optional[dict]:
        """The results.json of an earlier invocation, or None (also when it is damaged: it only
        caches what the stages hold, and is written anew)."""
        if not self.results_file.is_file():
            return None
        try:
            data = read_json(self.results_file)
        except (OSError, ValueError) as e:
            log.warning("%s is damaged (%s): ignored, it is written anew from the stages", self.results_file, _one_line(e, 120))
            return None
        if not isinstance(data, dict):
            log.warning("%s is damaged (not a JSON object): ignored, it is written anew from the stages", self.results_file)
            return None
        peak = data.get("peak_rss_mb")
        if peak is not None and not (_is_number(peak) and peak > 0):
            log.warning("%s: peak_rss_mb is not a positive number: ignored", self.results_file)
            data = {k: v for k, v in data.items() if k != "peak_rss_mb"}
        return data

    # -- stages ----------------------------------------------------------------------------------------
    def finished(self, dirname: str, *, planned: Optional[dict] = None,
                 eval_ids: Optional[dict[str, list]] = None) -> Optional[dict]:
        """The committed record (scores.json) of a finished stage, verified, or None when the
        stage is not finished. ``planned``: the ``index``, ``name`` and ``row`` the record must
        have (None for the zero-shot stage); ``eval_ids``: the tasks the stage evaluates and the
        ids of their evaluation examples, in order (None: the scores are not checked against the
        predictions). A damaged stage raises :class:`DamagedStage` (one line: the file, what to do)."""
        stage = self.stage_dir(dirname)
        path = scores_file(stage)
        if not path.is_file():
            return None
        record = self._read_record(dirname, path)
        sums = record.pop(CHECKSUM_KEY, None)
        self._check_record(dirname, path, record, planned, eval_ids)
        if sums is not None:
            self._check_checksums(dirname, path, record, sums)
        if eval_ids is not None:
            for task, ids in eval_ids.items():
                self._check_predictions(dirname, path, task, record["scores"][task], ids)
        trace = stage_trace(stage)
        if trace.is_file():
            self._check_trace(dirname, trace, record)
        elif "steps" in record:  # every training stage writes one
            raise self._damaged(dirname, trace, "missing")
        if adapter_dir(stage).is_dir():
            self.adapter_tensors(dirname)
        self.method_state(dirname)
        return record

    def _damaged(self, dirname: str, path: Path, problem: str) -> DamagedStage:
        what = "evaluate the untrained model again" if dirname == ZERO_SHOT else "retrain that stage"
        return DamagedStage(f"{path}: {problem}; delete {self.stage_dir(dirname)} to {what}, then rerun the same command")

    def _read_record(self, dirname: str, path: Path) -> dict:
        try:
            record = read_json(path)
        except ValueError as e:
            raise self._damaged(dirname, path, f"damaged (not valid JSON: {_one_line(e, 100)})") from None
        except OSError as e:
            raise self._damaged(dirname, path, f"cannot be read ({e.strerror or e})") from None
        if not isinstance(record, dict):
            raise self._damaged(dirname, path, "damaged (not a JSON object)")
        return record

    def _check_record(self, dirname: str, path: Path, record: dict, planned: Optional[dict],
                      eval_ids: Optional[dict[str, list]]) -> None:
        for key, want in (planned or {}).items():
            got = record.get(key)
            if got != want or isinstance(got, bool) or type(got) is not type(want):
                raise self._damaged(dirname, path, f"damaged or not this run's ({key} is {got!r}, this stage's is {want!r})")
        scores = record.get("scores")
        if not isinstance(scores, dict):
            raise self._damaged(dirname, path, "damaged (no 'scores' mapping)")
        if eval_ids is not None and set(scores) != set(eval_ids):
            raise self._damaged(dirname, path, f"damaged or not this run's (scores for {', '.join(sorted(map(str, scores))) or 'no task'}; "
                                               f"this stage evaluates {', '.join(eval_ids)})")
        for task, score in scores.items():
            if not (_is_number(score) and 0.0 <= score <= 1.0):
                raise self._damaged(dirname, path, f"damaged (score of {task} is {score!r}, not a number in [0, 1])")
        for key in _COUNTERS:
            v = record.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise self._damaged(dirname, path, f"damaged ({key} is {v!r}, not a count)")
        for key in _AMOUNTS:
            v = record.get(key)
            if v is not None and not (_is_number(v) and v >= 0):
                raise self._damaged(dirname, path, f"damaged ({key} is {v!r}, not a number)")
        timing = record.get("timing", {})
        if not (isinstance(timing, dict) and all(_is_number(v) for v in timing.values())):
            raise self._damaged(dirname, path, "damaged ('timing' is not a mapping of seconds)")

    def _check_checksums(self, dirname: str, path: Path, record: dict, sums: Any) -> None:
        files = sums.get("files") if isinstance(sums, dict) else None
        if not (isinstance(files, dict) and isinstance(sums.get("record"), str)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise self._damaged(dirname, path, f"damaged (its '{CHECKSUM_KEY}' entry is not the one written at commit)")
        if _record_digest(record) != sums["record"]:
            raise self._damaged(dirname, path, "edited or damaged: the record does not match its checksum")
        stage = self.stage_dir(dirname)
        for rel, digest in sorted(files.items()):
            file = stage / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute() or not file.is_file():
                raise self._damaged(dirname, file, "missing")
            try:
                ok = file_sha256(file) == digest
            except OSError as e:
                raise self._damaged(dirname, file, f"cannot be read ({e.strerror or e})") from None
            if not ok:
                raise self._damaged(dirname, file, "edited or damaged: it does not match the checksum written with the stage")
        state = method_state_file(stage)
        if state.is_file() and state.name not in files:
            raise self._damaged(dirname, state, "not written with the stage (no checksum)")

    def _check_predictions(self, dirname: str, scores_file: Path, task: str, score: float, ids: list) -> None:
        """predictions/<task>.jsonl: one row per evaluation example, in order, whose scores average
        to the task's score in scores.json."""
        path = self.predictions_file(dirname, task)
        if not path.is_file():
            raise self._damaged(dirname, path, "missing")
        rows = self._read_jsonl(dirname, path)
        if not all(_is_number(r.get("score")) for r in rows):
            raise self._damaged(dirname, path, "damaged (a row without a numeric 'score')")
        if [r.get("id") for r in rows] != list(ids):
            raise self._damaged(dirname, path, f"damaged or not this run's ({len(rows)} predictions, not the "
                                               f"{len(ids)} evaluation examples of the task in order)")
        mean = sum(r["score"] for r in rows) / len(rows) if rows else None
        if mean is None or abs(mean - score) > SCORE_TOLERANCE:
            raise self._damaged(dirname, scores_file, f"the score of {task} ({score!r}) is not the mean of the scores in "
                                                      f"{path} ({mean!r}): one of the two was edited or damaged")

    def _check_trace(self, dirname: str, path: Path, record: dict) -> None:
        """The trace parses and holds the stage's steps (one record each) and its merges."""
        records = self._read_jsonl(dirname, path)
        steps = sum(1 for r in records if r.get("event") == "step")
        merges = sum(1 for r in records if r.get("event") == "merge")
        if isinstance(record.get("steps"), int) and steps < record["steps"]:
            raise self._damaged(dirname, path, f"damaged ({steps} step records, the stage took {record['steps']} steps)")
        if isinstance(record.get("merges"), int) and merges != record["merges"]:
            raise self._damaged(dirname, path, f"damaged ({merges} merge records, the stage merged {record['merges']} times)")

    def _read_jsonl(self, dirname: str, path: Path) -> list[dict]:
        """A stage's JSON-lines file (trace, predictions); damage is a one-line DamagedStage."""
        try:
            records = read_jsonl(path)
        except ValueError as e:
            raise self._damaged(dirname, path, f"damaged (a line is not valid JSON: {_one_line(e, 100)})") from None
        except OSError as e:
            raise self._damaged(dirname, path, f"cannot be read ({e.strerror or e})") from None
        if not all(isinstance(r, dict) for r in records):
            raise self._damaged(dirname, path, "damaged (a line is not a JSON object)")
        return records

    def begin_stage(self, dirname: str) -> Path:
        tmp = self.tmp_stage_dir(dirname)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_stage(self, dirname: str, record: dict, predictions: dict[str, list[dict]], peft_model=None,
                     method_state: Optional[dict] = None) -> None:
        """Write a stage's files into its temporary folder, scores.json last (with the checksums of
        the record and of the other files), and rename it into place. An adapter holding a
        non-finite value is never saved: that would be a bug of the training code."""
        if peft_model is not None:
            _refuse_non_finite(peft_model, dirname)
        tmp = self.tmp_stage_dir(dirname)
        tmp.mkdir(parents=True, exist_ok=True)
        for task, rows in predictions.items():
            atomic_write_jsonl(self.predictions_file(dirname, task, tmp=True), rows)
        if peft_model is not None:
            from ..models.lora import save_adapter

            save_adapter(peft_model, adapter_dir(tmp))  # a full disk: OSError(ENOSPC); the umask's mode
        if method_state:
            atomic_torch_save(method_state_file(tmp), method_state)  # a full disk: OSError(ENOSPC)
        files = {rel: file_sha256(tmp / rel) for rel in _checksummed_files(tmp)}
        stored = {**record, CHECKSUM_KEY: {"record": _record_digest(record), "files": files}}
        atomic_write_json(scores_file(tmp), stored)  # last: its presence marks a finished stage
        commit_dir(tmp, self.stage_dir(dirname))

    def copy_stage(self, source: "RunDirectory", dirname: str) -> bool:
        """Commit the finished stage ``dirname`` of the run ``source`` into this run directory (a
        stage another run computed identically: the bench's shared stages) unless this one has it:
        the source stage is verified first (a damaged one is refused with one line), copied into
        this run's temporary stage folder and renamed into place, as a stage of its own is.
        Returns whether it was copied."""
        target = self.stage_dir(dirname)
        if target.exists() or source.finished(dirname) is None:
            return False
        tmp = self.tmp_stage_dir(dirname)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source.stage_dir(dirname), tmp)
        commit_dir(tmp, target)
        return True

    def adapter_dir(self, dirname: str) -> Path:
        return adapter_dir(self.stage_dir(dirname))

    def adapter_tensors(self, dirname: str) -> dict:
        """The saved adapter's tensors, checked: the file loads and every value is finite."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.adapter_dir(dirname) / ADAPTER_FILE
        if not path.is_file():
            raise self._damaged(dirname, path, "missing")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self._damaged(dirname, path, f"damaged (cannot be loaded: {_one_line(e, 100)})") from None
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise self._damaged(dirname, path, f"holds a non-finite value (NaN or inf) in {name}; it cannot be resumed from")
        return tensors

    def load_adapter(self, model, dirname: str) -> None:
        """Load a finished stage's adapter into ``model`` (a PEFT model), or refuse with one line
        when the file is damaged, holds a non-finite value or does not fit the model."""
        from peft import get_peft_model_state_dict

        from ..models.lora import load_adapter_weights

        path = self.adapter_dir(dirname) / ADAPTER_FILE
        tensors = self.adapter_tensors(dirname)
        expected = get_peft_model_state_dict(model)
        missing = sorted(set(expected) - set(tensors))
        wrong = [k for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
        if missing or wrong:
            first = missing[0] if missing else f"{wrong[0]} (shape {tuple(tensors[wrong[0]].shape)}, the model's {tuple(expected[wrong[0]].shape)})"
            raise self._damaged(dirname, path, f"does not match the model ({'missing ' if missing else ''}{first})")
        try:
            load_adapter_weights(model, self.adapter_dir(dirname))
        except UserError as e:
            raise self._damaged(dirname, path, _one_line(e, 200)) from None
        except (OSError, ValueError, RuntimeError) as e:
            raise self._damaged(dirname, path, f"cannot be loaded ({_one_line(e, 100)})") from None

    def method_state(self, dirname: str) -> Optional[dict]:
        path = method_state_file(self.stage_dir(dirname))
        if not path.is_file():
            return None
        import torch

        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # torch raises many kinds on a damaged file (pickle, zip, runtime errors)
            raise self._damaged(dirname, path, f"damaged (cannot be loaded: {_one_line(e, 100)})") from None
        if not isinstance(state, dict):
            raise self._damaged(dirname, path, "damaged (not a state dict)")
        return state

    def stage_trace(self, dirname: str) -> list[dict]:
        path = stage_trace(self.stage_dir(dirname))
        return self._read_jsonl(dirname, path) if path.is_file() else []

    # -- the run-level files ---------------------------------------------------------------------------
    def write_results(self, results: dict[str, Any], stage_dirnames: list[str], complete: bool) -> None:
        if complete:
            atomic_write_jsonl(self.trace_file, [r for d in stage_dirnames for r in self.stage_trace(d)])
            atomic_write_text(self._layout.summary, summary_markdown(results) + "\n")
        atomic_write_json(self.results_file, results)


def _refuse_non_finite(peft_model, dirname: str) -> None:
    import torch

    for name, p in peft_model.named_parameters():
        if "lora_" in name and not bool(torch.isfinite(p.detach()).all()):
            raise RuntimeError(f"refusing to save the adapter of stage {dirname}: {name} holds a non-finite value "
                               "(NaN or inf); the training code must never let one reach the adapter (a bug in aimmerging)")
