"""The benchmark report: pure functions of the runs' results.json files and the throughput study,
plus the markdown and the plot written at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..evaluation.metrics import all_metrics
from ..runs.results import fmt_number, matrix_markdown

SECTIONS = ("inner", "probe", "replay", "bookkeeping", "validation", "eval")


def method_summary(results: dict, reference: Optional[list], flops_per_token: float, peak_gflops: float) -> dict:
    """Quality and cost of one method's run."""
    recorded = results.get("timing", {})
    timing = {k: float(recorded.get(k, 0.0)) for k in SECTIONS}
    # a method's own cost categories (EWC's fisher, LwF's distillation, I-LoRA's consistency, ...)
    extra = {k: float(v) for k, v in recorded.items() if k not in SECTIONS}
    stages = results.get("stages", [])
    wall = sum(float(s.get("wall_s", 0.0)) for s in stages)
    timing["other"] = max(0.0, wall - sum(timing.values()) - sum(extra.values()))
    tokens = sum(int(s.get("tokens", 0)) for s in stages)
    inner = timing["inner"]
    tps = tokens / inner if inner > 0 else None
    gflops = flops_per_token * tps / 1e9 if tps else None
    return {
        "accuracy_matrix": results["accuracy_matrix"],
        "metrics": all_metrics(results["accuracy_matrix"], reference),
        "wall_s": wall,
        "timing_s": timing,
        "method_timing_s": extra,
        "steps": sum(int(s.get("steps", 0)) for s in stages),
        "merges": sum(int(s.get("merges", 0)) for s in stages),
        "tokens": tokens,
        "train_tokens_per_s": tps,
        "train_gflops": gflops,
        "train_fraction_of_peak": gflops / peak_gflops if gflops else None,
        "bookkeeping_fraction": timing["bookkeeping"] / wall if wall else None,
        "peak_rss_mb": results.get("peak_rss_mb"),
    }


def build_report(bench: dict, runs: dict[str, dict], throughput: dict, process_walls: dict | None = None) -> dict:
    single = runs["single"]
    reference = [single["accuracy_matrix"][t][t] for t in range(len(single["tasks"]))]
    peak = float(throughput["peak_gflops"])
    methods = {m: method_summary(r, reference, float(throughput["flops_per_token"]), peak) for m, r in runs.items()}

    def ratio(a: str, b: str) -> Optional[float]:
        if a in methods and b in methods and methods[b]["wall_s"]:
            return methods[a]["wall_s"] / methods[b]["wall_s"]
        return None

    return {
        "name": bench["name"],
        "tasks": single["tasks"],
        "model": single["model"],
        "run": bench["run"],
        "reference_scores": reference,
        "methods": methods,
        "ratios": {"aimmerging/seq": ratio("aimmerging", "seq"), "aimmerging/replay": ratio("aimmerging", "replay")},
        "throughput": throughput,
        "process_wall_s": process_walls or {},
    }


def _own(extra: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(extra.items())) or "-"


def bench_markdown(report: dict, command: str) -> str:
    tasks, methods = report["tasks"], report["methods"]
    out = [f"# {report['name']}", "", f"Command: `{command}`", "",
           f"Model `{report['model']}`, tasks {' -> '.join(tasks)}. Shared run settings:", "", "```yaml"]
    out += [f"{k}: {v}" for k, v in report["run"].items()]
    out += ["```", "", "## Quality", "", "| method | OP | BWT | FWT | merges |", "|---|---|---|---|---|"]
    for m, s in methods.items():
        k = s["metrics"]
        out.append(f"| {m} | {fmt_number(k['op'])} | {fmt_number(k['bwt'], True)} | {fmt_number(k['fwt'], True)} | {s['merges']} |")
    out += ["", "FWT is against the `single` run's diagonal (a fresh adapter per task), so `single` has FWT 0 by "
            "definition.", "", "### Accuracy matrices (row: after training task i; column: task j)", ""]
    for m, s in methods.items():
        out += [f"**{m}**", "", *matrix_markdown(tasks, s["accuracy_matrix"]), ""]
    out += ["## Cost", "", "Wall time of training and evaluation (model loading excluded), split by what it was spent on "
            "(a method's own categories, e.g. EWC's Fisher estimation or LwF's teacher passes, in their column); "
            "training throughput counts the tokens of the inner (training) steps.", "",
            "| method | wall s | inner | probe | replay | bookkeeping | eval | method's own | other | bookkeeping % "
            "| train tokens/s | train GFLOP/s (% of peak) | peak RSS MB |", "|---|" + "---|" * 12]
    for m, s in methods.items():
        t = s["timing_s"]
        frac = s["train_fraction_of_peak"]
        out.append(f"| {m} | {s['wall_s']:.0f} | {t['inner']:.0f} | {t['probe']:.0f} | {t['replay']:.0f} | "
                   f"{t['bookkeeping']:.1f} | {t['eval']:.0f} | {_own(s.get('method_timing_s', {}))} | "
                   f"{t['other'] + t['validation']:.0f} | "
                   f"{fmt_number(s['bookkeeping_fraction'] and 100 * s['bookkeeping_fraction'], digits=2)} | "
                   f"{fmt_number(s['train_tokens_per_s'], digits=0)} | {fmt_number(s['train_gflops'], digits=1)} "
                   f"({fmt_number(frac and 100 * frac, digits=0)}%) | {fmt_number(s['peak_rss_mb'], digits=0)} |")
    r = report["ratios"]
    out += ["", f"Wall-time ratios: aimmerging / seq = {fmt_number(r['aimmerging/seq'], digits=2)}, "
            f"aimmerging / replay = {fmt_number(r['aimmerging/replay'], digits=2)}.", ""]
    tp = report["throughput"]
    out += ["## Throughput of the training step", "",
            f"Peak {tp.get('precision_of_runs', 'fp32')} rate (the runs' precision): {tp['peak_gflops']:.1f} GFLOP/s, the best of 2048 x 2048 matmuls timed in the same "
            f"process before and after the study ({', '.join(f'{x:.1f}' for x in tp['peak_measurements_gflops'])}; "
            f"{tp['threads']} threads). "
            f"FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`; {tp['flops_per_token'] / 1e9:.3f} GFLOP "
            "per trained token as the runs execute the step. Each lever is added to the ones above it; "
            f"{tp['steps']} timed steps each after one warm-up step.", "",
            "| lever | s / step | tokens/s | GFLOP / step | GFLOP/s | % of peak |", "|---|---|---|---|---|---|"]
    for row in tp["rows"]:
        out.append(f"| {row['lever']} | {row['step_s']:.2f} | {row['tokens_per_s']:.0f} | {row['gflop_per_step']:.1f} | "
                   f"{row['gflops']:.1f} | {100 * row['fraction_of_peak']:.0f}% |")
    b = tp.get("breakdown")
    if b:
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["shares"].items())
        out += ["", f"Where the time of the runs' step goes (`torch.profiler`, {b['steps']} steps): {shares}. "
                f"The matmuls alone run at {fmt_number(b['matmul_gflops'], digits=1)} GFLOP/s "
                f"({fmt_number(b['matmul_fraction_of_peak'] and 100 * b['matmul_fraction_of_peak'], digits=0)}% of peak)."]
    pr = tp.get("precision")
    if pr:
        out += ["", f"fp32 against bf16 autocast on identical work, alternating ({pr['rounds']} rounds, best of each; "
                f"{pr['steps']} training steps, as many probe passes of {pr['memory_batch']} memory examples, one "
                f"generation of {pr['generate_batch']} prompts x {pr['new_tokens']} tokens):", "",
                "| precision | s / step | tokens/s | % of its own matmul peak (GFLOP/s) | probe s | generation s |",
                "|---|---|---|---|---|---|"]
        for name, row in pr["rows"].items():
            out.append(f"| {name} | {row['step_s']:.2f} | {row['tokens_per_s']:.0f} | {100 * row['fraction_of_peak']:.0f}% "
                       f"({row['peak_gflops']:.0f}) | {row['probe_s']:.2f} | {row['generate_s']:.2f} |")
        sp = pr["speedup"]
        out += ["", f"bf16 speed-up: training step x{sp['step_s']:.2f}, probe x{sp['probe_s']:.2f}, "
                f"generation x{sp['generate_s']:.2f}."]
    return "\n".join(out) + "\n"


def plot_report(report: dict, path: str | Path) -> Path:
    """Quality and wall time per method, drawn without pyplot (a caller's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..reporting.plots import save_figure

    methods = list(report["methods"])
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.27
    for k, key in enumerate(("op", "bwt", "fwt")):
        vals = [report["methods"][m]["metrics"][key] or 0.0 for m in methods]
        ax1.bar([i + (k - 1) * width for i in range(len(methods))], vals, width, label=key.upper())
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_xticks(range(len(methods)), methods, rotation=30)
    ax1.set_title("Quality")
    ax1.legend()
    bottom = [0.0] * len(methods)
    for sec in ("inner", "probe", "replay", "bookkeeping", "eval", "method's own", "other"):
        if sec == "method's own":
            vals = [sum(report["methods"][m].get("method_timing_s", {}).values()) / 60 for m in methods]
        else:
            vals = [report["methods"][m]["timing_s"][sec] / 60 for m in methods]
        ax2.bar(range(len(methods)), vals, bottom=bottom, label=sec)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(range(len(methods)), methods, rotation=30)
    ax2.set_ylabel("minutes")
    ax2.set_title("Wall time")
    ax2.legend(fontsize="small")
    fig.suptitle(report["name"])
    fig.tight_layout()
    return save_figure(fig, path)
