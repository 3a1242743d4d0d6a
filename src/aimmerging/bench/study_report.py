"""The report of a study: several benches of the same methods over task orders and seeds, with
bootstrap confidence intervals (the statistics are in :mod:`aimmerging.evaluation.bootstrap`).

Layout read (nothing else in the study directory is looked at)::

    STUDY/o<order>-s<seed>/<method>/   one run directory per method and (order, seed) cell
    STUDY/single-s<seed>/              the FWT reference of that seed: a run of ``single``
    STUDY/report.json, report.md, report.png   written by :func:`write_study_report`
    ARCHIVE/<cell>/<method>.json       (``--archive``) finished runs of earlier sessions, as
                                       records (:mod:`.study_archive`); a run finished in STUDY wins

Only runs whose ``results.json`` says ``"complete": true`` (or archived) are used; any other method
of a cell (incomplete, not started, listed in the cell's ``bench.yaml`` but absent) is reported as
missing. Per-example scores come from ``stages/<NN>-<task>/predictions/<task>.jsonl`` of every stage
with a ``row`` (a zero-shot stage is ignored); the runs of a cell must have scored the same test
examples (ids, in order) of each task, or a :class:`StudyDataError` (a ValueError) names the two
runs. A cell has FWT only when its seed's ``single`` run is complete and scored the same test
examples of every task of the cell; otherwise the reason is reported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..evaluation.bootstrap import MARGIN, METRICS, bootstrap_study
from ..io import atomic_write_json, atomic_write_text
from ..runs.layout import is_run_dir
from ..runs.results import fmt_number
from .study_archive import (CELL_DIR, StudyDataError, bench_methods, differs, id_problem, read_archives, record_rows,
                            run_record, run_status, single_scores)

LABELS = {"op": "OP", "bwt": "BWT", "fwt": "FWT"}


# -- reading ---------------------------------------------------------------------------------------

def _cell_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in CELL_DIR.match(name).groups())


class _Runs:
    """Where each run of a study is read from: its run directory when finished there, else the
    archive; disagreements between the two are collected in ``conflicts`` (one line each)."""

    def __init__(self, study: Path, archive: Optional[str | os.PathLike]):
        self.study = study
        self.archived = read_archives(archive) if archive is not None else {}
        self.conflicts: list[str] = []

    def load(self, run_dir: Path, cell: str, method: str) -> tuple[Optional[dict], Optional[dict], str, Any]:
        """(results of the run directory or None, record or None, status, where the record is from)."""
        results, status = run_status(run_dir)
        entry = self.archived.get((cell, method))
        if status == "complete":
            record = run_record(run_dir, cell, method, results=results)
            field = differs(record, entry[0]) if entry is not None else None
            if field is not None:
                self.conflicts.append(f"{cell}/{method}: the run directory and {entry[1]} disagree ({field}); "
                                      "the run directory's is used")
            return results, record, status, run_dir
        if entry is not None:
            return results, entry[0], "complete", entry[1]
        return results, None, status, None


def collect_study(study_dir: str | os.PathLike, archive: Optional[str | os.PathLike] = None) -> dict:
    """Everything the report needs from a study directory (and the archive directory ``archive``,
    whose runs count as finished; a run finished in both is read from the study directory).

    Returns ``{"study_dir", "methods": [names, in report order], "cells": {cell: {"order", "seed",
    "tasks" (None when no run of the cell says), "runs": {method: {row: {task: scores}}} (complete
    runs only), "traces": {method: the record's trace}, "ids": {task: example ids of those scores},
    "single": {task: scores} or None, "single_dir", "fwt_note" (why the cell has no FWT, or None)}},
    "missing": [{"cell", "method", "status"}], "references": {seed: {"dir", "status"}}, "conflicts":
    [one line per run whose directory and archive file disagree]}``. Raises
    :class:`StudyDataError` when complete runs of a cell disagree on tasks or test examples, or an
    archive file is damaged; UserError when ``study_dir`` is not a directory (it need not exist
    when an archive is given)."""
    study = Path(study_dir)
    if not study.is_dir() and (archive is None or study.exists()):
        raise UserError(f"{study}: not a directory")
    runs = _Runs(study, archive)
    dirs = {d.name: d for d in study.iterdir() if d.is_dir() and CELL_DIR.match(d.name)} if study.is_dir() else {}
    names = sorted(set(dirs) | {c for c, _m in runs.archived if CELL_DIR.match(c)}, key=_cell_key)
    order: list[str] = []
    for c in names:
        listed = bench_methods(dirs[c]) if c in dirs else []
        listed += [m for (cell, _m), (record, _p) in runs.archived.items() if cell == c for m in record["bench_methods"]]
        order += [m for m in dict.fromkeys(listed) if m not in order]
    found = {r.name for d in dirs.values() for r in d.iterdir() if is_run_dir(r)}
    found |= {m for c, m in runs.archived if CELL_DIR.match(c)}
    methods = order + sorted(found - set(order))

    references: dict[str, dict] = {}
    singles: dict[str, Optional[tuple]] = {}
    for seed in sorted({CELL_DIR.match(c).group(2) for c in names}, key=int):
        ref_dir = study / f"single-s{seed}"
        _results, record, status, origin = runs.load(ref_dir, ref_dir.name, "single")
        references[seed] = {"dir": ref_dir.name, "status": status}
        singles[seed] = (single_scores(record), record["ids"], origin) if record is not None else None

    cells: dict[str, dict] = {}
    missing: list[dict] = []
    for c in names:
        order_s, seed = CELL_DIR.match(c).groups()
        cell = {"order": int(order_s), "seed": int(seed), "tasks": None, "runs": {}, "traces": {}, "single": None,
                "single_dir": references[seed]["dir"], "fwt_note": None, "ids": {}}
        ids: dict[str, tuple[list, Any]] = {}
        first: Any = None
        for m in methods:
            results, record, status, origin = runs.load(dirs.get(c, study / c) / m, c, m)
            if results and cell["tasks"] is None and isinstance(results.get("tasks"), list):
                cell["tasks"] = list(results["tasks"])  # provisional, from any run; a complete one wins
            if record is None:
                missing.append({"cell": c, "method": m, "status": status})
                continue
            tasks = list(record.get("tasks") or [])
            if first is None:
                first, cell["tasks"] = origin, tasks
            elif tasks != cell["tasks"]:
                raise StudyDataError(f"{origin}: tasks {tasks} differ from {cell['tasks']} of {first}; "
                                     "the runs of a cell must share the task order")
            for task, task_ids in record["ids"].items():
                if task not in tasks:
                    raise StudyDataError(f"{origin}: task {task!r} is not one of the run's tasks {tasks}")
                if task in ids and ids[task][0] != task_ids:
                    raise StudyDataError(id_problem(task, origin, ids[task][1]))
                ids.setdefault(task, (task_ids, origin))
            cell["runs"][m], cell["traces"][m] = record_rows(record), record["trace"]
        cell["ids"] = {task: task_ids for task, (task_ids, _origin) in ids.items()}
        if first is not None:
            cell["single"], cell["fwt_note"] = _cell_reference(references[seed], singles[seed], cell["tasks"], ids)
        cells[c] = cell
    for seed, ref in references.items():
        if ref["status"] != "complete":
            missing.append({"cell": ref["dir"], "method": "single", "status": f"{ref['status']} (the FWT reference)"})
    return {"study_dir": str(study), "methods": methods, "cells": cells, "missing": missing, "references": references,
            "conflicts": runs.conflicts}


def _cell_reference(ref: dict, single: Optional[tuple], tasks: list[str],
                    ids: dict[str, tuple[list, Any]]) -> tuple[Optional[dict], Optional[str]]:
    """The cell's FWT reference {task: scores}, or None and the reason."""
    if single is None:
        return None, f"{ref['dir']}: {ref['status']}"
    scores, single_ids, origin = single
    for task in tasks:
        if task not in scores:
            return None, f"{ref['dir']} has no stage scoring task {task!r}"
        if task in ids and single_ids.get(task) != ids[task][0]:
            return None, f"{origin} scored other test examples of task {task!r} than {ids[task][1]}"
    return {t: scores[t] for t in tasks}, None


# -- the report ------------------------------------------------------------------------------------

DESIGN = ("percentile bootstrap: the test examples of each task resampled once per replicate, keyed by (task, "
          "example id), with the same draws for every cell that scored them (all orders and seeds), every method "
          "and the single reference; with two seeds or more the seeds are resampled too (independently of the "
          "examples); orders are fixed; a method's figure is the mean over its cells")


def build_study_report(study_dir: str | os.PathLike, reference: str = "aimmerging", B: int = 2000,
                       seed: int = 0, level: float = 0.95, primary: Optional[list[str]] = None,
                       margin: float = MARGIN, archive: Optional[str | os.PathLike] = None) -> dict:
    """The study's report (JSON-serialisable)::

        {"study_dir", "reference",
         "bootstrap": {"B", "seed", "level", "design", "resampled"},
         "comparisons": {"family": [methods], "metric": "op", "adjustment": "holm", "alpha", "margin",
                         "p_values", "rule"},
         "methods": {m: {"cells": complete runs, "op"|"bwt"|"fwt": {"point", "ci": [lo, hi], "cells",
                                                                   "seed_sd", "test_se", "seeds"}}},
         "differences": {m: {"cells": cells where both ran,  # reference minus m
                             "op"|"bwt"|"fwt": {"point", "ci", "cells", "seed_sd", "test_se", "seeds",
                                                "p", "p_eq", "primary", "p_adj", "p_eq_adj",
                                                "verdict", "equivalent"}}},
         "cells": {cell: {"order", "seed", "tasks", "n_examples": {task: n}, "single", "fwt_note",
                          "methods": {m: {"op", "bwt", "fwt"}}}},
         "missing": [{"cell", "method", "status"}],
         "references": {seed: {"dir", "status"}},
         "traces": {cell: {method: {"merges", "selection"}}},
         "archive": {"dir", "conflicts": [one line each]}}   # only with an archive

    ``archive``: a directory of archived runs read too (:func:`collect_study`). Every method seen (a run directory in a cell, or listed in a cell's bench.yaml) is in
    "methods", with 0 cells and null figures when it has no complete run. ``primary``: the
    family of primary comparisons (``reference`` minus each of these methods on OP, Holm-adjusted;
    default every other method with a complete run); ``margin``: the equivalence margin (TOST).
    UserError when no cell has a complete run yet, or a primary method is not in the study."""
    study = collect_study(study_dir, archive)
    used = {c: cell for c, cell in study["cells"].items() if cell["runs"]}
    if not used:
        cells = ", ".join(study["cells"]) or "no o<order>-s<seed> directory"
        raise UserError(f"{study_dir}: no finished run yet ({cells}); run the study first, "
                        "or wait for a run to complete")
    # the default reference may not have finished a run yet (the report covers the others); a variant
    # named as the reference (--reference) must be there
    if reference not in study["methods"] and reference != "aimmerging":
        raise UserError(f"--reference: {reference} is not a method of the study (methods: {', '.join(study['methods'])})")
    unknown = [m for m in primary or [] if m not in study["methods"] or m == reference]
    if unknown:
        raise UserError(f"--primary: {', '.join(unknown)} is not a method of the study other than {reference} "
                        f"(methods: {', '.join(study['methods'])})")
    if not margin > 0:
        raise UserError(f"--equivalence-margin: must be > 0, got {margin}")
    boot = bootstrap_study({c: cell["runs"] for c, cell in used.items()}, {c: cell["tasks"] for c, cell in used.items()},
                           {c: cell["single"] for c, cell in used.items()},
                           ids={c: cell["ids"] for c, cell in used.items()},
                           cell_seeds={c: cell["seed"] for c, cell in used.items()},
                           cell_orders={c: cell["order"] for c, cell in used.items()},
                           reference=reference, primary=primary, margin=margin, B=B, seed=seed, level=level)
    empty = {"point": None, "ci": None, "cells": 0, "seed_sd": None, "test_se": None, "seeds": 0}
    no_test = {"p": None, "p_eq": None, "primary": False, "p_adj": None, "p_eq_adj": None, "verdict": None,
               "equivalent": None}
    methods = {m: boot["methods"].get(m, {"cells": 0, **{k: dict(empty) for k in METRICS}}) for m in study["methods"]}
    differences = {}
    if reference in boot["methods"]:
        differences = {m: boot["differences"].get(m, {"cells": 0, **{k: {**empty, **no_test} for k in METRICS}})
                       for m in study["methods"] if m != reference}
    cells = {}
    for c, cell in study["cells"].items():
        got = boot["cells"].get(c, {"n_examples": {}, "methods": {}})
        cells[c] = {"order": cell["order"], "seed": cell["seed"], "tasks": cell["tasks"], "n_examples": got["n_examples"],
                    "single": cell["single_dir"] if cell["single"] is not None else None,
                    "fwt_note": cell["fwt_note"], "methods": got["methods"]}
    alpha = boot["alpha"]
    comparisons = {
        **boot["family"], "alpha": alpha, "margin": margin,
        "p_values": ("two-sided bootstrap p of 'no difference': min(1, 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1)) "
                     "over the B replicates d* of the difference; equivalence (TOST, two one-sided tests): "
                     f"p_eq = max(#{{d* <= -{margin:g}}} + 1, #{{d* >= +{margin:g}}} + 1) / (B + 1)"),
        "rule": (f"win / loss: p < {alpha:g} (the sign of the difference); else equivalent: p_eq < {alpha:g}; else "
                 "undecided. The primary comparisons' p and p_eq are Holm-adjusted over the family; every other "
                 "difference (BWT, FWT, methods outside the family) is secondary, unadjusted")}
    return {"study_dir": study["study_dir"], "reference": reference,
            "bootstrap": {"B": B, "seed": seed, "level": level, "design": DESIGN, "resampled": boot["resampled"]},
            "comparisons": comparisons,
            "methods": methods, "differences": differences, "cells": cells,
            "missing": study["missing"], "references": study["references"],
            # {cell: {method: {"merges": merge_summary or None, "selection": [[best step, steps] per
            # task]}}} of the complete runs: what the merge controller did and what selection kept
            "traces": {c: dict(cell["traces"]) for c, cell in study["cells"].items() if cell["traces"]},
            **({} if archive is None else {"archive": {"dir": str(archive), "conflicts": study["conflicts"]}})}


def _with_ci(s: dict, signed: bool = False) -> str:
    if s["point"] is None:
        return "-"
    lo, hi = s["ci"]
    return f"{fmt_number(s['point'], signed)} [{fmt_number(lo, signed)}, {fmt_number(hi, signed)}]"


def _entry(s: dict, k: str, signed: bool) -> str:
    """A metric's table entry: point [CI], the verdict of a difference (``*``: a primary comparison,
    Holm-adjusted), and the number of cells when the metric has fewer than the row."""
    m = s[k]
    if m["point"] is None:
        return "-"
    text = _with_ci(m, signed)
    if m.get("verdict"):
        text += f" {m['verdict']}" + ("*" if m.get("primary") else "")
    if m["cells"] != s["cells"]:
        text += f" ({m['cells']} cells)"
    return text


def _p(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}" if x >= 0.0001 else "<0.0001"


def _sd(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def comparisons_markdown(report: dict) -> list[str]:
    """Which comparisons were primary, how their verdicts were adjusted, and their p-values."""
    ref, c = report["reference"], report["comparisons"]
    family = c["methods"]
    out = ["## Primary comparisons", ""]
    if not family:
        return out + [f"No primary comparison: `{ref}` and no other method both have OP. Every verdict below is "
                      "secondary (unadjusted).", ""]
    out += [f"The family: `{ref}` minus each of {', '.join(f'`{m}`' for m in family)} on OP ({len(family)} "
            f"comparison{'s' if len(family) != 1 else ''}; `--primary`, default every other method). Verdict rule: {c['rule']}. Equivalence margin "
            f"±{c['margin']:g} (`--equivalence-margin`). p-values: {c['p_values']}. Seed SD: the seed-to-seed "
            "standard deviation of a cell's difference within an order; test SE: one cell's test-sampling "
            "standard error.", "",
            "| method | cells | ΔOP [CI] | p | Holm p | p_eq | Holm p_eq | verdict | seed SD | test SE |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in family:
        d = report["differences"][m]["op"]
        eq = " (within the margin)" if d["equivalent"] and d["verdict"] in ("win", "loss") else ""
        out.append(f"| {m} | {d['cells']} | {_with_ci(d, True)} | {_p(d['p'])} | {_p(d['p_adj'])} | {_p(d['p_eq'])} | "
                   f"{_p(d['p_eq_adj'])} | **{d['verdict']}**{eq} | {_sd(d['seed_sd'])} | {_sd(d['test_se'])} |")
    return out + [""]


def study_markdown(report: dict, command: Optional[str] = None) -> str:
    ref, boot = report["reference"], report["bootstrap"]
    pct = f"{100 * boot['level']:g} %"
    cells = report["cells"]
    seeds = sorted({cell["seed"] for cell in cells.values()})
    out = [f"# Study report: `{report['study_dir']}`", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    if report.get("archive"):
        out += [f"Runs read from the study directory and the archive `{report['archive']['dir']}` (a run finished "
                "in both: the study directory's).", ""]
        out += [f"Archive disagreement: {line}" for line in report["archive"]["conflicts"]]
        out += [""] if report["archive"]["conflicts"] else []
    covers = ("the test-set sampling and the training noise between seeds (seeds resampled)"
              if "seeds" in boot.get("resampled", []) else "the test-set sampling only (one seed: training noise "
              "is not measured)")
    out += [f"{len(cells)} cells (order, seed): {', '.join(cells)}; seeds {', '.join(map(str, seeds))}. Each figure "
            f"is the mean over the cells where the method has a complete run; intervals are {pct} "
            f"{boot['design']} ({boot['B']} replicates, rng seed {boot['seed']}). They cover {covers}. FWT is "
            "against the seed's `single` run; the joint `mtl` run has no diagonal, hence OP only.", "",
            "## Methods", "", f"| method | cells | OP [{pct} CI] | BWT [{pct} CI] | FWT [{pct} CI] |",
            "|---|---|---|---|---|"]
    for m, s in report["methods"].items():
        name = f"**{m}**" if m == ref else m
        out.append(f"| {name} | {s['cells']} | " + " | ".join(_entry(s, k, k != "op") for k in METRICS) + " |")
    out += ["", "## Training noise beside test-set noise", "",
            "Seed SD: the seed-to-seed standard deviation of one run's figure, pooled within orders (- with one "
            "seed); test SE: one run's test-sampling standard error (median over cells of the bootstrap standard "
            "deviation).", "", "| method | seeds | OP seed SD / test SE | BWT seed SD / test SE | FWT seed SD / test SE |",
            "|---|---|---|---|---|"]
    for m, s in report["methods"].items():
        out.append(f"| {m} | {s['op']['seeds']} | " + " | ".join(
            "-" if s[k]["point"] is None else f"{_sd(s[k]['seed_sd'])} / {_sd(s[k]['test_se'])}" for k in METRICS) + " |")
    out += [""]
    if not report["differences"]:
        out += [f"## {ref} minus method", "", f"`{ref}` has no complete run: no paired differences.", ""]
    else:
        out += comparisons_markdown(report)
        c = report["comparisons"]
        out += [f"## {ref} minus method", "",
                f"Over the cells where both have the metric. Verdicts: win / loss when the difference is "
                f"significant at {c['alpha']:g}, equivalent when shown within ±{c['margin']:g} (TOST), undecided "
                "otherwise; `*`: a primary comparison (Holm-adjusted, above); every other verdict is secondary "
                "and unadjusted.", "",
                f"| method | cells | ΔOP [{pct} CI] | ΔBWT [{pct} CI] | ΔFWT [{pct} CI] |", "|---|---|---|---|---|"]
        for m, d in report["differences"].items():
            out.append(f"| {m} | {d['cells']} | " + " | ".join(_entry(d, k, True) for k in METRICS) + " |")
        out.append("")
    out += _cells_markdown(report)
    out += _trace_markdown(report)
    out += ["", "## Not finished yet", ""]
    notes = [f"- {x['cell']}: {x['method']} ({x['status']})" for x in report["missing"]]
    # a cell without FWT although its reference is complete (a missing reference is listed above)
    notes += [f"- {c}: no FWT ({cell['fwt_note']})" for c, cell in cells.items()
              if cell["fwt_note"] and report["references"][str(cell["seed"])]["status"] == "complete"]
    out += notes or ["Every run of every cell is complete."]
    return "\n".join(out) + "\n"


def _cells_markdown(report: dict) -> list[str]:
    """OP / BWT of every run, seeds x orders: a row per (method, seed), a column per order."""
    cells = report["cells"]
    orders = sorted({cell["order"] for cell in cells.values()})
    seeds = sorted({cell["seed"] for cell in cells.values()})
    at = {(cell["order"], cell["seed"]): cell for cell in cells.values()}
    out = ["## Per cell, seeds x orders", "", "Each entry: OP / BWT of the method's run in that cell.", "",
           "| method | seed | " + " | ".join(f"order {o}" for o in orders) + " |", "|---|---|" + "---|" * len(orders)]
    for m in report["methods"]:
        for sd in seeds:
            entries = []
            for o in orders:
                p = at.get((o, sd), {}).get("methods", {}).get(m)
                entries.append("-" if p is None else f"{fmt_number(p['op'])} / {fmt_number(p['bwt'], True)}")
            if any(e != "-" for e in entries):
                out.append(f"| {m} | {sd} | " + " | ".join(entries) + " |")
    return out


def _trace_markdown(report: dict) -> list[str]:
    traces = report.get("traces") or {}
    out = ["", "## What the traces show", "",
           "Merging methods, per cell: merges (by reason), how many had a forgetting count F > 1 and the counts "
           "seen, the merge interval's range over the steps, the replay steps, and the probe's noise (median "
           "over tasks of the history loss's coefficient of variation).", "",
           "| method | cell | merges (reasons) | F > 1 | F counts | interval min..max | replay steps | probe CV |",
           "|---|---|---|---|---|---|---|---|"]
    rows = 0
    for c, methods in traces.items():
        for m, t in methods.items():
            s = t.get("merges")
            if not s:
                continue
            rows += 1
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items()))
            fcounts = ", ".join(f"F={k}: {v}" for k, v in sorted(s["forgetting_counts"].items(), key=lambda kv: int(kv[0])))
            replay = sum(x["outer_steps"] for x in s["tasks"])
            cv = "-" if s["history_cv_median"] is None else f"{s['history_cv_median']:.2f}"
            out.append(f"| {m} | {c} | {s['merges']} ({reasons}) | {s['f_above_1']} | {fcounts or '-'} | "
                       f"{s['interval_min']}..{s['interval_max']} | {replay} | {cv} |")
    if not rows:
        out.append("| - | - | no merge recorded | | | | | |")
    kept = [(m, best, steps) for methods in traces.values() for m, t in methods.items()
            for best, steps in t.get("selection") or [] if steps]
    chosen = [(m, b, n) for m, b, n in kept if b is not None]
    if chosen:
        earlier = sum(b < n for _, b, n in chosen)
        out += ["", f"Model selection kept an adapter from before the last step in {earlier} of {len(chosen)} "
                "stages with a selection (the reference protocol validates every 40 steps; later steps of a task "
                "are never candidates)."]
    return out


# -- the plot --------------------------------------------------------------------------------------

def plot_study(report: dict, path: str | os.PathLike) -> Path:
    """One panel per metric (point and interval per method, the reference in red) and one of the
    paired differences ``reference - m`` with a line at 0. Drawn without pyplot, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..reporting.plots import save_figure

    ref = report["reference"]
    methods = list(report["methods"])
    pct = f"{100 * report['bootstrap']['level']:g} %"
    height = max(3.5, 0.35 * len(methods) + 1.5)
    fig = Figure(figsize=(17, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, sharey=True)
    ys = list(range(len(methods)))[::-1]  # first method on top
    for ax, k in zip(axes, METRICS):
        for m, y in zip(methods, ys):
            s = report["methods"][m][k]
            if s["point"] is not None:
                _errorbar(ax, s, y, "tab:red" if m == ref else "#333333")
        ax.set_title(f"{LABELS[k]} ({pct} CI)")
        if k != "op":
            ax.axvline(0, color="gray", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[3]
    colours = {"op": "tab:blue", "bwt": "tab:orange", "fwt": "tab:green"}
    offsets = {"op": 0.2, "bwt": 0.0, "fwt": -0.2}
    for m, y in zip(methods, ys):
        for k in METRICS:
            d = report["differences"].get(m, {}).get(k)
            if d and d["point"] is not None:
                _errorbar(ax, d, y + offsets[k], colours[k], label=LABELS[k])
    ax.axvline(0, color="black", linewidth=1.0)
    ax.set_title(f"{ref} minus method")
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize="small")
    axes[0].set_yticks(ys, methods)
    for label in axes[0].get_yticklabels():
        if label.get_text() == ref:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    axes[0].set_ylim(-0.7, len(methods) - 0.3)
    fig.suptitle(f"Study {Path(report['study_dir']).name}: {len(report['cells'])} cells, "
                 f"{report['bootstrap']['B']} bootstrap replicates")
    fig.tight_layout()
    return save_figure(fig, path)


def _errorbar(ax, s: dict, y: float, colour: str, label: Optional[str] = None) -> None:
    point, (lo, hi) = s["point"], s["ci"]
    # a percentile interval need not contain the point: the bar is drawn from lo to hi regardless
    ax.errorbar([point], [y], xerr=[[max(0.0, point - lo)], [max(0.0, hi - point)]], fmt="o", color=colour,
                markersize=4, capsize=3, label=label)
    if lo > point or hi < point:
        ax.plot([lo, hi], [y, y], color=colour, linewidth=1.0)


# -- writing ---------------------------------------------------------------------------------------

def write_study_report(study_dir: str | os.PathLike, command: Optional[str] = None, reference: str = "aimmerging",
                       B: int = 2000, seed: int = 0, primary: Optional[list[str]] = None, margin: float = MARGIN,
                       archive: Optional[str | os.PathLike] = None) -> dict:
    """Build the report (``archive``: see :func:`collect_study`) and write ``report.json``,
    ``report.md`` and ``report.png`` into the study directory (each atomically; the directory is
    created when only the archive has runs); returns the report. UserError when no run is finished yet."""
    study = Path(study_dir)
    report = build_study_report(study, reference=reference, B=B, seed=seed, primary=primary, margin=margin,
                                archive=archive)
    study.mkdir(parents=True, exist_ok=True)
    atomic_write_json(study / "report.json", report)
    atomic_write_text(study / "report.md", study_markdown(report, command))
    plot_study(report, study / "report.png")
    return report
