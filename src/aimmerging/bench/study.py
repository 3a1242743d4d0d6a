"""``aimmerging bench --orders 1,2,3 [--seeds 42,43]``: the bench over several task orders and
seeds, with confidence intervals (the report: ``study_report``).

Layout of ``STUDY_DIR``::

    study.yaml                the benchmark config, orders and seeds it was started with
    configs/single-s<seed>.yaml
    single-s<seed>/           the FWT reference of every cell with that seed (``single``: each task
                              trained alone from the base model, so one run serves every order)
    o<order>-s<seed>/         a cell: an ordinary bench directory (``bench.yaml``, ``configs/``,
                              one run directory per method)
    report.json, report.md, report.png

Everything resumes: a rerun skips finished runs and finished stages, and goes on from the first
unfinished stage of each run. ``--methods a,b`` runs only those methods (a shard: run shards
one after another, or at the same time on different machines sharing the directory; a run
directory is locked while a process works in it). Cells are run in order (order-major, then
seed), each method of a cell in turn, so a study stopped half way has whole cells to report.
``aimmerging bench report`` rebuilds the report from whatever is finished.

Seeds vary training only: the test subset (``eval_cap``) is drawn with ``eval_seed`` (the config's,
default 42), not with the cell's seed, so every cell of every seed, and every ``single-s<seed>``,
scores the same test examples, and the report resamples them once for all cells.

A stage-by-stage method's stage i depends only on the first i+1 tasks: a cell whose order starts
like a finished cell's (Standard CL orders 1 and 2 share dbpedia -> amazon) copies those stages
instead of training them again (``runner._shared_prefix``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import ConfigError
from ..io import atomic_write_yaml
from ..runs.layout import RunLayout
from ..runs.results import read_results
from .runner import load_bench_config, run_bench, run_method
from .study_report import write_study_report

log = logging.getLogger("aimmerging")


def cell_name(order: int, seed: int) -> str:
    return f"o{order}-s{seed}"


def run_study(config: str | Path, output_dir: str | Path, orders: list[int], seeds: list[int] | None = None,
              quick: bool = False, overrides: dict[str, Any] | None = None, progress: bool = True,
              methods: list[str] | None = None, isolate: bool = True, command: str | None = None,
              primary: list[str] | None = None, margin: float | None = None) -> dict:
    """Run the missing runs of every (order, seed) cell, then write the report (``primary``,
    ``margin``: its family of primary comparisons and equivalence margin; see
    :func:`study_report.build_study_report`)."""
    overrides = dict(overrides or {})
    base = load_bench_config(config, quick, overrides, methods)
    if primary:  # the report's family: known methods, checked before hours of runs
        load_bench_config(config, quick, overrides, primary)
    seeds = list(seeds or [int(base["run"].get("seed", 42))])
    if not orders or len(set(orders)) != len(orders) or len(set(seeds)) != len(seeds):
        raise ConfigError("--orders / --seeds: give distinct values, e.g. --orders 1,2,3 --seeds 42")
    out = Path(output_dir)
    study = {"config": str(config), "quick": quick, "overrides": overrides, "orders": sorted(orders),
             "seeds": sorted(seeds)}
    marker = out / "study.yaml"
    if marker.is_file():
        before = load_yaml(marker)
        if {k: v for k, v in before.items() if k not in ("orders", "seeds")} != \
                {k: v for k, v in study.items() if k not in ("orders", "seeds")}:
            raise ConfigError(f"{out} holds a study with a different config or overrides; choose another --output-dir")
        study["orders"] = sorted(set(before.get("orders", [])) | set(orders))
        study["seeds"] = sorted(set(before.get("seeds", [])) | set(seeds))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(marker, study)

    for seed in seeds:
        single_dir = out / f"single-s{seed}"
        cells = [out / cell_name(o, seed) for o in study["orders"]]
        for order in orders:
            cell_overrides = {**overrides, "order": order, "seed": seed}
            if not RunLayout(single_dir).results.is_file() or not _complete(single_dir):
                log.info("study: FWT reference (single) for seed %d", seed)
                # one reference per seed, trained in order 1 (each task alone: the order does not matter)
                run_method(config, quick, {**cell_overrides, "order": 1}, "single", single_dir,
                           out / "configs" / f"single-s{seed}.yaml", progress=progress, isolate=isolate)
            log.info("study: cell %s", cell_name(order, seed))
            run_bench(config, out / cell_name(order, seed), quick=quick, overrides=cell_overrides,
                      progress=progress, isolate=isolate, methods=methods, single_dir=single_dir,
                      siblings=cells, throughput_study=False)
    return write_study_report(out, command=command, primary=primary, **({} if margin is None else {"margin": margin}))


def _complete(run_dir: Path) -> bool:
    try:
        return bool(read_results(run_dir).get("complete"))
    except (OSError, ValueError):
        return False
