"""``aimmerging run``: train a method through a task stream, evaluate, write results and plots."""

from __future__ import annotations

import argparse


def _flag_value(argv: list[str] | None, flag: str) -> str | None:
    """The value of ``flag`` on the command line, if any."""
    for i, arg in enumerate(argv or []):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _method_from_argv(argv: list[str] | None) -> str | None:
    """The method the command line names (its settings need flags): ``--method``, else the
    ``method`` key of the ``--config`` YAML file (an unreadable file is reported later)."""
    wanted = _flag_value(argv, "--method")
    if wanted is None and _flag_value(argv, "--config"):
        from ..config import load_yaml
        from ..errors import UserError

        try:
            value = load_yaml(_flag_value(argv, "--config")).get("method")
        except UserError:
            return None
        wanted = value if isinstance(value, str) else None
    return wanted


class RunParser:
    """Mixed into the ``run`` parser: an unrecognized flag gets a hint when one is known (a Hugging
    Face option name, a method of the user's own that could not be imported, or a method option
    declared in a module of the current directory whose method is not named)."""

    method: str | None = None  # the method the command line names
    method_error: str | None = None  # why it could not be imported

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        hints = [h for h in (self._hint(a) for a in extras if a.startswith("--")) if h]
        if hints:
            self.error(f"unrecognized arguments: {' '.join(extras)}; {'; '.join(hints)}")
        return namespace, extras

    def _hint(self, flag: str) -> str:
        from ..config import hf_name_hint

        name = flag[2:].split("=", 1)[0]
        if name.startswith("no-"):
            name = name[3:]
        hint = hf_name_hint(name, flag=True)
        if hint:
            return f"--{name} is {hint}"
        if self.method_error:
            return f"--{name} may be an option of method '{self.method}', which could not be imported ({self.method_error})"
        owner = _declared_nearby(name.replace("-", "_"))
        if owner:
            named = f" (the method named is '{self.method}')" if self.method else ""
            return (f"--{name} looks like an option of a method in {owner}: name that method with --method "
                    f"{owner[:-3]}:ClassName{named}")
        return ""


def _declared_nearby(option: str) -> str | None:
    """The file name of a Python module in the current directory declaring ``option`` as an
    ``aimmerging.option``/``option(`` field (a text search; nothing is imported), or None."""
    import re
    from pathlib import Path

    pattern = re.compile(rf"^\s+{re.escape(option)}\s*:[^=\n]*=\s*(aimmerging\.)?option\(", re.M)
    try:
        files = sorted(Path.cwd().glob("*.py"))[:200]
    except OSError:
        return None
    for path in files:
        try:
            if path.stat().st_size < 1_000_000 and pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                return path.name
        except OSError:
            continue
    return None


def register(sub, argv: list[str] | None = None) -> None:
    from ..config import RunConfig
    from ..errors import UserError
    from ..methods import METHODS, builtin_names, resolve_method
    from .flags import add_option_flags

    names = builtin_names()
    p = sub.add_parser("run", help="train a method through a task stream, evaluate, write results")
    p.__class__ = type("RunArgumentParser", (RunParser, type(p)), {})  # hints for unrecognized flags
    p.add_argument("--config", metavar="YAML", help="YAML file of options (flags win)")
    groups: dict = {}
    seen: set[str] = set()
    add_option_flags(p, RunConfig, skip={"method"}, seen=seen, groups=groups)
    groups["training"].add_argument("--method", dest="method", default=argparse.SUPPRESS, metavar="METHOD",
                                    help=f"continual-learning method: {', '.join(names)}, or an import path "
                                         "pkg.module:Class of your own (default: seq)")
    wanted = p.method = _method_from_argv(argv)
    methods = METHODS.items()
    if wanted and wanted not in METHODS:
        try:  # a user's method by import path (registered or not): its settings get flags too
            methods = [(wanted, resolve_method(wanted)), *methods]
        except UserError as e:
            p.method_error = str(e)  # reported when the config is built (or with an unrecognized flag)
    for name, cls in methods:
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
