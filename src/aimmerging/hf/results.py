"""The ``results.json`` the Trainer host keeps beside its trace, so that ``aimmerging plot`` works on
a trainer's output directory: a stream's (:func:`write_stream_results`, complete accuracy matrix)
or a lone callback's (:func:`write_callback_results`: the tasks seen, scores null). Neither ever
overwrites a results.json another writer made (aimmerging's runner, a stream's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from ..evaluation.metrics import all_metrics
from ..io import atomic_write_json
from ..runs.layout import RunLayout
from ..trace import read_trace, split_tasks

CALLBACK_SOURCE = "aimmerging.hf"  # the "source" of a results.json written by a lone callback
STREAM_SOURCE = "aimmerging.hf.train_stream"


def _base_name(model: Any) -> str:
    if model is None:
        return "?"
    return type(getattr(model, "get_base_model", lambda: model)()).__name__


def write_stream_results(out: Path, tasks: Sequence[str], matrix: list, model: Any, method: str, complete: bool) -> None:
    atomic_write_json(RunLayout(out).results, {
        "source": STREAM_SOURCE, "method": f"{method} (transformers trainer)", "model": _base_name(model),
        "tasks": list(tasks), "accuracy_matrix": matrix, "metrics": all_metrics(matrix), "complete": complete})


def write_callback_results(out: Path, task_index: int, task: str, model: Any, method: str) -> None:
    """Add ``task`` (at ``task_index``) to the lone callbacks' results.json of ``out``."""
    layout = RunLayout(out)
    existing: Optional[dict] = None
    if layout.results.is_file():
        try:
            existing = json.loads(layout.results.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(existing, dict) or existing.get("source") != CALLBACK_SOURCE:
            return  # someone else's results (a runner's, a stream's): never overwritten
    names: dict[int, str] = {}
    if layout.trace.is_file():
        try:
            names = {t.index: t.name for t in split_tasks(read_trace(layout.trace))}
        except UserError:
            names = {}
    if existing is not None:
        names.update({i: str(t) for i, t in enumerate(existing.get("tasks") or []) if i not in names})
    names[task_index] = task
    T = max(names) + 1
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.results, {
        "source": CALLBACK_SOURCE, "method": f"{method} (transformers callback)", "model": _base_name(model),
        "tasks": [names.get(i, f"task-{i}") for i in range(T)], "accuracy_matrix": [[None] * T for _ in range(T)],
        "metrics": None, "complete": False})
