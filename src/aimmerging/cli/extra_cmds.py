"""Commands beyond run/data/controller: plot, demo and bench."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo_report, run_demo

    results = run_demo(args.output_dir, args.model, args.max_steps, progress=not args.no_progress, threads=args.threads)
    print(demo_report(results, args.output_dir))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import run_bench
    from ..reporting.bench import bench_markdown

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("model", args.model), ("threads", args.threads))
                 if v is not None}
    out = args.output_dir or ("runs/bench-quick" if args.quick else "runs/bench")
    report = run_bench(args.config, out, quick=args.quick, overrides=overrides, progress=not args.no_progress)
    print(bench_markdown(report, command=f"aimmerging bench{' --quick' if args.quick else ''}"))
    print(f"Report: {out}/report.md, {out}/report.json, {out}/report.png")
    return 0


def register(sub) -> None:
    from .plot_cmd import register as register_plot

    register_plot(sub)
    p = sub.add_parser("demo", help="seq vs AIMMerging on the built-in synthetic stream (default model, < 10 min on 2 cores)")
    p.add_argument("--output-dir", default="runs/demo", help="where the two runs go (default: runs/demo)")
    p.add_argument("--model", default="smollm2-135m", help="model alias, directory or hub id (default: smollm2-135m)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per task (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="every method side by side on one stream and model: quality, speed, cost")
    b.add_argument("--config", default="benchmarks/standard-cl.yaml",
                   help="benchmark config (default: benchmarks/standard-cl.yaml)")
    b.add_argument("--quick", action="store_true", help="the config's quick variant (2 tasks, fewer steps)")
    b.add_argument("--output-dir", default=None, help="default: runs/bench (runs/bench-quick with --quick)")
    b.add_argument("--data-dir", default=None, help="override the config's data directory")
    b.add_argument("--model", default=None, help="override the config's model")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)
