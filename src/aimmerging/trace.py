"""Trace records: one typed definition of what a run writes to ``trace.jsonl``, and one reader.

A merging run writes, per stage (task): a ``task_start`` record with the merge-controller
settings, one ``step`` record per inner optimizer step, one ``merge`` record per merge (the
controller's decision and what the fusion did), and a ``select_best`` record when model selection
restored an earlier adapter. Every record carries ``task`` and ``task_index`` and is a plain JSON
object: the types below are ``TypedDict``s, so records stay dicts everywhere (files, tests, the
Python API's ``result.trace``).

:func:`read_trace` reads a (possibly user-supplied) file with one-line errors; :func:`split_tasks`
groups records by task into :class:`TaskTrace` objects; the plots and ``aimmerging controller
replay`` both use them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypedDict

from .errors import UserError

try:  # Python >= 3.11
    from typing import NotRequired
except ImportError:  # pragma: no cover
    from typing_extensions import NotRequired


class TaskStartRecord(TypedDict):
    task: str
    task_index: int
    event: Literal["task_start"]
    step: int  # 0
    memory_size: int
    controller: dict  # ControllerConfig.to_dict()


class StepRecord(TypedDict):
    task: str
    task_index: int
    event: Literal["step"]
    step: int
    train_loss: Optional[float]  # None when not finite (the step was skipped)
    lr: float
    history_loss: Optional[float]  # forgetting probe (merging methods)
    delta_in_l1: Optional[float]  # sum |adapter - anchor| (merging methods)
    interval: NotRequired[int]  # planned merge interval in force (merging methods)
    threshold: NotRequired[Optional[float]]  # forgetting threshold in force (merging methods)
    skipped: NotRequired[str]  # why the optimizer step was skipped: non-finite loss, gradient or adapter after the step
    fallback: NotRequired[str]  # what the adapter fell back to, and why
    probe_skipped: NotRequired[str]  # why history_loss is null (a non-finite probe is not fed to the controller)
    val_loss: NotRequired[float]  # validation loss (model selection)


class MergeRecord(TypedDict):
    task: str
    task_index: int
    event: Literal["merge"]
    step: int
    reason: str  # planned | early | signal | forced | fixed | end
    forgetting_count: Optional[int]
    w_in: float
    w_out: float
    outer_steps: int
    learning_signal: float
    interval: int
    elapsed: int
    threshold: Optional[float]
    next_interval: int
    next_outer_steps: int
    replay_loss: Optional[float]  # mean loss of the replay steps that ran
    replay_skipped: int  # replay steps skipped (non-finite loss, gradient or update)
    fallback: Optional[str]  # set when the fusion was not finite and the replay update was dropped


class TaskEndAdapterRecord(TypedDict):
    task: str
    task_index: int
    event: Literal["task_end_adapter"]
    step: int
    fallback: str  # the method's end-of-task adapter was not finite: the trained adapter was kept


class FisherRecord(TypedDict):  # ewc: the Fisher estimated at the end of a task
    task: str
    task_index: int
    event: Literal["fisher"]
    step: int
    examples: int
    fisher_sum: float


class TaskMergeRecord(TypedDict):  # the merging family (task-arithmetic, ties, dare, magmax)
    task: str
    task_index: int
    event: Literal["task_merge"]
    step: int
    rule: str  # the fusion rule
    space: str  # delta (B@A per layer) | params (A and B)
    chain: str  # merged | trained: where the next task starts
    task_vectors: int
    weights: list
    refactor_residual: Optional[float]  # relative norm lost re-factoring the merged update to rank r


class SelectBestRecord(TypedDict):
    task: str
    task_index: int
    event: Literal["select_best"]
    step: int  # the step whose adapter was kept
    val_loss: float


EVENTS = ("task_start", "step", "merge", "select_best", "task_end_adapter", "fisher", "task_merge")
# Methods may add their own per-step values to a step record (ewc_penalty, distillation,
# consistency, orth_loss): plain numbers under the method's own keys.


def read_trace(path: str | os.PathLike) -> list[dict]:
    """Read a (possibly user-supplied) JSON-lines file; any problem is a one-line :class:`UserError`."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {n}: not JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{path}: line {n}: expected a JSON object")
                records.append(rec)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a trace file (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    return records


@dataclass
class TaskTrace:
    """The trace records of one stage (one task), split by event."""

    index: int  # stage index (0-based), as task_index in the trace
    name: str
    label: str = ""  # "<method> on <model>", for titles
    steps: list[dict] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)
    controller: Optional[dict] = None  # merge-controller settings of the task_start record
    best: Optional[dict] = None  # select_best record: the step whose adapter was kept

    @property
    def stem(self) -> str:
        return f"{self.index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', self.name)}"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def split_tasks(records: list[dict], label: str = "") -> list[TaskTrace]:
    """Group trace records by task, in order of first appearance; unknown events are ignored."""
    tasks: dict[tuple[int, str], TaskTrace] = {}
    for rec in records:
        name = rec.get("task")
        if name is None:
            continue
        index = rec.get("task_index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else len(tasks)
        trace = tasks.setdefault((index, str(name)), TaskTrace(index, str(name), label))
        event = rec.get("event", "step")
        if event == "step" and _is_number(rec.get("step")):
            trace.steps.append(rec)
        elif event == "merge" and _is_number(rec.get("step")):
            trace.merges.append(rec)
        elif event == "task_start" and isinstance(rec.get("controller"), dict):
            trace.controller = rec["controller"]
        elif event == "select_best":
            trace.best = rec
    return list(tasks.values())


def merge_summary(records: list[dict]) -> Optional[dict]:
    """What a merging run's trace says, over its tasks with merges (None when it has no merge):
    merges per task and by reason, the forgetting counts F of the merges (how often F > 1), the
    merge interval's path (first, last, min, max over the steps), the replay steps, the best
    step kept by model selection, and the probe's noise (per task: the coefficient of variation of
    the history loss over its steps, then the median over tasks)."""
    tasks = [t for t in split_tasks(records) if t.merges]
    if not tasks:
        return None
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    intervals: list[int] = []
    per_task = []
    cvs = []
    for t in tasks:
        f = [m.get("forgetting_count") for m in t.merges if _is_number(m.get("forgetting_count"))]
        for x in f:
            counts[str(int(x))] = counts.get(str(int(x)), 0) + 1
        for m in t.merges:
            reasons[str(m.get("reason"))] = reasons.get(str(m.get("reason")), 0) + 1
        path = [int(s["interval"]) for s in t.steps if _is_number(s.get("interval"))]
        intervals += path
        history = [float(s["history_loss"]) for s in t.steps if _is_number(s.get("history_loss"))]
        cv = None
        if len(history) > 1:
            mean = sum(history) / len(history)
            sd = (sum((h - mean) ** 2 for h in history) / (len(history) - 1)) ** 0.5
            cv = sd / mean if mean > 0 else None
        if cv is not None:
            cvs.append(cv)
        per_task.append({"task": t.name, "merges": len(t.merges), "f_above_1": sum(x > 1 for x in f),
                         "interval_first": path[0] if path else None, "interval_last": path[-1] if path else None,
                         "interval_min": min(path) if path else None, "interval_max": max(path) if path else None,
                         "outer_steps": sum(int(m.get("outer_steps") or 0) for m in t.merges),
                         "best_step": (t.best or {}).get("step"), "history_cv": cv})
    merges = sum(p["merges"] for p in per_task)
    cvs.sort()
    return {"tasks": per_task, "merges": merges, "reasons": reasons, "forgetting_counts": counts,
            "f_above_1": sum(p["f_above_1"] for p in per_task),
            "interval_min": min(intervals) if intervals else None, "interval_max": max(intervals) if intervals else None,
            "history_cv_median": cvs[len(cvs) // 2] if cvs else None}
