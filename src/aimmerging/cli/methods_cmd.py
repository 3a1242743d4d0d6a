"""``aimmerging methods``: the registered methods as a markdown table (name, paper, what it does);
the README's method table is this command's output."""

from __future__ import annotations

import argparse


def register(sub, argv=None) -> None:
    p = sub.add_parser("methods", help="the registered methods: name, paper, what each does (markdown)")
    p.set_defaults(func=cmd_methods)


def methods_table() -> str:
    from ..methods import METHODS, builtin_names

    lines = ["| method | paper / name in the literature | what it does |", "|---|---|---|"]
    for name in builtin_names():
        cls = METHODS.get(name)
        lines.append(f"| `{name}` | {cls.paper} | {cls.summary} |")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    print(methods_table())
    return 0
