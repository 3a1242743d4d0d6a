"""``aimmerging run``: train a method through a task stream, evaluate, write results and plots."""

from __future__ import annotations

import argparse


def _method_from_argv(argv: list[str] | None) -> str | None:
    """The value of ``--method`` on the command line, if any (its settings need flags)."""
    if not argv:
        return None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def register(sub, argv: list[str] | None = None) -> None:
    from ..config import RunConfig
    from ..errors import UserError
    from ..methods import METHODS, builtin_names, resolve_method
    from .flags import add_option_flags

    names = builtin_names()
    p = sub.add_parser("run", help="train a method through a task stream, evaluate, write results")
    p.add_argument("--config", metavar="YAML", help="YAML file of options (flags win)")
    groups: dict = {}
    seen: set[str] = set()
    add_option_flags(p, RunConfig, skip={"method"}, seen=seen, groups=groups)
    groups["training"].add_argument("--method", dest="method", default=argparse.SUPPRESS, metavar="METHOD",
                                    help=f"continual-learning method: {', '.join(names)}, or an import path "
                                         "pkg.module:Class of your own (default: seq)")
    wanted = _method_from_argv(argv)
    if wanted and wanted not in METHODS:
        try:
            resolve_method(wanted)  # a user's method by import path: its settings get flags too
        except UserError:
            pass  # reported when the config is built
    for name, cls in METHODS.items():
        if cls.Settings is not None:
            add_option_flags(p, cls.Settings, group=f"method {name}", seen=seen, groups=groups)
    p.set_defaults(func=cmd_run)


def config_from_args(args: argparse.Namespace):
    from ..config import build_config, load_yaml

    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    skip = {"func", "command", "config", "verbose"}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    return build_config(yaml_values, flags, source=str(getattr(args, "config", None) or "config"))


def cmd_run(args: argparse.Namespace) -> int:
    from ..logs import is_main_process
    from ..reporting.plots import plot_run
    from ..runs.results import summary_markdown
    from ..runs.rundir import RunDirectory
    from ..runs.runner import run_config

    cfg = config_from_args(args)
    rd = RunDirectory(cfg.run_dir)
    try:  # the run directory stays locked until its plots are drawn
        result = run_config(cfg, run_dir=rd, keep_lock=True)
        if is_main_process():
            plot_run(cfg.run_dir)
            print(summary_markdown(result.results))
            print(f"\nrun directory: {cfg.run_dir}")
    finally:
        rd.unlock()
    return 0
