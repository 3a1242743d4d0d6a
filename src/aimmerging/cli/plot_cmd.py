"""``aimmerging plot RUN_DIR``: PNG plots of a finished run into ``RUN_DIR/plots/``; prints the
path of every file written, one per line."""

from __future__ import annotations

import argparse


def register(sub, argv=None) -> None:
    p = sub.add_parser("plot", help="PNG plots of a run (accuracy matrix, per-task losses, merges) into RUN_DIR/plots/")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by 'aimmerging run' (--output-dir)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from ..reporting.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
