"""Bootstrap confidence intervals and verdicts for a study of continual-learning methods over
several task orders and training seeds. Pure functions of per-example scores (numpy only, no I/O).

**The data.** A study has *cells*, one per (order, seed). In a cell every method ran on the same
stream of T tasks. For a run, ``rows[r][task]`` holds the per-example scores on ``task`` of the
model after training tasks 0..r (row r of the accuracy matrix; ``a[r][j]`` is their mean), and
``ids[cell][task]`` names those examples. The cell's FWT reference ``single[task]`` holds the
per-example scores of an adapter trained on that task alone, on the same examples.

**The metrics** of one run (means of per-example scores, no rounding; j runs over the T tasks):

* OP  = mean_j a[T-1][j]
* BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])          (needs the diagonal: undefined for a joint run)
* FWT = mean_j (a[j][j] - single[j])                 (needs the diagonal and the reference)

A method's figure for the study is the mean over the cells where it has the metric.

**What is resampled.** The test examples and, with two seeds or more, the training seeds; the
task orders are fixed (the figure is the mean over these orders, not over orders in general).

* *Examples.* Every cell that scores the same test examples shares their draws: replicate b
  resamples, once for the whole study, the examples of each task (with replacement, as many as
  there are), keyed by (task, example id). Each cell, method, row and the ``single`` reference
  then take the replicate mean of their scores on task j with the counts of *their* examples:
  ``sum_i c_b[i] s[i] / sum_i c_b[i]`` (when every cell scores the same examples, the ordinary
  resample mean). So the three orders of a seed, all seeds (the test subset has its own seed),
  every method and the reference move together, as they scored the same examples; a stage copied
  from one order to another and a ``single`` run shared by every cell of a seed are the same
  scores resampled the same way, counted once in the uncertainty, not as independent evidence.
  Each task draws from its own generator, seeded with (seed, task), so the tasks are resampled
  independently and the draws do not depend on which cells or methods exist.
* *Seeds.* With two training seeds or more, replicate b also resamples the seeds (with
  replacement, as many as there are; all of a drawn seed's cells come in, with the seed's
  multiplicity as their weight), independently of the examples: the "pigeonhole" bootstrap of a
  crossed design (Owen 2007), so that the interval covers the training noise between seeds as well
  as the test-set sampling. With one seed it covers the test-set sampling only.

The point estimate is the metric on the full sample; the interval is the percentile interval
(2.5 % and 97.5 % of the B replicates for level 0.95).

**Differences and verdicts.** "reference minus m" is taken over the cells where both have the
metric, replicate by replicate on the shared draws. Its two-sided bootstrap p-value for "no
difference" is ``min(1, 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1))`` (the smallest alpha at
which the percentile interval excludes 0). Equivalence within a margin delta is two one-sided
tests (TOST): ``p_eq = max(#{d* <= -delta} + 1, #{d* >= delta} + 1) / (B + 1)``. The *primary*
comparisons (reference minus each method of a declared family, on OP) have both p-values
Holm-adjusted over the family; every other difference (BWT, FWT, methods outside the family) is
secondary and keeps its unadjusted p-values. At alpha = 1 - level a verdict is "win" or "loss"
when p < alpha (sign of the point; higher is better for all three metrics), else "equivalent"
when p_eq < alpha, else "undecided". A difference both significant and within the margin is a win
or loss with ``equivalent: true``.
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

METRICS = ("op", "bwt", "fwt")
ZERO = 1e-12  # below this, a point or a bound is 0 (the metrics are O(1): rounding noise is ~1e-16)
MARGIN = 0.02  # default equivalence margin (OP, BWT and FWT are all fractions of examples)
VERDICTS = ("win", "loss", "equivalent", "undecided")

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

def draw_counts(n: int, B: int, seed: int, key: str) -> np.ndarray:
    """(B, n) counts: row b says how often replicate b draws each of ``n`` units (n draws with
    replacement, so each row sums to n). Reproducible from (seed, key)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    idx = rng.integers(0, n, size=(B, n), dtype=np.int64)
    flat = idx + n * np.arange(B, dtype=np.int64)[:, None]
    return np.bincount(flat.ravel(), minlength=B * n).reshape(B, n).astype(float)


def _universe_key(cell: str, task: str) -> str:
    """The stratum an example of ``task`` in ``cell`` is resampled in: its task, whatever the
    cell (examples with the same id are the same example in every cell, hence the same draw)."""
    return task


def _keys(example_ids: Sequence) -> list[str]:
    """Example ids as resampling keys; a repeated id is a distinct example ("id", "id#1", ...)."""
    seen: dict[str, int] = {}
    out = []
    for x in example_ids:
        k = str(x)
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}#{n}")
    return out


def example_weights(ids: Mapping[str, Mapping[str, Sequence]], B: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{cell: {task: (B, n) counts}}: how often replicate b draws each example the cell scored on
    the task, from one draw per (task) stratum shared by every cell that scored the example."""
    universes: dict[str, list[str]] = {}
    keys = {c: {t: _keys(x) for t, x in by_task.items()} for c, by_task in ids.items()}
    for c, by_task in keys.items():
        for t, ks in by_task.items():
            universes.setdefault(_universe_key(c, t), []).extend(ks)
    counts, where = {}, {}
    for u, ks in universes.items():
        where[u] = {k: i for i, k in enumerate(sorted(set(ks)))}
        counts[u] = draw_counts(len(where[u]), B, seed, u)
    return {c: {t: counts[_universe_key(c, t)][:, [where[_universe_key(c, t)][k] for k in ks]]
                for t, ks in by_task.items()} for c, by_task in keys.items()}


def _replicate_mean(weights: Mapping[str, np.ndarray]) -> Mean:
    """a[r][task] for every replicate: the count-weighted mean of the scores (cached per array, as
    OP, BWT and FWT read the same entries). NaN in a replicate that drew none of the examples."""
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    totals = {t: w.sum(axis=1) for t, w in weights.items()}

    def mean(task: str, scores: np.ndarray) -> np.ndarray:
        key = (task, id(scores))
        hit = cache.get(key)
        if hit is None or hit[0] is not scores:
            with np.errstate(invalid="ignore", divide="ignore"):
                hit = cache[key] = (scores, weights[task] @ scores / totals[task])
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
    """The percentile interval [lo, hi] of the replicates (2.5 % and 97.5 % for level 0.95);
    replicates that are NaN (drew no example of a cell) are left out."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(replicates, [tail, 100 - tail])
    return [float(lo), float(hi)]


def p_values(replicates: np.ndarray, margin: float) -> tuple[float, float]:
    """(two-sided p for "no difference", TOST p for "within +-margin") of a difference's bootstrap
    replicates (the formulas of the module docstring; NaN replicates left out)."""
    r = replicates[np.isfinite(replicates)]
    n = len(r) + 1
    p = min(1.0, 2 * min(np.sum(r <= ZERO) + 1, np.sum(r >= -ZERO) + 1) / n)
    p_eq = min(1.0, max(np.sum(r <= -margin) + 1, np.sum(r >= margin) + 1) / n)
    return float(p), float(p_eq)


def holm(p: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values: the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    out, running = {}, 0.0
    ordered = sorted(p.items(), key=lambda kv: kv[1])
    for j, (name, value) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - j) * value))
        out[name] = running
    return out


def verdict(point: Optional[float], p: Optional[float], p_eq: Optional[float], alpha: float = 0.05) -> Optional[str]:
    """"win"/"loss" when p < alpha (by the sign of the point), else "equivalent" when p_eq < alpha,
    else "undecided" (an interval that merely contains 0 is never a verdict of its own)."""
    if point is None or p is None or p_eq is None:
        return None
    if p < alpha:
        return "win" if point > 0 else "loss"
    return "equivalent" if p_eq < alpha else "undecided"


def _snap(x: float) -> float:
    """0.0 for rounding noise around 0 (a difference of two means of the same scores summed in
    another order), so that a bound that is 0 in exact arithmetic is 0."""
    return 0.0 if abs(x) < ZERO else float(x)


def _combine(cells: list[str], replicates: list[np.ndarray], seed_weights: Optional[np.ndarray],
             seed_of: Mapping[str, int]) -> np.ndarray:
    """The (B,) replicates of a mean over ``cells``: plain, or weighted by each cell's seed's
    multiplicity in the replicate's resample of seeds (NaN where no drawn seed has a cell)."""
    stacked = np.vstack(replicates)
    if seed_weights is None:
        return stacked.mean(axis=0)
    w = np.vstack([seed_weights[:, seed_of[c]] for c in cells])  # (cells, B)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * stacked).sum(axis=0) / w.sum(axis=0)


def spread(points: Mapping[str, float], cell_reps: Mapping[str, np.ndarray], order_of: Mapping[str, int],
           seed_of: Mapping[str, int]) -> dict:
    """Training noise beside test-set noise, over the cells of one method and metric:

    * ``seed_sd``: the seed-to-seed standard deviation of a cell's figure, pooled within orders
      (sqrt of sum over orders of squared deviations from the order's mean over seeds, divided by
      sum over orders of (seeds - 1)); None without an order run with two seeds;
    * ``test_se``: one run's test-sampling standard error (the median over cells of the standard
      deviation of the cell's bootstrap replicates over the examples);
    * ``seeds``: the distinct seeds."""
    by_order: dict[int, list[float]] = {}
    for c, x in points.items():
        by_order.setdefault(order_of[c], []).append(x)
    ss = sum(float(np.sum((np.asarray(v) - np.mean(v)) ** 2)) for v in by_order.values())
    dof = sum(len(v) - 1 for v in by_order.values())
    ses = [float(np.nanstd(r, ddof=1)) for r in cell_reps.values() if np.sum(np.isfinite(r)) > 1]
    return {"seed_sd": float(np.sqrt(ss / dof)) if dof else None, "test_se": float(np.median(ses)) if ses else None,
            "seeds": len({seed_of[c] for c in points})}


def _summary(cells: list[str], points: list[float], replicates: list[np.ndarray], level: float,
             seed_weights: Optional[np.ndarray], seed_of: Mapping[str, int], order_of: Mapping[str, int]) -> dict:
    if not points:
        return {"point": None, "ci": None, "cells": 0, "seed_sd": None, "test_se": None, "seeds": 0}
    combined = _combine(cells, replicates, seed_weights, seed_of)
    out = {"point": _snap(np.mean(points)), "ci": [_snap(x) for x in interval(combined, level)], "cells": len(points)}
    out.update(spread(dict(zip(cells, points)), dict(zip(cells, replicates)), order_of, seed_of))
    out["_replicates"] = combined
    return out


# -- the study -------------------------------------------------------------------------------------

def bootstrap_study(runs: Mapping[str, Mapping[str, Rows]], tasks: Mapping[str, Sequence[str]],
                    singles: Optional[Mapping[str, Optional[Single]]] = None, *,
                    ids: Optional[Mapping[str, Mapping[str, Sequence]]] = None,
                    cell_seeds: Optional[Mapping[str, int]] = None, cell_orders: Optional[Mapping[str, int]] = None,
                    reference: str = "aimmerging", primary: Optional[Sequence[str]] = None, margin: float = MARGIN,
                    B: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Point estimates and bootstrap intervals of OP, BWT and FWT per method, and of the paired
    differences ``reference - m`` with their verdicts, over the cells of a study.

    ``runs[cell][method][row][task]``: per-example scores (1-d arrays) of the complete runs of a
    cell; ``tasks[cell]``: its task order; ``singles[cell]``: ``{task: scores}`` of its FWT
    reference, or None (FWT undefined in that cell). Within a cell the arrays of one task must
    score the same examples in the same order (checked: equal lengths; ValueError otherwise).
    ``ids[cell][task]``: the ids of those examples (default: their positions, i.e. example k of a
    task is the same example in every cell). ``cell_seeds`` / ``cell_orders``: each cell's
    training seed and task order (default: one seed, each cell its own order). ``primary``: the
    methods whose OP difference is a primary comparison (default: every method but the
    reference); ``margin``: the equivalence margin.

    Returns::

        {"B", "seed", "level", "reference", "margin", "alpha", "resampled": ["examples"(, "seeds")],
         "family": {"metric": "op", "methods": [...], "adjustment": "holm"},
         "methods": {m: {"cells", "op"|"bwt"|"fwt": {"point", "ci", "cells", "seed_sd", "test_se", "seeds"}}},
         "differences": {m: {"cells", "op"|...: {"point", "ci", "cells", "seed_sd", "test_se", "seeds",
                                                   "p", "p_eq", "primary", "p_adj", "p_eq_adj",
                                                   "verdict", "equivalent"}}},
         "cells": {cell: {"n_examples": {task: n}, "methods": {m: {"op", "bwt", "fwt"}}}}}

    where a metric's "cells" counts the cells that define it (a metric no cell defines has point
    and ci None). ``p_adj`` / ``p_eq_adj`` are the Holm-adjusted values of a primary comparison and
    equal ``p`` / ``p_eq`` otherwise; the verdict uses them. Points and bounds within 1e-12 of 0
    are 0."""
    if B < 1:
        raise ValueError(f"B must be at least 1, got {B}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    singles = singles or {}
    seed_of_cell = {c: int((cell_seeds or {}).get(c, 0)) for c in runs}
    order_of = {c: int((cell_orders or {}).get(c, i)) for i, c in enumerate(runs)}
    distinct = sorted(set(seed_of_cell.values()))
    seed_index = {c: distinct.index(s) for c, s in seed_of_cell.items()}
    seed_weights = draw_counts(len(distinct), B, seed, "\x00seeds") if len(distinct) > 1 else None

    prepared, cell_ids = {}, {}
    for cell, by_method in runs.items():
        cell_tasks = list(tasks[cell])
        by_method = {m: {int(r): {t: _scores(s) for t, s in by_task.items()} for r, by_task in rows.items()}
                     for m, rows in by_method.items()}
        single = singles.get(cell)
        single = None if single is None else {t: _scores(s) for t, s in single.items()}
        sizes = _sizes(cell, cell_tasks, by_method, single)
        given = (ids or {}).get(cell, {})
        for t, n in sizes.items():
            if ids is not None and t not in given:  # positions and ids would be keys of different examples
                raise ValueError(f"cell {cell}: no example ids for task {t!r} (give ids for every cell and task, or none)")
            if t in given and len(given[t]) != n:
                raise ValueError(f"cell {cell}: {len(given[t])} example ids for task {t!r}, {n} scores")
        cell_ids[cell] = {t: list(given[t]) if t in given else list(range(n)) for t, n in sizes.items()}
        prepared[cell] = (cell_tasks, by_method, single, sizes)
    weights = example_weights(cell_ids, B, seed)

    methods: list[str] = []
    points: dict[str, dict[str, dict]] = {}  # method -> cell -> metric -> point
    reps: dict[str, dict[str, dict]] = {}  # method -> cell -> metric -> (B,) replicates
    cells_out: dict[str, dict] = {}
    for cell, (cell_tasks, by_method, single, sizes) in prepared.items():
        mean = _replicate_mean(weights[cell])
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

    def summary(cells: list[str], pts: list[float], rs: list[np.ndarray]) -> dict:
        return _summary(cells, pts, rs, level, seed_weights, seed_index, order_of)

    out_methods = {}
    for m in methods:
        out_methods[m] = {"cells": len(points[m])}
        for k in METRICS:
            cs = defined(m, k)
            out_methods[m][k] = summary(cs, [points[m][c][k] for c in cs], [reps[m][c][k] for c in cs])

    differences = {}
    if reference in points:
        for m in methods:
            if m == reference:
                continue
            differences[m] = {"cells": len(set(points[reference]) & set(points[m]))}
            for k in METRICS:
                shared = [c for c in defined(reference, k) if points[m].get(c, {}).get(k) is not None]
                s = summary(shared, [points[reference][c][k] - points[m][c][k] for c in shared],
                            [reps[reference][c][k] - reps[m][c][k] for c in shared])
                s["p"], s["p_eq"] = p_values(s["_replicates"], margin) if s["point"] is not None else (None, None)
                differences[m][k] = s
    family = [m for m in (differences if primary is None else primary)
              if m in differences and differences[m]["op"]["point"] is not None]
    _decide(differences, family, 1 - level)
    for table in (out_methods, differences):
        for entry in table.values():
            for k in METRICS:
                entry[k].pop("_replicates", None)
    return {"B": B, "seed": seed, "level": level, "reference": reference, "margin": margin, "alpha": 1 - level,
            "resampled": ["examples", *(["seeds"] if seed_weights is not None else [])],
            "family": {"metric": "op", "methods": family, "adjustment": "holm"},
            "methods": out_methods, "differences": differences, "cells": cells_out}


def _decide(differences: dict, family: list[str], alpha: float) -> None:
    """Fill p_adj, p_eq_adj, primary, verdict and equivalent of every difference: Holm over the
    family's OP comparisons, unadjusted elsewhere."""
    adj = holm({m: differences[m]["op"]["p"] for m in family})
    adj_eq = holm({m: differences[m]["op"]["p_eq"] for m in family})
    for m, d in differences.items():
        for k in METRICS:
            s = d[k]
            s["primary"] = k == "op" and m in family
            s["p_adj"] = adj[m] if s["primary"] else s["p"]
            s["p_eq_adj"] = adj_eq[m] if s["primary"] else s["p_eq"]
            s["verdict"] = verdict(s["point"], s["p_adj"], s["p_eq_adj"], alpha)
            s["equivalent"] = None if s["p_eq_adj"] is None else bool(s["p_eq_adj"] < alpha)
