"""Run a method through a task stream: the outer loop over stages, evaluation, saving, resume.

Run directory layout::

    RUN_DIR/config.yaml               fully resolved config (written first)
    RUN_DIR/stages/00-<task>/         one committed directory per finished stage:
        adapter/                      the adapter after the stage, PEFT format
        predictions/<task>.jsonl      {id, gold, prediction, score} per test example
        trace.jsonl                   per-step and per-merge records of the stage
        scores.json                   the stage's row of the accuracy matrix, timings (written last)
    RUN_DIR/stages/zero-shot/         (--zero-shot) the base model's scores
    RUN_DIR/trace.jsonl               all stage traces, in order
    RUN_DIR/results.json              matrix, metrics, timings; "complete": false until the end
    RUN_DIR/summary.md                the markdown table printed at the end

A stage is trained and evaluated in ``stages/.tmp-<name>/`` and renamed into place only when
everything in it is written, so a run killed at any moment resumes at its first unfinished stage.

Several processes (``accelerate launch --multi_gpu --num_processes N -m aimmerging run ...``, or
``torchrun``): every process runs this same code on the same global example lists; the engine
shards the batches (data parallel, DDP through ``accelerator.prepare``), losses are reduced over
the processes, so every process takes the same merge decisions and keeps a bit-identical
adapter. Only the main process writes files; every decision that depends on the files (does the
run directory fit this config, which stages are finished) is made after a barrier, or made by the
main process and broadcast. On a machine without GPU the processes run on CPU with gloo.

Debugging hook, off by default: with ``AIMMERGING_RANK_DUMP=DIR`` in the environment every
process writes, at the end of the run, ``DIR/rank<N>.safetensors`` (its LoRA tensors by
parameter name) and ``DIR/rank<N>.json`` (``{"rank", "num_processes", "records"}``: the trace
records it emitted in this invocation, merges included; stages skipped on resume emit none), so
tests can check that all processes took the same decisions and hold the same adapter.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from ..config import RunConfig, load_yaml
from ..data.benchmarks import resolve_tasks
from ..data.formatting import Formatter
from ..data.sampling import build_memory
from ..data.stream import DEV_IS_TEST, TaskData, load_stream, validation_set
from ..errors import ConfigError, UserError
from ..evaluation.generate import generate_predictions
from ..evaluation.scoring import SCORERS
from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text, atomic_write_yaml, commit_dir, read_json, read_jsonl
from ..methods import get_method
from ..models.lora import attach_lora, load_adapter_weights, lora_parameters, restore, snapshot
from ..models.loading import load_base_model
from ..reporting.results import build_results, load_reference, summary_markdown
from .engine import Engine, Timers
from .loop import Stage, train_stage

log = logging.getLogger("aimmerging")


def plan_stages(method, tasks: list[str], scope: str) -> list[Stage]:
    """The stages of a run and the tasks evaluated after each (its row of the matrix)."""
    T = len(tasks)
    if method.joint:
        return [Stage(0, "all", list(tasks), row=T - 1, eval_tasks=list(tasks))]
    stages = []
    for i, task in enumerate(tasks):
        if scope == "all":
            evals = tasks[: i + 1]
        elif method.fresh_adapter_per_task or i < T - 1:
            evals = [task]  # the diagonal (BWT, FWT) ...
        else:
            evals = list(tasks)  # ... and the last row (OP, BWT)
        stages.append(Stage(i, task, [task], row=i, eval_tasks=list(evals)))
    return stages


def check_run_dir(cfg: RunConfig) -> bool:
    """Check that the run directory is new or belongs to this config. Returns True when an
    existing run with another config is to be replaced (``--overwrite``). Writes nothing."""
    run_dir = cfg.run_dir
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        old = load_yaml(config_file)
        new = cfg.fingerprint()
        differ = sorted(k for k in new if old.get(k) != new[k])
        if differ and not cfg.overwrite:
            raise ConfigError(f"{run_dir} holds a run with a different config (differs in: {', '.join(differ)}); "
                              "pass --overwrite to replace it or choose another --output-dir")
        return bool(differ)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir} exists and is not an aimmerging run directory; choose another --output-dir")
    return False


def init_run_dir(cfg: RunConfig, replace: bool, is_main: bool) -> Path:
    """Create (or replace) the run directory, write config.yaml, drop leftovers of a killed run."""
    run_dir = cfg.run_dir
    config_file = run_dir / "config.yaml"
    if is_main:
        if replace:
            shutil.rmtree(run_dir)
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        for tmp in (run_dir / "stages").glob(".tmp-*"):  # leftovers of a killed run
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_yaml(config_file, cfg.to_dict())
    return run_dir


RANK_DUMP_ENV = "AIMMERGING_RANK_DUMP"


def _cpu_processes() -> bool:
    """True for one of several processes (``torchrun``, ``accelerate launch --multi_gpu``) on a
    machine without an accelerator: accelerate joins them with gloo only when told ``cpu=True``,
    and would otherwise run every process alone. (``ACCELERATE_USE_CPU=1`` forces the same.)"""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    device_api = getattr(torch, "accelerator", None)
    return not (device_api.is_available() if device_api is not None else torch.cuda.is_available())


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _warn_single_cpu_process(num_processes: int) -> None:
    """``accelerate launch --cpu --num_processes N`` (N > 1) starts a single process unless it
    goes through mpirun (``--mpirun_hostfile``): it sets MASTER_ADDR for N processes but no
    WORLD_SIZE. Say so instead of silently training on one process."""
    env = os.environ
    if (num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            and "MASTER_ADDR" in env and "WORLD_SIZE" not in env):
        log.warning("running as a single process: `accelerate launch --cpu --num_processes N` starts one "
                    "process unless it goes through mpirun (--mpirun_hostfile). For N CPU processes use "
                    "`accelerate launch --multi_gpu --num_processes N ...` on a machine without GPU "
                    "(add ACCELERATE_USE_CPU=1 where there is one) or `torchrun --nproc_per_node N -m aimmerging run ...`")


def check_data_parallel(accelerator) -> None:
    """Only one process or data-parallel processes (DDP) are supported. Under FSDP/DeepSpeed the
    LoRA matrices are sharded outside forward/backward (and accelerate wants the optimizers
    prepared with the model), which the merge arithmetic, the controller's L1 norm, adapter
    loading and saving, and sharded evaluation do not handle: stop at once rather than deadlock
    or diverge. (On CPU accelerate itself refuses FSDP when the Accelerator is created.)"""
    from accelerate.utils import DistributedType

    kinds = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
             DistributedType.MEGATRON_LM: "Megatron-LM"}
    name = kinds.get(accelerator.distributed_type)
    if name:
        raise ConfigError(f"{name} is not supported: aimmerging runs one process or data-parallel processes (DDP); "
                          "launch with e.g. `accelerate launch --config_file configs/accelerate/ddp.yaml -m aimmerging run ...`")


class Runner:
    def __init__(self, cfg: RunConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        # The models' buffers (rotary tables) never change: no need to broadcast them every forward.
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=_cpu_processes(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        check_data_parallel(self.accelerator)
        _warn_single_cpu_process(self.accelerator.num_processes)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.is_main = self.accelerator.is_main_process
        self.tasks = resolve_tasks(cfg.benchmark, cfg.order, cfg.tasks)
        self.method = get_method(cfg.method)(cfg)
        self.stream: dict[str, TaskData] = load_stream(cfg, self.tasks)
        self._warn_dev_is_test()
        self.reference = load_reference(cfg.fwt_reference, self.tasks) if cfg.fwt_reference else None
        self.stages = plan_stages(self.method, self.tasks, cfg.eval_scope)
        self.progress = cfg.progress
        self.rank_records: list[dict] | None = [] if os.environ.get(RANK_DUMP_ENV) else None

    def _warn_dev_is_test(self) -> None:
        overlap = DEV_IS_TEST & set(self.tasks)
        if self.cfg.select_best_every and overlap:
            log.warning("model selection reads the dev split, which is a copy of the test split for %s "
                        "in the shared long-sequence data: their test scores are optimistic", ", ".join(sorted(overlap)))

    # -- model -------------------------------------------------------------------------------------
    def _build_engine(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        with self.accelerator.main_process_first():  # a download or conversion happens once
            model, tokenizer, kind = load_base_model(cfg.model, cfg.dtype)
        model.config.use_cache = False
        self.formatter = Formatter(tokenizer, kind, cfg.max_input_tokens, cfg.max_target_tokens, cfg.prompt_format)
        set_seed(cfg.seed)
        model = attach_lora(model, kind, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        self.initial_adapter = snapshot(lora_parameters(model))
        model = self.accelerator.prepare(model)
        self.engine = Engine(model, self.formatter, self.accelerator, micro_batch_size=cfg.micro_batch_size,
                             max_grad_norm=cfg.max_grad_norm)

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, tasks: list[str], out_dir: Path | None, label: str) -> dict[str, float]:
        scores: dict[str, float] = {}
        model = self.engine.peft_model
        for task in tasks:
            data = self.stream[task]
            max_new = self.cfg.max_new_tokens or self.formatter.max_new_tokens(data.outputs)
            preds = generate_predictions(model, self.formatter, data.test, batch_size=self.cfg.eval_batch_size,
                                         max_new_tokens=max_new, accelerator=self.accelerator,
                                         desc=f"{label} eval {task}", progress=self.progress)
            scorer = SCORERS[data.metric]
            per = [scorer(p, e.output) for p, e in zip(preds, data.test)]
            scores[task] = sum(per) / len(per)
            if out_dir is not None and self.is_main:
                atomic_write_jsonl(out_dir / "predictions" / f"{task}.jsonl",
                                   [{"id": e.id, "gold": e.output, "prediction": p, "score": s}
                                    for e, p, s in zip(data.test, preds, per)])
        return scores

    # -- one stage -------------------------------------------------------------------------------------
    def _stage_dir(self, name: str) -> Path:
        return self.cfg.run_dir / "stages" / name

    def _train_and_save(self, stage: Stage, current: int | None) -> dict:
        cfg, acc = self.cfg, self.accelerator
        params = self.engine.params
        if self.method.fresh_adapter_per_task or stage.index == 0:
            restore(params, self.initial_adapter)
        elif current != stage.index - 1:
            load_adapter_weights(self.engine.peft_model, self._stage_dir(self.stages[stage.index - 1].dirname) / "adapter")
        earlier = self.tasks[: stage.index] if not self.method.joint else []
        memory = (build_memory([self.stream[t].train for t in earlier], cfg.memory_ratio, cfg.seed, cfg.memory_cap_per_task)
                  if self.method.uses_memory else [])
        train = [e for t in stage.train_tasks for e in self.stream[t].train]
        val = validation_set(self.stream, self.tasks[: stage.index + 1], cfg.val_per_task, cfg.seed) if cfg.select_best_every else None
        tmp = self._stage_dir(f".tmp-{stage.dirname}")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        timers, start = Timers(), time.perf_counter()
        log.info("stage %d/%d: %s (%d training examples, memory %d)", stage.index + 1, len(self.stages),
                 stage.name, len(train), len(memory))
        report = train_stage(self.engine, cfg, stage, train, memory, self.method, timers, tmp / "trace.jsonl",
                             val=val, progress=self.progress, sink=self.rank_records)
        with timers.section("eval"):
            scores = self.evaluate(stage.eval_tasks, tmp, f"[{stage.index + 1}]")
        record = {"index": stage.index, "name": stage.name, "row": stage.row, "scores": scores, **report,
                  "memory_size": len(memory), "timing": timers.as_dict(),
                  "wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": _peak_rss_mb()}
        if self.is_main:
            self.engine.peft_model.save_pretrained(str(tmp / "adapter"))
            atomic_write_json(tmp / "scores.json", record)  # last: its presence marks a finished stage
            commit_dir(tmp, self._stage_dir(stage.dirname))
        acc.wait_for_everyone()
        return record

    # -- the whole run ---------------------------------------------------------------------------------
    def _main_decides(self, fn):
        """``fn()`` on the main process only; its result, or the UserError it raised, is handed
        to every process, so a failed check fails everywhere at once instead of leaving the
        other processes waiting at the next collective."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [None, None]
        if acc.is_main_process:
            try:
                box[0] = fn()
            except UserError as e:
                box[1] = e
        broadcast_object_list(box, from_process=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def _dump_rank_state(self) -> None:
        """The AIMMERGING_RANK_DUMP hook (see the module docstring)."""
        from safetensors.torch import save_file

        out = Path(os.environ[RANK_DUMP_ENV])
        rank = self.accelerator.process_index
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.engine.peft_model.named_parameters() if "lora_" in n}
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"rank{rank}.safetensors"))
        atomic_write_json(out / f"rank{rank}.json", {"rank": rank, "num_processes": self.accelerator.num_processes,
                                                      "records": self.rank_records})

    def run(self) -> dict:
        cfg = self.cfg
        replace = self._main_decides(lambda: check_run_dir(cfg))
        self._build_engine()
        init_run_dir(cfg, replace, self.is_main)
        self.accelerator.wait_for_everyone()
        previous = cfg.run_dir / "results.json"  # a resumed run's, written by the processes before
        self._earlier_peak_rss = read_json(previous).get("peak_rss_mb") if previous.is_file() else None
        zero_shot = None
        if cfg.zero_shot:
            zdir = self._stage_dir("zero-shot")
            if (zdir / "scores.json").is_file():
                zero_shot = read_json(zdir / "scores.json")["scores"]
            else:
                restore(self.engine.params, self.initial_adapter)
                tmp = self._stage_dir(".tmp-zero-shot")
                zero_shot = self.evaluate(self.tasks, tmp, "[zero-shot]")
                if self.is_main:
                    atomic_write_json(tmp / "scores.json", {"scores": zero_shot})
                    commit_dir(tmp, zdir)
                self.accelerator.wait_for_everyone()
        records: list[dict] = []
        current: int | None = None
        for stage in self.stages:
            done = self._stage_dir(stage.dirname) / "scores.json"
            if done.is_file():
                log.info("stage %d/%d: %s already finished, skipped", stage.index + 1, len(self.stages), stage.name)
                records.append(read_json(done))
                continue
            records.append(self._train_and_save(stage, current))
            current = stage.index
            self._write_results(records, zero_shot, complete=False)
        results = self._write_results(records, zero_shot, complete=True)
        if self.rank_records is not None:
            self._dump_rank_state()
        self.accelerator.wait_for_everyone()  # every process returns once the files are written
        return results

    def _write_results(self, records: list[dict], zero_shot, complete: bool) -> dict:
        cfg = self.cfg
        rows = {r["row"]: r["scores"] for r in records}
        stages = [{k: v for k, v in r.items() if k != "scores"} for r in records]
        results = build_results(cfg_dict=cfg.to_dict(), tasks=self.tasks, rows=rows,
                                task_metrics={t: d.metric for t, d in self.stream.items()},
                                reference=self.reference, zero_shot=zero_shot, stages=stages,
                                complete=complete, single=self.method.fresh_adapter_per_task)
        # the peak over the processes that worked on the run: each stage records its process's peak
        # at its end; a resumed run's earlier results.json covers stages written without one
        peaks = [p for p in [s.get("peak_rss_mb") for s in stages] + [self._earlier_peak_rss] if p]
        results["peak_rss_mb"] = max(peaks) if peaks else _peak_rss_mb()
        results["num_processes"] = self.accelerator.num_processes
        if self.is_main:
            run_dir = cfg.run_dir
            if complete:
                traces = []
                for r in records:
                    path = self._stage_dir(f"{r['index']:02d}-{r['name']}") / "trace.jsonl"
                    if path.is_file():
                        traces.extend(read_jsonl(path))
                atomic_write_jsonl(run_dir / "trace.jsonl", traces)
                atomic_write_text(run_dir / "summary.md", summary_markdown(results) + "\n")
            atomic_write_json(run_dir / "results.json", results)
            if complete:
                from ..reporting.plots import plot_run

                plot_run(run_dir)
        return results


def run(cfg: RunConfig) -> dict:
    return Runner(cfg).run()
