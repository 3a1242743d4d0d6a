"""``aimmerging bench``: every method of the harness on one stream and one model, side by side.

A benchmark config (YAML, e.g. ``benchmarks/standard-cl.yaml``) has::

    name: ...                 # a title for the report
    methods: [seq, ...]       # the methods compared (``single`` is always run: FWT needs it)
    run: {...}                # run options shared by every method (any ``aimmerging run`` key)
    quick: {...}              # what ``--quick`` changes in ``run``
    throughput_steps: 3       # timed steps per lever in the throughput study

Layout of ``BENCH_DIR``::

    bench.yaml                the resolved benchmark config
    configs/<method>.yaml     the run config of each method
    <method>/                 an ordinary run directory per method (resumable like any run)
    throughput.json           peak FLOP rate, FLOPs per token, the lever study
    report.json, report.md, report.png

Every method runs in a process of its own (``python -m aimmerging run``), so peak memory and
timings are its own. The first stage of the sequential methods (plain LoRA fine-tuning of the
first task from the same initial adapter with the same seed: identical for ``seq``, ``replay``,
``merge-*``, ``aimmerging`` and ``single``) is trained once, by ``seq``, and copied into the
other run directories; its time counts in every method's wall time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import build_config, load_yaml, result_options
from ..data.benchmarks import resolve_tasks
from ..errors import ConfigError, UserError
from ..io import atomic_write_json, atomic_write_text, atomic_write_yaml, read_json
from ..methods import builtin_names, resolve_method
from ..protocol import single_overrides
from ..runs.process import bf16_pays
from ..runs.layout import BENCH_FILE, THROUGHPUT, RunLayout, scores_file
from ..runs.results import read_results
from ..runs.rundir import RunDirectory
from .report import bench_markdown, build_report, plot_report

log = logging.getLogger("aimmerging")

DEFAULT_CONFIG = Path("benchmarks/standard-cl.yaml")


def comparable_methods() -> list[str]:
    """The registered methods the bench compares by default (``single`` runs anyway, as the FWT reference)."""
    return [m for m in builtin_names() if resolve_method(m).in_bench]


def shares_first_stage(method: str, run: dict | None = None) -> bool:
    """Whether a method's first stage is plain LoRA fine-tuning from the initial adapter (the
    same for every such method with the same seed): one stage-by-stage (not joint) method whose
    hooks do nothing on a task without memory. Merging methods and ``replay`` are inactive then.
    ``single`` is not, under a protocol that trains it differently (``protocol.single_overrides``)."""
    cls = resolve_method(method)
    if method == "single" and run is not None and _single_overrides(run):
        return False
    return not cls.joint and method in {"seq", "replay", "merge-end", "merge-fixed", "aimmerging", "single",
                                        "forever", "vbm", "rkif"}


def _single_overrides(run: dict) -> dict:
    return single_overrides(build_config({**run, "method": "single"}).to_dict())


def load_bench_config(path: str | Path, quick: bool, overrides: dict[str, Any], methods: list[str] | None = None) -> dict:
    """The resolved benchmark config: ``run`` with ``quick`` and ``overrides`` applied on top."""
    raw = load_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("run"), dict):
        raise ConfigError(f"{path}: a benchmark config needs a 'run' mapping (see benchmarks/standard-cl.yaml)")
    unknown = set(raw) - {"name", "methods", "run", "quick", "throughput_steps"}
    if unknown:
        raise ConfigError(f"{path}: unknown benchmark key(s): {', '.join(sorted(unknown))}")
    known = comparable_methods()
    methods = list(methods or raw.get("methods") or known)
    for m in methods:  # a built-in name, or a user's method by registered name or import path
        if m == "single" or not resolve_method(m).in_bench:
            raise ConfigError(f"{path}: methods: '{m}' is not compared by the bench (it runs 'single' itself); "
                              f"choose from {', '.join(known)} or your own methods")
    run = {**raw["run"], **(raw.get("quick") or {} if quick else {}), **overrides}
    if run.get("mixed_precision") == "auto":  # bf16 autocast where it pays (BENCHMARKS.md), else fp32
        run["mixed_precision"] = "bf16" if bf16_pays() else "no"
    for key in ("method", "output_dir", "fwt_reference"):
        run.pop(key, None)
    name = raw.get("name", Path(path).stem) + (" (quick)" if quick else "")
    cfg = {"name": name, "methods": methods, "run": run, "quick": quick,
           "throughput_steps": int(raw.get("throughput_steps", 3))}
    for method in ["single", *methods]:  # every method's config must be valid before anything runs
        build_config({**run, "method": method})
    return cfg


def _method_config(bench: dict, method: str, out: Path, run_dir: Path | None = None) -> dict:
    values = {**bench["run"], "method": method, "output_dir": str(run_dir or out / method)}
    if method == "single":
        values.update(_single_overrides(bench["run"]))
    return build_config(values).to_dict()


def method_config(config: str | Path, quick: bool, overrides: dict, method: str, run_dir: Path) -> dict:
    """The run config of one method of the benchmark ``config`` run in ``run_dir``."""
    return _method_config(load_bench_config(config, quick, overrides, None), method, run_dir.parent, run_dir)


def run_method(config: str | Path, quick: bool, overrides: dict, method: str, run_dir: Path, cfg_path: Path,
               progress: bool = True, isolate: bool = True) -> None:
    """One method of the benchmark ``config`` in ``run_dir`` (resumable), outside a bench directory."""
    cfg = method_config(config, quick, overrides, method, run_dir)
    atomic_write_yaml(cfg_path, cfg)
    _run_module(["aimmerging.bench.worker", str(cfg_path), *([] if progress else ["--no-progress"])],
                f"method {method}", isolate)


def _run_module(args: list[str], log_hint: str, isolate: bool) -> None:
    """``python -m ARGS`` in a child process (own peak memory and timings), or the same module's
    ``main(ARGS[1:])`` in this process."""
    if isolate:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.run([sys.executable, "-m", *args], env=env).returncode
    else:
        import importlib

        code = importlib.import_module(args[0]).main(args[1:])
    if code != 0:
        raise UserError(f"{log_hint} failed (exit {code}); rerun `aimmerging bench` with the same "
                        "options to resume")


def share_stages(src: Path, method_cfg: dict, method_dir: Path, count: int = 1) -> int:
    """Copy the finished stages 0 .. count-1 of the run in ``src`` into the run directory of
    ``method_cfg`` (created if needed) where it lacks them; the caller knows they compute the same.
    Returns how many were copied."""
    target = RunLayout(method_dir)
    if target.config.is_file() and _computed(load_yaml(target.config)) != _computed(method_cfg):
        return 0  # a different run lives there; the run itself decides what to do with it
    source, run_dir = RunDirectory(src), RunDirectory(method_dir)
    copied = 0
    for index in range(count):
        stages = sorted(RunLayout(src).stages.glob(f"{index:02d}-*"))
        if not stages or not scores_file(stages[0]).is_file():
            break
        if run_dir.stage_dir(stages[0].name).exists():
            continue
        run_dir.lock()  # as a run would: refused in one line if a run works there now
        try:
            if not target.config.is_file():
                run_dir.init(build_config(method_cfg), replace=False)
            copied += run_dir.copy_stage(source, stages[0].name)
        finally:
            run_dir.unlock()
    return copied


def _shared_prefix(method: str, cfg: dict, out: Path, siblings: list[Path]) -> None:
    """Stages another cell of a study has finished and this run would compute identically: the
    same method and options but the task order, whose first k tasks are the same (a stage-by-stage
    method's stage i depends only on tasks 0..i; the last stage, which scores every task, is
    never shared)."""
    if resolve_method(method).joint or method == "single":
        return
    tasks = _tasks(cfg)
    if tasks is None:
        return
    mine = _computed(cfg, _CELL_KEYS)
    for other in siblings:
        src = other / method
        if src.resolve() == (out / method).resolve() or not RunLayout(src).config.is_file():
            continue
        theirs = load_yaml(RunLayout(src).config)
        if _computed(theirs, _CELL_KEYS) != mine:
            continue
        other_tasks = _tasks(theirs)
        if other_tasks is None:
            continue
        k = 0
        while k < min(len(tasks), len(other_tasks)) - 1 and tasks[k] == other_tasks[k]:
            k += 1
        if k and share_stages(src, cfg, out / method, k):
            log.info("bench: %s shares its first %d stage(s) with %s", method, k, src)


def _computed(cfg: dict, also: frozenset | set = frozenset()) -> dict:
    """What a run config computes (``config.result_options``: not where it writes, nor whether it
    shows progress, which the bench's --no-progress gives the worker as a flag), less the keys in
    ``also``."""
    return {k: v for k, v in result_options(cfg).items() if k not in also}


def _tasks(cfg: dict) -> list[str] | None:
    if cfg.get("data"):
        return None  # a task-stream file: not a named order
    try:
        return resolve_tasks(cfg.get("benchmark"), int(cfg.get("order", 1)), cfg.get("tasks"))
    except ConfigError:
        return None


_CELL_KEYS = {"order", "output_dir", "fwt_reference", "tasks"}


def run_bench(config: str | Path, output_dir: str | Path, quick: bool = False, overrides: dict | None = None,
              progress: bool = True, isolate: bool = True, methods: list[str] | None = None,
              single_dir: str | Path | None = None, siblings: list[Path] | None = None,
              throughput_study: bool = True, skip: Optional[Callable[[str, dict], bool]] = None,
              on_finished: Optional[Callable[[str, Path], None]] = None) -> dict:
    """Every method of ``config`` in ``output_dir`` (resumable). ``methods``: a subset (a shard:
    several invocations with different subsets fill the same directory). ``single_dir``: a
    finished FWT reference (its run directory, or a results.json with its reference scores) to
    use instead of running ``single`` here (a study shares one per seed). ``siblings``: other
    cells of a study whose finished stages may be shared. ``skip(method, run config)``: whether a
    method is done elsewhere (a study's archive) and is not run; a method whose first stage would
    come from a skipped ``seq`` trains it itself (the same computation). ``on_finished(method,
    run directory)``: called after each method's run."""
    bench = load_bench_config(config, quick, overrides or {}, methods)
    chosen = list(bench["methods"])
    # bench.yaml lists every method planned (the config's, and every shard's)
    planned = load_bench_config(config, quick, overrides or {}, None)["methods"] if methods else []
    out = Path(output_dir)
    resolved = out / BENCH_FILE
    before = load_yaml(resolved) if resolved.is_file() else None
    if before is not None and {k: v for k, v in before.items() if k != "methods"} != \
            {k: v for k, v in bench.items() if k != "methods"}:
        raise ConfigError(f"{out} holds a benchmark with a different config; choose another --output-dir")
    bench["methods"] = list(dict.fromkeys([*planned, *((before or {}).get("methods") or []), *chosen]))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(resolved, bench)
    flags = [] if progress else ["--no-progress"]

    throughput = out / THROUGHPUT
    if throughput_study and not throughput.is_file():
        cfg_path = out / "configs" / "seq.yaml"
        atomic_write_yaml(cfg_path, _method_config(bench, "seq", out))
        log.info("throughput study (peak FLOP rate, FLOPs per token, levers)")
        _run_module(["aimmerging.bench.throughput", str(cfg_path), str(throughput), str(bench["throughput_steps"])],
                        "throughput study", isolate)

    reference = Path(single_dir) if single_dir is not None else out / "single"
    order = ["seq", *([] if single_dir is not None else ["single"]), *[m for m in chosen if m != "seq"]]
    walls: dict[str, float] = {}
    for method in order:
        cfg = _method_config(bench, method, out)
        if method not in ("seq", "single", "mtl"):
            cfg["fwt_reference"] = str(reference)
        if skip is not None and skip(method, cfg):
            log.info("bench: %s is archived, not run", method)
            continue
        _shared_prefix(method, cfg, out, siblings or [])
        if method != "seq" and shares_first_stage(method, bench["run"]):
            share_stages(out / "seq", cfg, out / method)
        cfg_path = out / "configs" / f"{method}.yaml"
        atomic_write_yaml(cfg_path, cfg)
        log.info("bench: %s", method)
        start = time.perf_counter()
        _run_module(["aimmerging.bench.worker", str(cfg_path), *flags], f"method {method}", isolate)
        walls[method] = time.perf_counter() - start
        if on_finished is not None:
            on_finished(method, out / method)

    if not throughput.is_file():
        return {"name": bench["name"], "methods": list(bench["methods"])}  # a study cell: the study report covers it
    names = ["seq", *[m for m in bench["methods"] if m != "seq"]]
    runs = {m: read_results(out / m) for m in names if RunLayout(out / m).results.is_file()}
    runs["single"] = read_results(reference)
    report = build_report(bench, runs, read_json(throughput), process_walls=walls)
    atomic_write_json(out / "report.json", report)
    plot_report(report, out / "report.png")
    atomic_write_text(out / "report.md", bench_markdown(report, command=_command(config, out, quick)))
    return report


def _command(config, out, quick) -> str:
    parts = ["aimmerging bench"]
    if Path(config) != DEFAULT_CONFIG:
        parts.append(f"--config {config}")
    if quick:
        parts.append("--quick")
    parts.append(f"--output-dir {out}")
    return " ".join(parts)
