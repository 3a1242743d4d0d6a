"""``aimmerging demo``: seq vs AIMMerging on the built-in synthetic stream."""

from __future__ import annotations

import argparse


def register(sub, argv=None) -> None:
    p = sub.add_parser("demo", help="seq vs AIMMerging on the built-in synthetic stream (default model, < 10 min on 2 cores)")
    p.add_argument("--output-dir", default="runs/demo", help="where the two runs go (default: runs/demo)")
    p.add_argument("--model", default="smollm2-135m", help="model alias, directory or hub id (default: smollm2-135m)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per task (default: 32)")
    p.add_argument("--seed", type=int, default=42, help="seed of training (data order, LoRA init, dropout, memory draws); "
                   "the test examples stay the same (default: 42, the README's output)")
    p.add_argument("--eval-split", choices=("test", "dev"), default="test",
                   help="score on the test split (default) or on dev (where the demo's settings were chosen)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo_report, run_demo
    from ..reporting.plots import plot_run

    results = run_demo(args.output_dir, args.model, args.max_steps, progress=not args.no_progress, threads=args.threads,
                       seed=args.seed, eval_split=args.eval_split)
    for r in results.values():
        r["plots"] = [str(p) for p in plot_run(r["run_dir"])]
    print(demo_report(results, args.output_dir))
    return 0
