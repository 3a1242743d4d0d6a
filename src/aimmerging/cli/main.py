"""Command line: ``aimmerging <command> ...`` (also ``python -m aimmerging``).

Commands (one module each): run, data validate, controller replay, plot, demo, bench. Errors a
user can cause end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from contextlib import contextmanager

from ..errors import UserError
from ..logs import process_rank, setup_logging

COMMANDS = ("run_cmd", "methods_cmd", "data_cmd", "controller_cmd", "plot_cmd", "demo_cmd", "bench_cmd")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    import importlib

    from .. import __version__

    parser = Parser(prog="aimmerging", description="Continual LoRA fine-tuning with Adaptive Iterative Model Merging.")
    parser.add_argument("--version", action="version", version=f"aimmerging {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub, argv)
    return parser


def os_error_line(e: OSError) -> str:
    """One line for an operating-system error: the path(s), then the cause."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    cause = e.strerror or str(e) or type(e).__name__
    hint = "; free some space and rerun the same command to resume" if e.errno == errno.ENOSPC else ""
    return f"{paths}: {cause}{hint}" if paths else f"{cause}{hint}"


def _fail(message: str) -> int:
    rank = process_rank()  # every process raises it; the others say which they are
    line = " ".join(message.split("\n")[0].split()) if message else "failed"
    print(f"aimmerging: error{f' (rank {rank})' if rank else ''}: {line}", file=sys.stderr)
    return 2


INTERRUPTED = "aimmerging: interrupted"


def main(argv: list[str] | None = None) -> int:
    """The ``aimmerging`` command. Ctrl-C at any moment ends in one line and status 130: while the
    command runs (it resumes), or before it (imports, the parser), when nothing was written yet."""
    with _sigint_recorded() as seen:
        try:
            return _main(argv, seen)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            return 130
        except BaseException:
            if not seen:
                raise
            # a Ctrl-C that Python swallowed inside an import (an "ignored" exception in importlib's
            # callbacks) can leave a module half-imported, and a later import fails: the interrupt
            print(INTERRUPTED, file=sys.stderr)
            return 130


@contextmanager
def _sigint_recorded():
    """Remember every SIGINT (``seen`` is true once one came) while still raising KeyboardInterrupt,
    and keep the interrupts Python cannot raise (inside importlib's weak-reference callbacks, which
    it reports as "Exception ignored in ..." and then goes on) off stderr: :func:`main` answers them
    with its one line. Only in the main thread, and only over Python's default handler."""
    seen: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield seen
        return
    old_hook = sys.unraisablehook

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    def hook(unraisable):
        if not (seen and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            old_hook(unraisable)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = hook
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = old_hook


def _main(argv: list[str] | None, seen: list[int]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except UserError as e:
        return _fail(str(e))
    args = parser.parse_args(argv)
    if seen:  # an interrupt swallowed while the commands were imported: stop before anything is written
        raise KeyboardInterrupt
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        return _fail(str(e))
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, read-only or missing directory, a path under a file, ...
        return _fail(os_error_line(e))
    except KeyboardInterrupt:
        print(f"{INTERRUPTED}; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        _end_processes()


def _end_processes() -> None:
    """A command that ran under several processes ends their process group before the exit."""
    if "torch.distributed" in sys.modules:  # nothing to end (and no torch to import) otherwise
        from ..runs.process import end_process_group

        end_process_group()
