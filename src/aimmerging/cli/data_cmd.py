"""``aimmerging data validate DIR``: per-task counts and label sets, and every problem found."""

from __future__ import annotations

import argparse


def register(sub, argv=None) -> None:
    from .main import Parser

    data = sub.add_parser("data", help="inspect task data").add_subparsers(dest="data_command", metavar="SUBCOMMAND",
                                                                         parser_class=Parser)
    data.required = True
    v = data.add_parser("validate", help="per-task counts and labels, and every problem found")
    v.add_argument("dir", help="O-LoRA data directory (train/dev/test/<task>.json)")
    v.set_defaults(func=cmd_data_validate)


def cmd_data_validate(args: argparse.Namespace) -> int:
    from ..data.olora import validate_dir

    report, errors, warns = validate_dir(args.dir)
    if report:
        print(f"{'task':<14} {'split':<6} {'count':>6}  labels")
        for task, splits in report.items():
            for split, r in splits.items():
                if len(r.labels) <= 15:
                    labels = ", ".join(f"{k} {v}" for k, v in sorted(r.labels.items()))
                else:
                    labels = f"free text ({len(r.labels)} distinct outputs)"
                print(f"{task:<14} {split:<6} {r.count:>6}  {labels}")
    for w in warns:
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}")
    print(f"{len(report)} tasks, {len(errors)} problems, {len(warns)} warnings")
    return 1 if errors else 0
