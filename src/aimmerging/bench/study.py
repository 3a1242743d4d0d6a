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

Across work sessions (each a fresh clone, without ``runs/``), ``archive`` (``--archive DIR``,
e.g. ``benchmarks/results/study``, committed to git) carries the finished runs as small JSON
records (:mod:`.study_archive`): every run finished in ``STUDY_DIR`` is archived (those of earlier
calls when the study starts, each new one as soon as it finishes), an archived run is not run
again (refused in one line when it was made with other options), and the report reads the
archive too. A cell whose ``seq`` run is only archived has no first stage to share: each method
then trains its own (the same computation; ``seq`` is not run again); an archived ``single-s<seed>``
serves the FWT reference of its seed from its record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import ConfigError
from ..io import atomic_write_json, atomic_write_yaml
from ..runs.layout import RunLayout
from ..runs.results import read_results
from .runner import load_bench_config, method_config, run_bench, run_method
from .study_archive import (CELL_DIR, SINGLE_DIR, archive_run, archive_study, bench_methods, option_differences,
                            read_archive, record_path, run_record)
from .study_report import write_study_report

log = logging.getLogger("aimmerging")


def cell_name(order: int, seed: int) -> str:
    return f"o{order}-s{seed}"


def run_study(config: str | Path, output_dir: str | Path, orders: list[int], seeds: list[int] | None = None,
              quick: bool = False, overrides: dict[str, Any] | None = None, progress: bool = True,
              methods: list[str] | None = None, isolate: bool = True, command: str | None = None,
              primary: list[str] | None = None, margin: float | None = None,
              archive: str | Path | None = None) -> dict:
    """Run the missing runs of every (order, seed) cell, then write the report (``primary``,
    ``margin``: its family of primary comparisons and equivalence margin; see
    :func:`study_report.build_study_report`). ``archive``: the directory of archived runs that
    carries the study across sessions (see the module's docstring)."""
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
    archived: dict = {}
    if archive is not None:
        done = archive_study(out, archive)  # what earlier calls finished here; damaged input refused first
        if done["written"]:
            log.info("study: archived %d finished run(s) to %s", len(done["written"]), archive)
        archived = read_archive(archive)
        _check_archive(config, quick, overrides, archived, out)

    for seed in seeds:
        single_dir = out / f"single-s{seed}"
        cells = [out / cell_name(o, seed) for o in study["orders"]]
        for order in orders:
            cell_overrides = {**overrides, "order": order, "seed": seed}
            reference = single_dir
            if not RunLayout(single_dir).results.is_file() or not _complete(single_dir):
                if (single_dir.name, "single") in archived:
                    reference = _reference_file(out, seed, *archived[single_dir.name, "single"])
                else:
                    log.info("study: FWT reference (single) for seed %d", seed)
                    # one reference per seed, trained in order 1 (each task alone: the order does not matter)
                    run_method(config, quick, {**cell_overrides, "order": 1}, "single", single_dir,
                               out / "configs" / f"single-s{seed}.yaml", progress=progress, isolate=isolate)
                    _archive(archive, single_dir, single_dir.name, "single")
            cell = cell_name(order, seed)
            log.info("study: cell %s", cell)
            run_bench(config, out / cell, quick=quick, overrides=cell_overrides,
                      progress=progress, isolate=isolate, methods=methods, single_dir=reference,
                      siblings=cells, throughput_study=False,
                      skip=lambda m, cfg, cell=cell: (cell, m) in archived,
                      on_finished=lambda m, run_dir, cell=cell: _archive(archive, run_dir, cell, m))
    return write_study_report(out, command=command, primary=primary, archive=archive,
                              **({} if margin is None else {"margin": margin}))


def _check_archive(config: str | Path, quick: bool, overrides: dict, archived: dict, out: Path) -> None:
    """Refuse, before any run, an archive whose runs were made with other options than this study
    would use for them: another study, not to be mixed with this one."""
    for (cell, method), (record, path) in archived.items():
        cell_match, single_match = CELL_DIR.match(cell), SINGLE_DIR.match(cell)
        order, seed = (1, int(single_match.group(1))) if single_match else map(int, cell_match.groups())
        cfg = method_config(config, quick, {**overrides, "order": order, "seed": seed}, method, out / cell / method)
        different = option_differences(record, cfg)
        if different:
            raise ConfigError(f"{path}: archived with other options ({', '.join(different)}) than this study's "
                              f"{cell}/{method}; choose another --archive")


def _archive(archive: str | Path | None, run_dir: Path, cell: str, method: str) -> None:
    """Archive a run that has just finished (nothing without an archive or a complete run)."""
    if archive is not None and _complete(run_dir):
        record = run_record(run_dir, cell, method, [] if method == "single" else bench_methods(run_dir.parent))
        if archive_run(record, archive) == "written":
            log.info("study: archived %s", record_path(archive, cell, method))


def _reference_file(out: Path, seed: int, record: dict, archived_at: Path) -> Path:
    """A results.json-like file with the FWT reference scores of an archived ``single`` run (what a
    run's ``fwt_reference`` reads), written next to the study's run configs."""
    if not isinstance(record.get("reference_scores"), dict):
        raise ConfigError(f"{archived_at}: no reference scores; delete it to run the FWT reference again")
    path = out / "configs" / f"single-s{seed}-reference.json"
    atomic_write_json(path, {"method": "single", "archived": True, "reference_scores": record["reference_scores"]})
    return path


def _complete(run_dir: Path) -> bool:
    try:
        return bool(read_results(run_dir).get("complete"))
    except (OSError, ValueError):
        return False
