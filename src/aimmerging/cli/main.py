"""Command line: ``aimmerging <command> ...`` (also ``python -m aimmerging``).

Commands: run, data validate, controller replay, plot, demo, bench. Errors a user can cause end
in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import fields

from ..errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_flags(parser: argparse.ArgumentParser, only_groups: set[str] | None = None,
                     skip: set[str] = frozenset()) -> None:
    """One flag per RunConfig field (``lora_r`` -> ``--lora-r``), grouped as in the dataclass."""
    from ..config import RunConfig, _base_type

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(RunConfig):
        group = f.metadata["group"]
        if (only_groups and group not in only_groups) or f.name in skip:
            continue
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        g = groups[group]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if _base_type(f.name) is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {f.default})")
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.split("_")[-1].upper()
            g.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{help_text} (default: {f.default})")


def _config_from_args(args: argparse.Namespace, extra_skip: set[str] = frozenset()):
    from ..config import FIELDS, build_config, load_yaml

    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in FIELDS and k not in extra_skip}
    return build_config(yaml_values, flags, source=str(getattr(args, "config", None) or "config"))


def cmd_run(args: argparse.Namespace) -> int:
    from ..reporting.results import summary_markdown
    from ..training.runner import run

    cfg = _config_from_args(args)
    results = run(cfg)
    if _is_main_process():
        print(summary_markdown(results))
        print(f"\nrun directory: {cfg.run_dir}")
    return 0


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


_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")  # torchrun, then MPI


def _process_rank() -> int:
    """This process's rank under torchrun / accelerate launch / mpirun, read from the environment
    (before the process group exists); 0 for a single process."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip():
            return int(value)
    return 0


def _is_main_process() -> bool:
    return _process_rank() == 0


def _setup_logging(verbose: bool) -> None:
    # Under several processes only the main one logs (errors excepted), so nothing is printed twice.
    level = logging.INFO if _is_main_process() else logging.ERROR
    level = logging.DEBUG if verbose else level
    logging.basicConfig(level=level, format="[aimmerging] %(message)s", stream=sys.stderr)
    logging.getLogger("aimmerging").setLevel(level)
    for noisy in ("transformers", "peft", "accelerate", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module=r"(transformers|peft|accelerate|torch)\b")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")  # raised by peft, harmless
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .controller_cmd import register as register_controller
    from .extra_cmds import register as register_extra

    parser = _Parser(prog="aimmerging", description="Continual LoRA fine-tuning with Adaptive Iterative Model Merging.")
    parser.add_argument("--version", action="version", version=f"aimmerging {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="train a method through a task stream, evaluate, write results")
    p.add_argument("--config", metavar="YAML", help="YAML file of options (flags win)")
    add_config_flags(p)
    p.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="inspect task data").add_subparsers(dest="data_command", metavar="SUBCOMMAND",
                                                                         parser_class=_Parser)
    data.required = True
    v = data.add_parser("validate", help="per-task counts and labels, and every problem found")
    v.add_argument("dir", help="O-LoRA data directory (train/dev/test/<task>.json)")
    v.set_defaults(func=cmd_data_validate)

    register_controller(sub)
    register_extra(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        rank = _process_rank()  # every process raises it; the others say which they are
        print(f"aimmerging: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("aimmerging: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
