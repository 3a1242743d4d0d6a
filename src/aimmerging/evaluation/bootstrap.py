"""Bootstrap confidence intervals for a study of continual-learning methods over several task
orders and seeds. Pure functions of per-example scores (numpy only, no I/O).

**The data.** A study has *cells*, one per (order, seed). In a cell every method ran on the same
stream of T tasks and was scored on the same test examples of each task. For a run,
``rows[r][task]`` holds the per-example scores on ``task`` of the model after training tasks
0..r (row r of the accuracy matrix; ``a[r][j]`` is their mean). The cell's FWT reference
``single[task]`` holds the per-example scores of an adapter trained on that task alone.

**The metrics** of one run (means of per-example scores, no rounding; j runs over the T tasks):

* OP  = mean_j a[T-1][j]
* BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])          (needs the diagonal: undefined for a joint run)
* FWT = mean_j (a[j][j] - single[j])                 (needs the diagonal and the reference)

A method's figure for the study is the mean over the cells where it has the metric.

**The design.** The unit resampled is the test example, within each cell and task (a paired,
stratified bootstrap). Replicate b draws, for each cell and task j, n_j indices with
replacement; the *same* indices serve every method of the cell, every row's score on task j and
the single reference on task j, since all of them scored the same examples. Cells are resampled
independently; each (cell, task) draws from its own generator seeded with (seed, cell, task), so
the draws of a cell do not depend on which other cells or methods exist. The point estimate is
the metric on the full sample; the interval is the percentile interval (2.5 % and 97.5 % for
level 0.95) of the B replicates. A difference "reference minus m" is taken over the cells where
both have the metric, replicate by replicate on the shared draws, so what the examples have in
common cancels; its verdict is "win" when the interval lies above 0, "loss" below 0, else "tie"
(higher is better for all three metrics).

The interval covers the sampling of test examples only, not the training randomness (that is
what the several seeds and orders average over).
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

METRICS = ("op", "bwt", "fwt")
ZERO = 1e-12  # below this, a point or a bound is 0 (the metrics are O(1): rounding noise is ~1e-16)

Rows = Mapping[int, Mapping[str, np.ndarray]]  # row -> task -> per-example scores
Single = Mapping[str, np.ndarray]  # task -> per-example scores of the single reference
Mean = Callable[[str, np.ndarray], "float | np.ndarray"]


# -- one run ---------------------------------------------------------------------------------------

def _metrics(rows: Rows, tasks: Sequence[str], single: Optional[Single], mean: Mean) -> dict:
    """OP, BWT, FWT of one run, with ``mean(task, scores)`` giving a[r][task] (a float, or a (B,)
    array of replicate means). A metric whose entries are missing is None."""
    T = len(tasks)
    last = rows.get(T - 1, {})
    final = [last[t] for t in tasks if t in last]
    diagonal = [rows[j][t] for j, t in enumerate(tasks) if t in rows.get(j, {})]
    out: dict = dict.fromkeys(METRICS)
    if T == 0:
        return out
    if len(final) == T:
        out["op"] = sum(mean(t, s) for t, s in zip(tasks, final)) / T
        if T >= 2 and len(diagonal) == T:
            out["bwt"] = sum(mean(t, final[j]) - mean(t, diagonal[j]) for j, t in enumerate(tasks[:-1])) / (T - 1)
    if len(diagonal) == T and single is not None and all(t in single for t in tasks):
        out["fwt"] = sum(mean(t, diagonal[j]) - mean(t, single[t]) for j, t in enumerate(tasks)) / T
    return out


def run_metrics(rows: Rows, tasks: Sequence[str], single: Optional[Single] = None) -> dict:
    """Point estimates {"op", "bwt", "fwt"} of one run from its per-example scores (None where
    undefined: BWT and FWT of a run without the diagonal, FWT without the reference)."""
    return {k: None if v is None else float(v)
            for k, v in _metrics(rows, tasks, single, lambda _t, s: np.asarray(s, dtype=float).mean()).items()}


# -- resampling ------------------------------------------------------------------------------------

def draw_indices(n: int, B: int, seed: int, cell: str, task: str) -> np.ndarray:
    """The (B, n) indices, drawn with replacement, that every replicate uses for ``task`` in
    ``cell``: replicate b's sample is ``scores[idx[b]]``. Reproducible from (seed, cell, task)."""
    rng = np.random.default_rng([seed, zlib.crc32(cell.encode("utf-8")), zlib.crc32(task.encode("utf-8"))])
    return rng.integers(0, n, size=(B, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)


def _replicate_mean(idx: Mapping[str, np.ndarray]) -> Mean:
    """a[r][task] for every replicate: the mean of the scores at the shared indices (cached per
    array, as OP, BWT and FWT read the same entries)."""
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def mean(task: str, scores: np.ndarray) -> np.ndarray:
        key = (task, id(scores))
        hit = cache.get(key)
        if hit is None or hit[0] is not scores:
            hit = cache[key] = (scores, scores[idx[task]].mean(axis=1))
        return hit[1]

    return mean


def _scores(x) -> np.ndarray:
    scores = np.asarray(x, dtype=float)
    if scores.ndim != 1:
        raise ValueError(f"per-example scores must be a 1-d array, got shape {scores.shape}")
    return scores


def _sizes(cell: str, tasks: Sequence[str], runs: Mapping[str, Rows], single: Optional[Single]) -> dict[str, int]:
    """The number of test examples of each task of a cell, checked equal across every run, row
    and the reference (the pairing needs the same examples)."""
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    arrays = [(f"{m} row {r}", t, s) for m, rows in runs.items() for r, by_task in rows.items() for t, s in by_task.items()]
    arrays += [("the single reference", t, s) for t, s in (single or {}).items() if t in tasks]
    for what, task, scores in arrays:
        if task not in tasks:
            raise ValueError(f"cell {cell}: {what} has scores on {task!r}, which is not one of its tasks {list(tasks)}")
        n = len(scores)
        if n == 0:
            raise ValueError(f"cell {cell}: {what} has no scored example of task {task!r}")
        if sizes.setdefault(task, n) != n:
            raise ValueError(f"cell {cell}: {what} scored {n} examples of task {task!r}, "
                             f"{where[task]} scored {sizes[task]}: the runs of a cell must score the same examples")
        where.setdefault(task, what)
    return sizes


# -- summaries -------------------------------------------------------------------------------------

def interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval [lo, hi] of the replicates (2.5 % and 97.5 % for level 0.95)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(replicates, [tail, 100 - tail])
    return [float(lo), float(hi)]


def verdict(ci: Optional[Sequence[float]]) -> Optional[str]:
    """"win" when the interval of a difference lies above 0, "loss" below 0, "tie" otherwise."""
    if ci is None:
        return None
    lo, hi = ci
    return "win" if lo > 0 else "loss" if hi < 0 else "tie"


def _snap(x: float) -> float:
    """0.0 for rounding noise around 0 (a difference of two means of the same scores summed in
    another order), so that a bound that is 0 in exact arithmetic gives a "tie", never a "win"."""
    return 0.0 if abs(x) < ZERO else float(x)


def _summary(points: list[float], replicates: list[np.ndarray], level: float) -> dict:
    if not points:
        return {"point": None, "ci": None, "cells": 0}
    return {"point": _snap(np.mean(points)), "ci": [_snap(x) for x in interval(np.mean(replicates, axis=0), level)],
            "cells": len(points)}


# -- the study -------------------------------------------------------------------------------------

def bootstrap_study(runs: Mapping[str, Mapping[str, Rows]], tasks: Mapping[str, Sequence[str]],
                    singles: Optional[Mapping[str, Optional[Single]]] = None, *, reference: str = "aimmerging",
                    B: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Point estimates and bootstrap intervals of OP, BWT and FWT per method, and of the paired
    differences ``reference - m``, over the cells of a study.

    ``runs[cell][method][row][task]``: per-example scores (1-d arrays) of the complete runs of a
    cell; ``tasks[cell]``: its task order; ``singles[cell]``: ``{task: scores}`` of its FWT
    reference, or None (FWT undefined in that cell). Within a cell the arrays of one task must
    score the same examples in the same order (checked: equal lengths; ValueError otherwise).

    Returns::

        {"B", "seed", "level", "reference",
         "methods": {m: {"cells": runs of m, "op"|"bwt"|"fwt": {"point", "ci": [lo, hi], "cells"}}},
         "differences": {m: {"cells": cells where both ran, "op"|...: {"point", "ci", "cells", "verdict"}}},
         "cells": {cell: {"n_examples": {task: n}, "methods": {m: {"op", "bwt", "fwt"}}}}}

    where a metric's "cells" counts the cells that define it (a metric no cell defines has point
    and ci None). ``differences`` ("reference minus m") has every method but the reference, and
    is empty when the reference has no run. Points and bounds within 1e-12 of 0 are 0."""
    if B < 1:
        raise ValueError(f"B must be at least 1, got {B}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    singles = singles or {}
    methods: list[str] = []
    points: dict[str, dict[str, dict]] = {}  # method -> cell -> metric -> point
    reps: dict[str, dict[str, dict]] = {}  # method -> cell -> metric -> (B,) replicates
    cells_out: dict[str, dict] = {}
    for cell, by_method in runs.items():
        cell_tasks = list(tasks[cell])
        by_method = {m: {int(r): {t: _scores(s) for t, s in by_task.items()} for r, by_task in rows.items()}
                     for m, rows in by_method.items()}
        single = singles.get(cell)
        single = None if single is None else {t: _scores(s) for t, s in single.items()}
        sizes = _sizes(cell, cell_tasks, by_method, single)
        idx = {t: draw_indices(n, B, seed, cell, t) for t, n in sizes.items()}
        mean = _replicate_mean(idx)
        cells_out[cell] = {"n_examples": {t: sizes[t] for t in cell_tasks if t in sizes}, "methods": {}}
        for method, rows in by_method.items():
            if method not in points:
                methods.append(method)
            point = run_metrics(rows, cell_tasks, single)
            points.setdefault(method, {})[cell] = point
            reps.setdefault(method, {})[cell] = _metrics(rows, cell_tasks, single, mean)
            cells_out[cell]["methods"][method] = point

    def defined(method: str, metric: str) -> list[str]:
        return [c for c, p in points.get(method, {}).items() if p[metric] is not None]

    out_methods = {}
    for m in methods:
        out_methods[m] = {"cells": len(points[m])}
        for k in METRICS:
            cs = defined(m, k)
            out_methods[m][k] = _summary([points[m][c][k] for c in cs], [reps[m][c][k] for c in cs], level)

    differences = {}
    if reference in points:
        for m in methods:
            if m == reference:
                continue
            differences[m] = {"cells": len(set(points[reference]) & set(points[m]))}
            for k in METRICS:
                shared = [c for c in defined(reference, k) if points[m].get(c, {}).get(k) is not None]
                s = _summary([points[reference][c][k] - points[m][c][k] for c in shared],
                             [reps[reference][c][k] - reps[m][c][k] for c in shared], level)
                s["verdict"] = verdict(s["ci"])
                differences[m][k] = s

    return {"B": B, "seed": seed, "level": level, "reference": reference,
            "methods": out_methods, "differences": differences, "cells": cells_out}
