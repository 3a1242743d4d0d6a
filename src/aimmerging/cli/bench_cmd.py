"""``aimmerging bench``: every method side by side on one stream and model (``aimmerging.bench``)."""

from __future__ import annotations

import argparse


def register(sub, argv=None) -> None:
    b = sub.add_parser("bench", help="every method side by side on one stream and model: quality, speed, cost")
    b.add_argument("--config", default="benchmarks/standard-cl.yaml",
                   help="benchmark config (default: benchmarks/standard-cl.yaml)")
    b.add_argument("--quick", action="store_true", help="the config's quick variant (2 tasks, fewer steps)")
    b.add_argument("--output-dir", default=None, help="default: runs/bench (runs/bench-quick with --quick)")
    b.add_argument("--data-dir", default=None, help="override the config's data directory")
    b.add_argument("--model", default=None, help="override the config's model")
    b.add_argument("--methods", default=None, help="comma-separated methods to compare (default: the config's)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import bench_markdown, run_bench

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("model", args.model), ("threads", args.threads))
                 if v is not None}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out = args.output_dir or ("runs/bench-quick" if args.quick else "runs/bench")
    report = run_bench(args.config, out, quick=args.quick, overrides=overrides, progress=not args.no_progress,
                       methods=methods)
    print(bench_markdown(report, command=f"aimmerging bench{' --quick' if args.quick else ''}"))
    print(f"Report: {out}/report.md, {out}/report.json, {out}/report.png")
    return 0
