"""The probe study (issue 31, BENCHMARKS.md): does AIMMerging's adaptive schedule beat fixed
merging once its forgetting signal is clean?

The main study's AIMMerging probes a fresh random memory batch of 4 examples at every step in
train mode (dropout on): its history loss is mostly noise. Each variant here is AIMMerging on the
main study's config (benchmarks/standard-cl-study.yaml, the same cells: task order x seed) with
a lower-noise probe; its run directory is named after the variant, so the study report compares
it with the main study's runs of the same cells (read from their archive):

    python benchmarks/probe_study.py                    # every variant, orders 1,2,3, seed 42
    python benchmarks/probe_study.py --orders 1 --variants aimmerging-clean
    aimmerging bench archive --output-dir runs/probe-study --to benchmarks/results/probe-study
    aimmerging bench report --output-dir runs/probe-study \\
        --archive benchmarks/results/study,benchmarks/results/probe-study \\
        --reference aimmerging-clean --primary merge-fixed,aimmerging

Resumable like every run (rerun the same command); a run archived in
benchmarks/results/probe-study is not run again. A variant's first stage (the first task, no
memory: plain LoRA, the same computation as the main study's ``seq``) is copied from
runs/study/<cell>/seq when that run directory is there. Hours on 2 CPU cores (~40 min a run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aimmerging.bench.runner import method_config, run_method, share_stages
from aimmerging.bench.study import cell_name
from aimmerging.bench.study_archive import archive_run, read_archive, run_record, run_status
from aimmerging.config import load_yaml, result_options
from aimmerging.errors import UserError
from aimmerging.logs import setup_logging

CONFIG = "benchmarks/standard-cl-study.yaml"
# the variant's name (its run directory in each cell) -> AIMMerging's probe options
VARIANTS = {
    # the reference's probe size (its training batch, 32), one probe batch per merge window (the loss
    # moves with the adapter only), no dropout: the cleanest signal the options give
    "aimmerging-clean": {"probe_mode": "eval", "probe_set": "window", "probe_size": 32},
    # the same, the controller fed the mean of the window's last 4 losses (less noise, slower)
    "aimmerging-clean-avg4": {"probe_mode": "eval", "probe_set": "window", "probe_size": 32, "probe_average": 4},
}

log = logging.getLogger("aimmerging")


def _same_first_stage(seq_dir: Path, overrides: dict, quick: bool) -> bool:
    """Whether the main study's ``seq`` run in ``seq_dir`` was made with the options this study's
    cell has (its first stage is then the variant's: plain LoRA on the first task)."""
    config = seq_dir / "config.yaml"
    if not config.is_file():
        return False
    want = method_config(CONFIG, quick, overrides, "seq", seq_dir)
    return result_options(load_yaml(config)) == result_options(want)


def run(orders: list[int], seeds: list[int], variants: list[str], out: Path, archive: Path, main_study: Path,
        progress: bool, quick: bool = False, extra: dict | None = None) -> None:
    archived = read_archive(archive)
    for seed in seeds:
        for order in orders:
            cell = cell_name(order, seed)
            for name in variants:
                if (cell, name) in archived:
                    log.info("probe study: %s/%s archived, skipped", cell, name)
                    continue
                cell_overrides = {**(extra or {}), "order": order, "seed": seed}
                overrides = {**cell_overrides, **VARIANTS[name]}
                run_dir = out / cell / name
                cfg = method_config(CONFIG, quick, overrides, "aimmerging", run_dir)
                first = main_study / cell / "seq"
                if _same_first_stage(first, cell_overrides, quick) and share_stages(first, cfg, run_dir):
                    log.info("probe study: %s/%s: first stage copied from %s", cell, name, first)
                log.info("probe study: %s/%s", cell, name)
                run_method(CONFIG, quick, overrides, "aimmerging", run_dir, out / cell / "configs" / f"{name}.yaml",
                           progress=progress)
                if run_status(run_dir)[1] == "complete":
                    archive_run(run_record(run_dir, cell, name), archive)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", default="1,2,3")
    p.add_argument("--seeds", default="42")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--output-dir", default="runs/probe-study")
    p.add_argument("--archive", default="benchmarks/results/probe-study")
    p.add_argument("--main-study", default="runs/study", help="where the main study's run directories are (first stages)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="the config's quick variant (a smoke test, dev split)")
    p.add_argument("--model", default=None, help="override the config's model (a smoke test: tiny-causal)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    setup_logging(False)
    try:
        orders, seeds = ([int(x) for x in text.split(",") if x.strip()] for text in (args.orders, args.seeds))
    except ValueError:
        p.error("--orders / --seeds: comma-separated integers")
    try:
        run(orders, seeds, variants, Path(args.output_dir), Path(args.archive), Path(args.main_study),
            not args.no_progress, args.quick, {"model": args.model} if args.model else None)
    except UserError as e:  # one line, as the aimmerging command gives it
        print(f"probe_study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
