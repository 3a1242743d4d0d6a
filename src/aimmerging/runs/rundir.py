"""The run directory: check it fits the config, initialise it, commit finished stages, read them
back verified on resume, load their adapters, and write the run-level files.

The layout (every file name) is in :mod:`aimmerging.runs.layout`, the lock on ``RUN_DIR/.lock``
in :mod:`aimmerging.runs.lock`, and what a resume trusts (the verifiers of a finished stage, the
checksums written with it) in :mod:`aimmerging.runs.verify`.

A stage is written in ``stages/.tmp-<name>/`` and renamed into place only when everything in it
is written, so a run killed at any moment resumes at its first unfinished stage. Only the main
process writes.

**Paths.** Every stage folder and predictions file is built here (``stage_dir``,
``tmp_stage_dir``, ``predictions_file``) and refused unless it resolves inside the run directory;
task names are also checked where they enter (``data.stream.check_task_name``).

``results.json`` is a cache of what the stages hold (it is only read for the peak memory of
earlier invocations): a damaged one is ignored with a warning and written anew.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, UserError, one_line
from ..io import atomic_torch_save, atomic_write_json, atomic_write_jsonl, atomic_write_text, atomic_write_yaml
from ..io import commit_dir, remove_temp_files
from . import verify
from .layout import (LOCK, SUMMARY, TMP_PREFIX, RunLayout, adapter_dir, method_state_file, predictions_file,
                     scores_file, stage_trace)
from .lock import RunLock
from .results import read_results, summary_markdown
from .verify import ADAPTER_FILE, CHECKSUM_KEY, DamagedStage

__all__ = ["RunDirectory", "DamagedStage", "CHECKSUM_KEY", "LOCK_NAME"]

log = logging.getLogger("aimmerging")

LOCK_NAME = LOCK


def _file_name(name: str, what: str) -> str:
    """``name`` when it is one plain file name (no separator, not ``.``/``..``, no NUL), else a
    one-line UserError: a stage folder or a predictions file is never a path."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise UserError(f"{what} {name!r}: not a plain file name; aimmerging writes only inside its run directory")
    return name


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._layout = RunLayout(self.path)
        self._lock = RunLock(self.path)

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

    # -- the lock (see runs/lock.py) -------------------------------------------------------------------
    @property
    def locked(self) -> bool:
        return self._lock.held

    def lock(self) -> None:
        """Take the run directory's lock (creating the directory when it is new), or refuse at once
        with one line naming the run that holds it. A directory that exists and is not a run
        directory is refused first, with nothing written into it. Idempotent."""
        if self._lock.held:
            return
        self._refuse_foreign()
        self._lock.acquire()

    def unlock(self) -> None:
        """Release the lock: delete the lock file (and the directory, when this run created it
        and wrote nothing into it), then drop the lock. Idempotent."""
        self._lock.release()

    def _refuse_foreign(self) -> None:
        """Refuse a path that exists and is not a run directory (or an empty one). Writes nothing."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not an aimmerging run directory; choose another --output-dir")
        if self.config_file.is_file() or not any(p.name != LOCK_NAME for p in self.path.iterdir()):
            return
        if not self.locked:
            self._lock.refuse_if_busy()  # a run replacing its directory may be between two of its files
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
            data = read_results(self.path)
        except (OSError, ValueError) as e:
            log.warning("%s is damaged (%s): ignored, it is written anew from the stages", self.results_file, one_line(e, 120))
            return None
        if not isinstance(data, dict):
            log.warning("%s is damaged (not a JSON object): ignored, it is written anew from the stages", self.results_file)
            return None
        peak = data.get("peak_rss_mb")
        if peak is not None and not (verify.is_number(peak) and peak > 0):
            log.warning("%s: peak_rss_mb is not a positive number: ignored", self.results_file)
            data = {k: v for k, v in data.items() if k != "peak_rss_mb"}
        return data

    # -- stages ----------------------------------------------------------------------------------------
    def finished(self, dirname: str, *, planned: Optional[dict] = None,
                 eval_ids: Optional[dict[str, list]] = None) -> Optional[dict]:
        """The committed record (scores.json) of a finished stage, verified (see runs/verify.py),
        or None when the stage is not finished. ``planned``: the ``index``, ``name`` and ``row`` the
        record must have (None for the zero-shot stage); ``eval_ids``: the tasks the stage evaluates
        and the ids of their evaluation examples, in order (None: the scores are not checked against
        the predictions). A damaged stage raises :class:`DamagedStage` (one line: the file, what to do)."""
        stage = self.stage_dir(dirname)
        path = scores_file(stage)
        if not path.is_file():
            return None
        record = verify.read_record(stage, path)
        sums = record.pop(CHECKSUM_KEY, None)
        verify.check_record(stage, path, record, planned, eval_ids)
        if sums is not None:
            verify.check_checksums(stage, path, record, sums)
        if eval_ids is not None:
            for task, ids in eval_ids.items():
                verify.check_predictions(stage, path, self.predictions_file(dirname, task), task,
                                         record["scores"][task], ids)
        verify.check_trace(stage, record)
        if adapter_dir(stage).is_dir():
            verify.adapter_tensors(stage)
        verify.method_state(stage)
        return record

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
        stored = {**record, CHECKSUM_KEY: verify.stage_checksums(tmp, record)}
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
        return verify.adapter_tensors(self.stage_dir(dirname))

    def load_adapter(self, model, dirname: str) -> None:
        """Load a finished stage's adapter into ``model`` (a PEFT model), or refuse with one line
        when the file is damaged, holds a non-finite value or does not fit the model."""
        from peft import get_peft_model_state_dict

        from ..models.lora import load_adapter_weights

        stage = self.stage_dir(dirname)
        path = self.adapter_dir(dirname) / ADAPTER_FILE
        tensors = self.adapter_tensors(dirname)
        expected = get_peft_model_state_dict(model)
        missing = sorted(set(expected) - set(tensors))
        wrong = [k for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
        if missing or wrong:
            first = missing[0] if missing else f"{wrong[0]} (shape {tuple(tensors[wrong[0]].shape)}, the model's {tuple(expected[wrong[0]].shape)})"
            raise verify.damaged(stage, path, f"does not match the model ({'missing ' if missing else ''}{first})")
        try:
            load_adapter_weights(model, self.adapter_dir(dirname))
        except UserError as e:
            raise verify.damaged(stage, path, one_line(e, 200)) from None
        except (OSError, ValueError, RuntimeError) as e:
            raise verify.damaged(stage, path, f"cannot be loaded ({one_line(e, 100)})") from None

    def method_state(self, dirname: str) -> Optional[dict]:
        """The method state saved with a finished stage, checked to load; None when it has none."""
        return verify.method_state(self.stage_dir(dirname))

    def stage_trace(self, dirname: str) -> list[dict]:
        stage = self.stage_dir(dirname)
        path = stage_trace(stage)
        return verify.read_stage_jsonl(stage, path) if path.is_file() else []

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
