"""What a resume trusts: the verifiers of a finished stage, and the checksums written with it.

Every finished stage is verified before the run goes on (a damaged one is refused with one line
naming the file and what to do, never read silently):

* ``scores.json``: valid JSON of the expected shape (index, name and row of the planned stage,
  one score in [0, 1] per task that stage evaluates, numeric counters and timings);
* its ``sha256`` entry, written at commit (:func:`stage_checksums`): a digest of the record itself
  (a hand-edited score would give a false BWT) and of every file of the stage but the markdown
  ones (predictions, trace, adapter, method state), all compared on resume;
* recomputation, which also covers stages written before the checksums existed: each score is
  the mean of the ``score`` fields of ``predictions/<task>.jsonl`` (within 1e-9), whose ids are
  the task's evaluation examples in order; every trace line is a JSON object; the adapter loads
  and holds finite values only; the method state loads.

Each function takes the stage folder ``stage`` (already confined to the run directory by
:class:`~aimmerging.runs.rundir.RunDirectory`, which runs them in that order) and the files it
checks; a problem is a :class:`DamagedStage`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import UserError, one_line
from ..io import file_sha256, json_safe, read_json, read_jsonl
from .layout import SCORES, ZERO_SHOT, adapter_dir, method_state_file, stage_trace

CHECKSUM_KEY = "sha256"  # scores.json: {"record": digest of the rest of the record, "files": {path: digest}}
SCORE_TOLERANCE = 1e-9
ADAPTER_FILE = "adapter_model.safetensors"
_COUNTERS = ("steps", "merges", "tokens", "skipped_steps", "skipped_replay_steps", "memory_size", "best_step")
_AMOUNTS = ("wall_s", "peak_rss_mb", "stage_peak_rss_mb", "stage_peak_cuda_mb")


class DamagedStage(UserError):
    """A finished stage's file is damaged, edited or does not belong to this run."""


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def damaged(stage: Path, path: Path, problem: str) -> DamagedStage:
    """The one-line error for the damaged file ``path`` of ``stage``: what is wrong, what to delete."""
    what = "evaluate the untrained model again" if stage.name == ZERO_SHOT else "retrain that stage"
    return DamagedStage(f"{path}: {problem}; delete {stage} to {what}, then rerun the same command")


# -- the checksums ---------------------------------------------------------------------------------

def record_digest(record: dict) -> str:
    """The digest of a stage record as it reads back from scores.json (key order does not matter)."""
    plain = json.loads(json.dumps(json_safe(record), allow_nan=False))
    text = json.dumps(plain, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checksummed_files(stage: Path) -> list[str]:
    """The files of a stage folder its checksums cover: all but scores.json and markdown (PEFT's
    model card), as paths relative to the folder."""
    return sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*")
                  if p.is_file() and p.name != SCORES and p.suffix != ".md")


def stage_checksums(stage: Path, record: dict) -> dict:
    """The ``sha256`` entry of scores.json, for a stage whose other files are all written."""
    files = {rel: file_sha256(stage / rel) for rel in checksummed_files(stage)}
    return {"record": record_digest(record), "files": files}


# -- the verifiers, in the order a resume runs them ------------------------------------------------

def read_record(stage: Path, path: Path) -> dict:
    """The stage's scores.json (``path``): one JSON object."""
    record = _read(stage, path, read_json, "")
    if not isinstance(record, dict):
        raise damaged(stage, path, "damaged (not a JSON object)")
    return record


def check_record(stage: Path, path: Path, record: dict, planned: Optional[dict],
                 eval_ids: Optional[dict[str, list]]) -> None:
    for key, want in (planned or {}).items():
        got = record.get(key)
        if got != want or isinstance(got, bool) or type(got) is not type(want):
            raise damaged(stage, path, f"damaged or not this run's ({key} is {got!r}, this stage's is {want!r})")
    scores = record.get("scores")
    if not isinstance(scores, dict):
        raise damaged(stage, path, "damaged (no 'scores' mapping)")
    if eval_ids is not None and set(scores) != set(eval_ids):
        raise damaged(stage, path, f"damaged or not this run's (scores for {', '.join(sorted(map(str, scores))) or 'no task'}; "
                                   f"this stage evaluates {', '.join(eval_ids)})")
    for task, score in scores.items():
        if not (is_number(score) and 0.0 <= score <= 1.0):
            raise damaged(stage, path, f"damaged (score of {task} is {score!r}, not a number in [0, 1])")
    for key in _COUNTERS:
        v = record.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise damaged(stage, path, f"damaged ({key} is {v!r}, not a count)")
    for key in _AMOUNTS:
        v = record.get(key)
        if v is not None and not (is_number(v) and v >= 0):
            raise damaged(stage, path, f"damaged ({key} is {v!r}, not a number)")
    timing = record.get("timing", {})
    if not (isinstance(timing, dict) and all(is_number(v) for v in timing.values())):
        raise damaged(stage, path, "damaged ('timing' is not a mapping of seconds)")


def check_checksums(stage: Path, path: Path, record: dict, sums: Any) -> None:
    files = sums.get("files") if isinstance(sums, dict) else None
    if not (isinstance(files, dict) and isinstance(sums.get("record"), str)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise damaged(stage, path, f"damaged (its '{CHECKSUM_KEY}' entry is not the one written at commit)")
    if record_digest(record) != sums["record"]:
        raise damaged(stage, path, "edited or damaged: the record does not match its checksum")
    for rel, digest in sorted(files.items()):
        file = stage / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not file.is_file():
            raise damaged(stage, file, "missing")
        try:
            ok = file_sha256(file) == digest
        except OSError as e:
            raise damaged(stage, file, f"cannot be read ({e.strerror or e})") from None
        if not ok:
            raise damaged(stage, file, "edited or damaged: it does not match the checksum written with the stage")
    state = method_state_file(stage)
    if state.is_file() and state.name not in files:
        raise damaged(stage, state, "not written with the stage (no checksum)")


def check_predictions(stage: Path, scores_path: Path, path: Path, task: str, score: float, ids: list) -> None:
    """``path`` (predictions/<task>.jsonl): one row per evaluation example, in order, whose scores
    average to the task's score in scores.json (``scores_path``)."""
    if not path.is_file():
        raise damaged(stage, path, "missing")
    rows = read_stage_jsonl(stage, path)
    if not all(is_number(r.get("score")) for r in rows):
        raise damaged(stage, path, "damaged (a row without a numeric 'score')")
    if [r.get("id") for r in rows] != list(ids):
        raise damaged(stage, path, f"damaged or not this run's ({len(rows)} predictions, not the "
                                   f"{len(ids)} evaluation examples of the task in order)")
    mean = sum(r["score"] for r in rows) / len(rows) if rows else None
    if mean is None or abs(mean - score) > SCORE_TOLERANCE:
        raise damaged(stage, scores_path, f"the score of {task} ({score!r}) is not the mean of the scores in "
                                          f"{path} ({mean!r}): one of the two was edited or damaged")


def check_trace(stage: Path, record: dict) -> None:
    """The trace parses and holds the stage's steps (one record each) and its merges; every
    training stage writes one."""
    path = stage_trace(stage)
    if not path.is_file():
        if "steps" in record:
            raise damaged(stage, path, "missing")
        return
    records = read_stage_jsonl(stage, path)
    steps = sum(1 for r in records if r.get("event") == "step")
    merges = sum(1 for r in records if r.get("event") == "merge")
    if isinstance(record.get("steps"), int) and steps < record["steps"]:
        raise damaged(stage, path, f"damaged ({steps} step records, the stage took {record['steps']} steps)")
    if isinstance(record.get("merges"), int) and merges != record["merges"]:
        raise damaged(stage, path, f"damaged ({merges} merge records, the stage merged {record['merges']} times)")


def adapter_tensors(stage: Path) -> dict:
    """The saved adapter's tensors, checked: the file loads and every value is finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir(stage) / ADAPTER_FILE
    if not path.is_file():
        raise damaged(stage, path, "missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(stage, path, f"damaged (cannot be loaded: {one_line(e, 100)})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise damaged(stage, path, f"holds a non-finite value (NaN or inf) in {name}; it cannot be resumed from")
    return tensors


def method_state(stage: Path) -> Optional[dict]:
    """The method's saved state dict, checked to load; None when the stage has none."""
    path = method_state_file(stage)
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged file (pickle, zip, runtime errors)
        raise damaged(stage, path, f"damaged (cannot be loaded: {one_line(e, 100)})") from None
    if not isinstance(state, dict):
        raise damaged(stage, path, "damaged (not a state dict)")
    return state


def read_stage_jsonl(stage: Path, path: Path) -> list[dict]:
    """A stage's JSON-lines file (trace, predictions); damage is a one-line DamagedStage."""
    records = _read(stage, path, read_jsonl, "a line is ")
    if not all(isinstance(r, dict) for r in records):
        raise damaged(stage, path, "damaged (a line is not a JSON object)")
    return records


def _read(stage: Path, path: Path, load: Callable[[Path], Any], which: str) -> Any:
    """``load(path)``, its failure a one-line DamagedStage (``which``: what is not JSON, as
    ``"a line is "`` for a JSON-lines file)."""
    try:
        return load(path)
    except ValueError as e:
        raise damaged(stage, path, f"damaged ({which}not valid JSON: {one_line(e, 100)})") from None
    except OSError as e:
        raise damaged(stage, path, f"cannot be read ({e.strerror or e})") from None
