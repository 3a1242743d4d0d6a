"""PNG plots of a finished run: ``aimmerging plot RUN_DIR`` writes them into ``RUN_DIR/plots/``.

Per task with step records (``NN`` = two-digit stage index, as in ``stages/NN-<task>/``)::

    NN-<task>_history_loss.png     history loss per step, forgetting threshold, merges
    NN-<task>_learning_signal.png  learning signal of every merge
    NN-<task>_interval.png         merge interval in force at every step, next interval at merges
    NN-<task>_train_loss.png       training loss per step (validation / replay loss if recorded), merges

and for the whole run ``accuracy_matrix.png``. A plot whose data the run did not record (no
history loss for ``seq`` or for the first task, no merges, ...) is skipped, not drawn empty.

Figures are drawn on matplotlib's non-interactive Agg canvas without pyplot (no global state, no
display needed, and a caller's own backend is left alone); matplotlib is imported only when a
plot is drawn, so importing this module stays cheap. Every file is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..io import atomic_write
from ..runs.layout import RunLayout
from ..runs.results import fmt_number, read_results
from ..trace import TaskTrace, read_trace, split_tasks

FIGSIZE = (8.0, 4.5)
DPI = 120
SERIES = "#333333"  # the plotted quantity; colours are kept for merge reasons
THRESHOLD = "tab:red"
# colour and line style of the merge markers, by MergeDecision.reason
REASONS = {
    "planned": ("tab:green", "-"),
    "early": ("tab:orange", "--"),
    "signal": ("tab:blue", "-."),
    "forced": ("tab:purple", ":"),
    "fixed": ("tab:cyan", "-"),
    "end": ("tab:brown", "-"),
}
OTHER_REASON = ("tab:gray", "-")


# -- reading a run directory ---------------------------------------------------------------------

def load_run(run_dir: str | os.PathLike) -> tuple[dict, list[TaskTrace]]:
    """results.json and the per-task traces of a run directory; UserError if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    results_path = RunLayout(run_dir).results
    if not results_path.is_file():
        raise UserError(f"{run_dir}: not an aimmerging run directory (no results.json)")
    try:
        results = read_results(run_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{results_path}: cannot read: {e}") from None
    if not isinstance(results, dict) or not isinstance(results.get("accuracy_matrix"), list) \
            or not isinstance(results.get("tasks"), list):
        raise UserError(f"{results_path}: not the results.json of an aimmerging run (no tasks / accuracy_matrix)")
    a, T = results["accuracy_matrix"], len(results["tasks"])
    if len(a) != T or not all(isinstance(row, list) and len(row) == T for row in a):
        raise UserError(f"{results_path}: accuracy_matrix is not {T} x {T} (one row and column per task)")
    trace_path = RunLayout(run_dir).trace
    if not trace_path.is_file():
        hint = " (the run is not complete; trace.jsonl is written at its end)" if results.get("complete") is False else ""
        raise UserError(f"{trace_path}: not found{hint}")
    label = f"{results.get('method', '?')} on {results.get('model', '?')}"
    return results, split_tasks(read_trace(trace_path), label)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records with a finite number under ``key``."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


# -- drawing helpers -----------------------------------------------------------------------------

def _new_axes(title: str, xlabel: str, ylabel: str, figsize=FIGSIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return fig, ax


def _title(trace: TaskTrace, what: str) -> str:
    return f"{what}: {trace.stem} ({trace.label})"


def _step_axis(ax, trace: TaskTrace) -> None:
    last = max([r["step"] for r in trace.steps + trace.merges], default=1)
    ax.set_xlim(0, max(last, 1) + 0.5)


def _mark_merges(ax, merges: list[dict]) -> None:
    """One vertical line per merge, coloured and styled by reason; one legend entry per reason."""
    lw = 1.6 if len(merges) <= 40 else 0.6
    seen = set()
    for m in merges:
        reason = str(m.get("reason"))
        color, style = REASONS.get(reason, OTHER_REASON)
        ax.axvline(m["step"], color=color, linestyle=style, linewidth=lw, alpha=0.7, zorder=1,
                   label=None if reason in seen else f"merge ({reason})")
        seen.add(reason)


def _scatter_by_reason(ax, merges: list[dict], key: str, **kw) -> None:
    by_reason: dict[str, list[dict]] = {}
    for m in merges:
        by_reason.setdefault(str(m.get("reason")), []).append(m)
    for reason, ms in by_reason.items():
        xs, ys = _series(ms, key)
        if xs:
            ax.scatter(xs, ys, color=REASONS.get(reason, OTHER_REASON)[0], zorder=3,
                       label=f"merge ({reason})", **kw)


def _legend(ax) -> None:
    """Series first, then merges in the order of REASONS; outside the axes when it is long."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    order = {f"merge ({r})": n for n, r in enumerate(REASONS, 1)}
    pairs = sorted(zip(handles, labels), key=lambda hl: order.get(hl[1], 0 if not hl[1].startswith("merge") else 99))
    handles, labels = zip(*pairs)
    if len(handles) > 3:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    else:
        ax.legend(handles, labels, loc="best", fontsize="small", framealpha=0.9)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


# -- one function per plot kind --------------------------------------------------------------------

def plot_history_loss(trace: TaskTrace, path: str | os.PathLike) -> Optional[Path]:
    """History loss (loss on the replay memory) per step, the forgetting threshold as a step-wise
    line where defined, steps at or above a threshold already in force, and the merges."""
    xs, ys = _series(trace.steps, "history_loss")
    if not xs:
        return None
    fig, ax = _new_axes(_title(trace, "History loss"), "inner step", "history loss (replay memory)")
    ax.plot(xs, ys, color=SERIES, linewidth=0.8, marker="o", markersize=3, label="history loss")
    thresholds = [_number(r.get("threshold")) for r in trace.steps]
    for n, (first, last, value) in enumerate(_constant_runs([r["step"] for r in trace.steps], thresholds)):
        ax.plot([first, last], [value, value], color=THRESHOLD, linestyle="--", linewidth=1.4,
                marker="|" if first == last else None, label=None if n else "forgetting threshold")
    above = _above_threshold(trace.steps)
    if above:
        ax.scatter(*zip(*above), facecolors="none", edgecolors=THRESHOLD, s=50, zorder=4, label="at/above threshold")
    _mark_merges(ax, trace.merges)
    _step_axis(ax, trace)
    _legend(ax)
    return save_figure(fig, path)


def _above_threshold(steps: list[dict]) -> list[tuple[Any, float]]:
    """(step, history loss) of the steps whose history loss reached a threshold that was already in
    force before the step (the step that fills the window and sets the threshold is not one)."""
    points, previous = [], None
    for r in steps:
        h, t = _number(r.get("history_loss")), _number(r.get("threshold"))
        if previous is not None and t is not None and h is not None and h >= t:
            points.append((r["step"], h))
        previous = t
    return points


def _constant_runs(xs: list, values: list[Optional[float]]) -> list[tuple[Any, Any, float]]:
    """(first x, last x, value) of every run of consecutive equal, non-None values."""
    runs: list[list] = []
    for x, v, prev in zip(xs, values, [None] + values[:-1]):
        if v is None:
            continue
        if prev == v and runs:
            runs[-1][1] = x
        else:
            runs.append([x, x, v])
    return [tuple(r) for r in runs]


def plot_learning_signal(trace: TaskTrace, path: str | os.PathLike) -> Optional[Path]:
    """Learning signal of every merge against the step of the merge."""
    xs, ys = _series(trace.merges, "learning_signal")
    if not xs:
        return None
    fig, ax = _new_axes(_title(trace, "Learning signal"), "inner step of the merge",
                        "learning signal  Λ = |Δ_in|₁ / normaliser")
    ax.plot(xs, ys, color=SERIES, linewidth=0.8, alpha=0.6)
    _scatter_by_reason(ax, trace.merges, "learning_signal", s=30)
    if len(xs) <= 10:  # few merges: their values are worth reading
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize="small")
    ax.set_ylim(0, max(ys) * 1.12 or 1.0)  # a signal is >= 0
    _step_axis(ax, trace)
    _legend(ax)
    return save_figure(fig, path)


def plot_interval(trace: TaskTrace, path: str | os.PathLike) -> Optional[Path]:
    """Merge interval in force at every step, and the interval each merge chose next."""
    xs, ys = _series(trace.steps, "interval")
    if not xs or (trace.controller or {}).get("schedule") == "end" \
            or (trace.merges and all(m.get("reason") == "end" for m in trace.merges)):
        return None  # the end schedule records an interval it never uses
    fig, ax = _new_axes(_title(trace, "Merge interval"), "inner step", "merge interval S (steps)")
    ax.plot(xs, ys, color=SERIES, linewidth=1.4, drawstyle="steps-pre", label="interval in force")
    _scatter_by_reason(ax, trace.merges, "next_interval", s=36, marker="v")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    _step_axis(ax, trace)
    _legend(ax)
    if trace.merges:
        ax.text(0.01, 0.02, "▼ = interval chosen at the merge", transform=ax.transAxes, fontsize="small", color="0.4")
    return save_figure(fig, path)


def plot_train_loss(trace: TaskTrace, path: str | os.PathLike) -> Optional[Path]:
    """Training loss per step, validation loss and the selected checkpoint (select_best) and the
    replay loss of every merge where recorded, and the merges."""
    xs, ys = _series(trace.steps, "train_loss")
    if not xs:
        return None
    fig, ax = _new_axes(_title(trace, "Training loss"), "inner step", "loss")
    ax.plot(xs, ys, color=SERIES, linewidth=0.9, alpha=0.5 if len(xs) > 100 else 1.0, label="training loss")
    if len(xs) > 100:  # long runs: a running mean over ~2% of the steps
        w = max(2, len(ys) // 50)
        mean = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, mean, color="black", linewidth=1.6, label=f"running mean ({w} steps)")
    vx, vy = _series(trace.steps, "val_loss")
    if vx:
        ax.plot(vx, vy, color="tab:olive", marker="s", markersize=4, linewidth=1, label="validation loss")
    bx, by = _series([trace.best] if trace.best else [], "val_loss")
    if bx:
        ax.scatter(bx, by, color="tab:olive", marker="*", s=160, zorder=5, edgecolors="black", linewidths=0.5,
                   label="selected checkpoint")
    rx, ry = _series(trace.merges, "replay_loss")
    if rx:
        ax.scatter(rx, ry, color=THRESHOLD, marker="D", s=22, zorder=4, label="replay loss (at merge)")
    _mark_merges(ax, trace.merges)
    _step_axis(ax, trace)
    _legend(ax)
    return save_figure(fig, path)


def plot_accuracy_matrix(results: dict, path: str | os.PathLike) -> Path:
    """Heat map of the accuracy matrix: row i = after training task i, column j = scored on task j."""
    import numpy as np

    tasks = [str(t) for t in results["tasks"]]
    T = len(tasks)
    values = np.array([[math.nan if _number(x) is None else x for x in row] for row in results["accuracy_matrix"]],
                      dtype=float).reshape(T, T)
    metrics = results.get("metrics") or {}
    title = (f"Accuracy matrix: {results.get('method', '?')} on {results.get('model', '?')}\n"
             f"OP {_fmt(metrics.get('op'))}   BWT {_fmt(metrics.get('bwt'), signed=True)}   "
             f"FWT {_fmt(metrics.get('fwt'), signed=True)}")
    size = FIGSIZE if T <= 6 else (max(FIGSIZE[0], 0.75 * T + 3), max(FIGSIZE[1], 0.6 * T + 1.5))
    fig, ax = _new_axes(title, "evaluated on task j", "after training on task i", figsize=size)
    ax.grid(False)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="score")
    ax.set_xticks(range(T), tasks, rotation=30 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T), [f"{i + 1}. {t}" for i, t in enumerate(tasks)])
    fontsize = "medium" if T <= 6 else ("small" if T <= 10 else "x-small")
    for i in range(T):
        for j in range(T):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="black" if values[i, j] > 0.6 else "white")
    return save_figure(fig, path)


def _number(x: Any) -> Optional[float]:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _fmt(x: Any, signed: bool = False) -> str:
    return fmt_number(x, signed, missing="–")


# -- the whole run ---------------------------------------------------------------------------------

TASK_PLOTS = (("history_loss", plot_history_loss), ("learning_signal", plot_learning_signal),
              ("interval", plot_interval), ("train_loss", plot_train_loss))


def plot_task(trace: TaskTrace, out_dir: str | os.PathLike) -> list[Path]:
    """The per-task plots of one task that has data; returns the paths written."""
    if not trace.steps:
        return []
    written = []
    for kind, plot in TASK_PLOTS:
        path = plot(trace, Path(out_dir) / f"{trace.stem}_{kind}.png")
        if path is not None:
            written.append(path)
    return written


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Every plot of a run directory, written into ``RUN_DIR/plots/``; returns the paths written."""
    results, traces = load_run(run_dir)
    out_dir = RunLayout(run_dir).plots
    if out_dir.is_dir():  # temporary files of a plotting run that was killed
        for stray in out_dir.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
    written = [plot_accuracy_matrix(results, out_dir / "accuracy_matrix.png")]
    for trace in traces:
        written += plot_task(trace, out_dir)
    return written
