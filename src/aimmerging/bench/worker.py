"""``python -m aimmerging.bench.worker RUN_CONFIG.yaml [--no-progress]``: one method's run of a
bench, in a process of its own (own peak memory and timings), with its plots."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from ..config import build_config, load_yaml
    from ..errors import UserError
    from ..logs import setup_logging
    from ..reporting.plots import plot_run
    from ..runs.rundir import RunDirectory
    from ..runs.runner import run_config

    setup_logging(verbose=False)
    try:
        values = load_yaml(argv[0])
        if "--no-progress" in argv[1:]:
            values["progress"] = False
        cfg = build_config(values, source=argv[0])
        rd = RunDirectory(cfg.run_dir)
        try:  # locked until the plots are drawn
            run_config(cfg, run_dir=rd, keep_lock=True)
            plot_run(cfg.run_dir)
        finally:
            rd.unlock()
    except UserError as e:
        print(f"aimmerging: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
