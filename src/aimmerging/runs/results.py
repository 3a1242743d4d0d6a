"""What a run returns: ``results.json`` assembled from the stage records, its markdown summary,
and :class:`RunResult`, the Python API's typed view of it. Pure functions of plain data, but for
:func:`read_results`, the one reader of a run directory's ``results.json`` (the run itself on
resume, the plots, the bench, the study and its report) and :func:`load_reference`, which reads a
reference run's (or any such file the user names); the number formatting and the matrix table used
by every report live here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from ..evaluation.metrics import all_metrics
from ..io import read_json
from .layout import RunLayout

Row = dict[str, float]


def accuracy_matrix(tasks: Sequence[str], rows: dict[int, Row]) -> list[list[Optional[float]]]:
    """T x T matrix from {row index: {task: score}}; None where not evaluated."""
    index = {t: j for j, t in enumerate(tasks)}
    a: list[list[Optional[float]]] = [[None] * len(tasks) for _ in tasks]
    for i, scores in rows.items():
        for task, score in scores.items():
            a[i][index[task]] = score
    return a


def read_results(run_dir: str | os.PathLike) -> Any:
    """The ``results.json`` of the run directory ``run_dir``, parsed (any JSON value: each reader
    checks the shape it needs). OSError when it cannot be read, ValueError when it is not JSON (not
    UTF-8 text included): each reader says in its own words what that means for it."""
    return read_json(RunLayout(run_dir).results)


def load_reference(path: str | Path, tasks: Sequence[str]) -> list[Optional[float]]:
    """Single-task reference scores for FWT, from a ``single`` run's results.json (or its run
    directory), aligned to ``tasks`` (None for a task that run did not cover)."""
    p = Path(path)
    if p.is_dir():
        p = RunLayout(p).results
    try:
        data = read_json(p)
    except (OSError, ValueError) as e:
        raise UserError(f"fwt_reference: cannot read {p}: {e}") from None
    ref = data.get("reference_scores") if isinstance(data, dict) else None  # FWT's scores (see build_results)
    if not isinstance(ref, dict):
        raise UserError(f"fwt_reference: {p} has no reference_scores (is it the results.json of a 'single' run?)")
    return [ref.get(t) for t in tasks]


def build_results(*, cfg_dict: dict, tasks: Sequence[str], rows: dict[int, Row], task_metrics: dict[str, str],
                  reference: Optional[list], zero_shot: Optional[Row], stages: list[dict], complete: bool,
                  single: bool) -> dict[str, Any]:
    a = accuracy_matrix(tasks, rows)
    # a protocol may score some answers differently for OP or FWT (stage records' ``use_scores``)
    use = {u: use_matrix(tasks, a, stages, u) for u in ("op", "fwt")}
    if single:  # the diagonal of a single-task run (as FWT scores it) is every other method's FWT reference
        fwt_a = use["fwt"] or a
        reference = [fwt_a[t][t] for t in range(len(tasks))]
    metrics = all_metrics(a, reference, op_matrix=use["op"], fwt_matrix=use["fwt"])
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
        **({"use_matrices": {u: m for u, m in use.items() if m}} if any(use.values()) else {}),
    }


def use_matrix(tasks: Sequence[str], a: list[list[Optional[float]]], stages: list[dict],
               use: str) -> Optional[list[list[Optional[float]]]]:
    """``a`` with the stages' ``use_scores[use]`` in place of their scores; None when no stage has any."""
    index = {t: j for j, t in enumerate(tasks)}
    out = None
    for s in stages:
        for task, score in (s.get("use_scores") or {}).get(use, {}).items():
            out = out or [list(row) for row in a]
            out[s["row"]][index[task]] = score
    return out


def fmt_number(x: Any, signed: bool = False, digits: int = 4, missing: str = "-") -> str:
    """A score for a table: ``digits`` decimals, ``+`` sign when ``signed``, ``missing`` for None
    or a non-number (the one number formatter of every report)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")
    if not ok:
        return missing
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def matrix_markdown(tasks: Sequence[str], a: Sequence[Sequence[Optional[float]]],
                    zero_shot: Optional[Sequence[Optional[float]]] = None) -> list[str]:
    """The accuracy matrix as markdown table lines (rows never evaluated are left out)."""
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    if zero_shot:
        lines.append("| zero-shot | " + " | ".join(fmt_number(x) for x in zero_shot) + " |")
    for i, t in enumerate(tasks):
        if any(x is not None for x in a[i]):
            lines.append(f"| {t} | " + " | ".join(fmt_number(x) for x in a[i]) + " |")
    return lines


def summary_markdown(results: dict[str, Any]) -> str:
    tasks, a = results["tasks"], results["accuracy_matrix"]
    lines = [f"### {results['method']} on {results['model']} ({len(tasks)} tasks)", "",
             *matrix_markdown(tasks, a, results.get("zero_shot"))]
    m = results["metrics"]
    lines += ["", f"OP {fmt_number(m['op'])} | BWT {fmt_number(m['bwt'], True)} | FWT {fmt_number(m['fwt'], True)}"
              + ("" if results["complete"] else "  (run not complete)")]
    skipped = _skipped_line(results.get("stages") or [])
    if skipped:
        lines += ["", skipped]
    return "\n".join(lines)


def _skipped_line(stages: Sequence[dict]) -> Optional[str]:
    """One line on the optimizer steps the engine skipped (non-finite loss, gradient or update, or an
    update torch refused as overflowing) over the stage records, or None when none was; e.g. ``Skipped: 3 of 24 inner steps
    (non-finite loss, gradient or update, or an update that overflowed); see trace.jsonl``."""
    def total(key: str) -> int:
        return sum(int(s.get(key) or 0) for s in stages)

    inner, replay, steps = total("skipped_steps"), total("skipped_replay_steps"), total("steps")
    if not inner and not replay:
        return None
    parts = []
    if inner:
        parts.append(f"all {steps} inner steps" if inner == steps else f"{inner} of {steps} inner steps")
    if replay:
        parts.append(f"{replay} replay step{'s' if replay != 1 else ''}")
    return f"Skipped: {' and '.join(parts)} (non-finite loss, gradient or update, or an update that overflowed); see trace.jsonl"


@dataclass
class RunResult:
    """What :func:`aimmerging.run` returns.

    ``accuracy_matrix[i][j]``: score on task j after training task i (None where not evaluated);
    ``metrics``: ``op``, ``bwt``, ``fwt`` (None where undefined); ``trace``: the trace records
    (dicts, see ``aimmerging.trace``); ``timings``: seconds per cost category; ``model``: the
    trained PEFT model (the adapter after the last stage); ``results``: the ``results.json``
    content; ``run_dir``: the run directory, or None when nothing was written."""

    tasks: list[str]
    accuracy_matrix: list[list[Optional[float]]]
    metrics: dict[str, Optional[float]]
    trace: list[dict]
    timings: dict[str, float]
    model: Any = field(repr=False)
    results: dict[str, Any] = field(repr=False)
    run_dir: Optional[Path] = None

    @property
    def op(self) -> Optional[float]:
        return self.metrics["op"]

    @property
    def bwt(self) -> Optional[float]:
        return self.metrics["bwt"]

    @property
    def fwt(self) -> Optional[float]:
        return self.metrics["fwt"]

    def summary(self) -> str:
        return summary_markdown(self.results)
