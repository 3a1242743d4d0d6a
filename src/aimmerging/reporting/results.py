"""``results.json`` of a run, assembled from the committed stage files, and its markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from ..evaluation.metrics import all_metrics
from ..io import read_json

Row = dict[str, float]


def accuracy_matrix(tasks: Sequence[str], rows: dict[int, Row]) -> list[list[Optional[float]]]:
    """T x T matrix from {row index: {task: score}}; None where not evaluated."""
    index = {t: j for j, t in enumerate(tasks)}
    a: list[list[Optional[float]]] = [[None] * len(tasks) for _ in tasks]
    for i, scores in rows.items():
        for task, score in scores.items():
            a[i][index[task]] = score
    return a


def load_reference(path: str | Path, tasks: Sequence[str]) -> list[Optional[float]]:
    """Single-task reference scores for FWT, from a ``single`` run's results.json (or its run
    directory), aligned to ``tasks`` (None for a task that run did not cover)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = read_json(p)
    except (OSError, ValueError) as e:
        raise UserError(f"fwt_reference: cannot read {p}: {e}") from None
    ref = data.get("reference_scores") if isinstance(data, dict) else None
    if not isinstance(ref, dict):
        raise UserError(f"fwt_reference: {p} has no reference_scores (is it the results.json of a 'single' run?)")
    return [ref.get(t) for t in tasks]


def build_results(*, cfg_dict: dict, tasks: Sequence[str], rows: dict[int, Row], task_metrics: dict[str, str],
                  reference: Optional[list], zero_shot: Optional[Row], stages: list[dict], complete: bool,
                  single: bool) -> dict[str, Any]:
    a = accuracy_matrix(tasks, rows)
    if single:  # the diagonal of a single-task run is the FWT reference of every other method
        reference = [a[t][t] for t in range(len(tasks))]
    metrics = all_metrics(a, reference)
    timing: dict[str, float] = {}
    for s in stages:
        for k, v in s.get("timing", {}).items():
            timing[k] = round(timing.get(k, 0.0) + v, 4)
    return {
        "method": cfg_dict["method"],
        "model": cfg_dict["model"],
        "benchmark": cfg_dict["benchmark"],
        "order": cfg_dict["order"],
        "tasks": list(tasks),
        "accuracy_matrix": a,
        "metrics": metrics,
        "task_metrics": task_metrics,
        "reference_scores": dict(zip(tasks, reference)) if reference is not None else None,
        "zero_shot": [zero_shot.get(t) for t in tasks] if zero_shot is not None else None,
        "complete": complete,
        "timing": timing,
        "stages": stages,
    }


def _fmt(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def summary_markdown(results: dict[str, Any]) -> str:
    tasks, a = results["tasks"], results["accuracy_matrix"]
    lines = [f"### {results['method']} on {results['model']} ({len(tasks)} tasks)", "",
             "| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    if results.get("zero_shot"):
        lines.append("| zero-shot | " + " | ".join(_fmt(x) for x in results["zero_shot"]) + " |")
    for i, t in enumerate(tasks):
        if any(x is not None for x in a[i]):
            lines.append(f"| {t} | " + " | ".join(_fmt(x) for x in a[i]) + " |")
    m = results["metrics"]
    lines += ["", f"OP {_fmt(m['op'])} | BWT {_fmt(m['bwt'], True)} | FWT {_fmt(m['fwt'], True)}"
              + ("" if results["complete"] else "  (run not complete)")]
    return "\n".join(lines)
