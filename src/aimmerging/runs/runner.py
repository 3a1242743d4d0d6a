"""Run a method through a task stream: the outer loop over stages.

:class:`Runner` builds what a run needs (process set-up, stream, model with its LoRA adapter,
method), then loops over the stages: train (``training.loop``), evaluate (``evaluation``),
commit the stage to the run directory (``rundir``), and returns the results. With a run
directory, the main process locks it for the whole run, and the stages an earlier invocation
finished are verified before anything is built (a damaged one stops every process with one
line; see ``rundir``). Without a run
directory (the Python API's ``output_dir=None``) nothing is written and everything stays in
memory. Plots are not drawn here: the CLI and the demo draw them from the run directory.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import RunConfig, run_notes
from ..data.benchmarks import SYNTHETIC, resolve_tasks
from ..data.formatting import Formatter
from ..data.memory import ReplayMemory
from ..data.stream import DEV_SOURCES, TaskStream, holdout_validation_set, prepare_tasks, validation_set
from ..errors import ConfigError
from ..evaluation.evaluate import evaluate_tasks
from ..evaluation.generate import half_precision_dtype
from ..evaluation.scoring import choose_metric, use_scores
from ..io import atomic_write_json, read_jsonl
from ..methods.base import Method
from ..models.loading import enable_gradient_checkpointing, load_base_model, model_kind
from ..models.lora import attach_lora, load_adapter_weights, lora_parameters, restore, snapshot
from ..models.sharding import shard_base
from ..training.engine import Engine, Timers
from ..training.loop import TrainSettings, train_stage
from ..training.stages import Stage, plan_stages, stage_dirname
from .process import (RANK_DUMP_ENV, fsdp_requested, main_decides, make_accelerator, peak_rss_mb, stage_memory,
                      start_stage_memory)
from .results import RunResult, build_results, load_reference
from .layout import ZERO_SHOT, stage_trace
from .rundir import RunDirectory

log = logging.getLogger("aimmerging")


def stream_from_config(cfg: RunConfig) -> TaskStream:
    """The task stream a config names: a task-stream file (``--data``), or ``--tasks`` /
    ``--benchmark/--order`` read from ``--data-dir`` (the synthetic stream needs none)."""
    if cfg.data:
        from ..data.files import load_stream_file

        def tokenizer():  # only chat rows need it, to render their prompts with the chat template
            return load_base_model(cfg.model, cfg.dtype, trust_remote_code=cfg.trust_remote_code)[1]

        stream = load_stream_file(cfg.data, input_field=cfg.input_field, output_field=cfg.output_field,
                                  tokenizer=tokenizer)
        if cfg.tasks and list(cfg.tasks) != stream.tasks:
            missing = [t for t in cfg.tasks if t not in stream.tasks]
            if missing:
                raise ConfigError(f"tasks: not in {cfg.data}: {', '.join(missing)} (tasks: {', '.join(stream.tasks)})")
            return TaskStream(cfg.tasks, stream.split, stream.description)
        return stream
    tasks = resolve_tasks(cfg.benchmark, cfg.order, cfg.tasks)
    if cfg.benchmark == SYNTHETIC and not cfg.data_dir:
        return TaskStream.synthetic(seed=cfg.seed, tasks=tasks)
    if not cfg.data_dir:
        raise ConfigError("data_dir: required for this task stream (--data-dir DIR)")
    return TaskStream.from_olora(cfg.data_dir, tasks)


@dataclass
class Built:
    """The model side of a run: the prepared model wrapped in an Engine, and the initial adapter."""

    engine: Engine
    formatter: Formatter
    initial_adapter: list[torch.Tensor]


def build_engine(cfg: RunConfig, accelerator, model: Any = None, *, full_logits: bool = False,
                 rank_multiplier: int = 1, shard: bool = False) -> Built:
    """Load the base model (or take ``(model, tokenizer)``), attach LoRA with the run seed, prepare
    it with accelerate (``shard``: shard its base over the processes with FSDP2 instead, see
    ``models.sharding``) and wrap it in an :class:`Engine`."""
    from accelerate.utils import set_seed

    if model is None:
        with accelerator.main_process_first():  # a download or conversion happens once
            base, tokenizer, kind = load_base_model(cfg.model, cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                                    quantize=cfg.quantize)
    else:
        base, tokenizer = model
        kind = model_kind(base.config)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    base.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    formatter = Formatter(tokenizer, kind, cfg.max_input_tokens, cfg.max_target_tokens, cfg.prompt_format,
                          truncation=cfg.truncation, truncate_eval_prompts=cfg.truncate_eval_prompts)
    set_seed(cfg.seed)
    # rank_multiplier: the method's adapter_rank_multiplier (O-LoRA: one rank slot per task); alpha
    # grows with the rank so that PEFT's scaling alpha / r stays the same
    peft_model = attach_lora(base, kind, cfg.lora_r * rank_multiplier, cfg.lora_alpha * rank_multiplier,
                             cfg.lora_dropout, cfg.lora_targets)
    initial = snapshot(lora_parameters(peft_model))
    if shard:
        blocks = shard_base(peft_model, accelerator.device)
        if accelerator.is_main_process:
            log.info("fsdp: the base model is sharded over %d processes (%d blocks and the root, FSDP2); the LoRA "
                     "adapter is whole on each", accelerator.num_processes, blocks)
        prepared = peft_model
    else:
        prepared = accelerator.prepare(peft_model)
    engine = Engine(prepared, formatter, accelerator, micro_batch_size=cfg.micro_batch_size,
                    max_grad_norm=cfg.max_grad_norm, full_logits=full_logits, sharded=shard)
    return Built(engine, formatter, initial)


def stage_use_scores(evals: dict, data: dict, scoring: str) -> dict[str, dict[str, float]]:
    """{use: {task: score}} where the protocol scores a stage's answers differently for OP or FWT."""
    out: dict[str, dict[str, float]] = {}
    for task, e in evals.items():
        for use, score in use_scores(task, data[task].metric, e.rows, scoring).items():
            out.setdefault(use, {})[task] = score
    return out


class Runner:
    def __init__(self, cfg: RunConfig, *, stream: TaskStream | None = None, model: Any = None,
                 method: Method | None = None, run_dir: RunDirectory | None = None):
        self.cfg = cfg
        self.sharded = fsdp_requested(cfg.fsdp)
        self.accelerator = make_accelerator(cfg.mixed_precision, fsdp=self.sharded)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.is_main = self.accelerator.is_main_process
        self.method = method or cfg.make_method()
        self._check_sharding()
        self.stream = stream or stream_from_config(cfg)
        self.tasks = self.stream.tasks
        self.data = prepare_tasks(self.stream, seed=cfg.seed, eval_seed=cfg.eval_seed, train_cap=cfg.train_cap, eval_cap=cfg.eval_cap,
                                  eval_split=cfg.eval_split,
                                  need_dev=bool(cfg.select_best_every) and cfg.validation == "dev",
                                  holdout=cfg.val_holdout if cfg.select_best_every and cfg.validation == "train-holdout" else None,
                                  dev_test_overlap=cfg.dev_test_overlap,
                                  metric_for=lambda task, train: (cfg.metric or {}).get(task)
                                  or choose_metric(task, (e.output for e in train)))
        unknown = set(cfg.metric or {}) - set(self.tasks)
        if unknown:
            raise ConfigError(f"metric: override for task(s) not in the stream: {', '.join(sorted(unknown))}")
        self._log_validation_sources()
        if self.is_main:
            for note in run_notes(cfg):  # one line each: a config that runs, but likely not as meant
                log.warning(note)
        self.reference = load_reference(cfg.fwt_reference, self.tasks) if cfg.fwt_reference else None
        self.stages = plan_stages(self.method, self.tasks, cfg.eval_scope)
        self.train_settings = TrainSettings.from_config(cfg)
        self.model = model
        self.run_dir = run_dir
        self.records: list[dict] = []  # every trace record emitted by this process in this invocation
        self.timers_total: dict[str, float] = {}

    def _check_sharding(self) -> None:
        """FSDP: refused in one line for what it cannot run; on one process nothing is sharded."""
        if not self.sharded:
            return
        if self.accelerator.num_processes == 1:
            if self.is_main:
                log.warning("fsdp: one process, nothing to shard: the run goes on unsharded (launch several "
                            "processes, e.g. `accelerate launch --num_processes 2 -m aimmerging run ... --fsdp`)")
            self.sharded = False
            return
        if self.method.own_forward_passes:
            raise ConfigError(f"fsdp: method {self.method.name} runs forward passes of its own on each process's share, "
                              "which a sharded base cannot serve; run it without --fsdp (DDP)")
        if self.cfg.quantize != "no":
            raise ConfigError("fsdp: a quantized base (--quantize) is not sharded; run it without --fsdp")

    def _log_validation_sources(self) -> None:
        by_source: dict[str, list[str]] = {}
        for task, d in self.data.items():
            if d.dev_source and d.dev_source != "dev":
                by_source.setdefault(d.dev_source, []).append(task)
        for source, tasks in by_source.items():
            if source == "dev-overlap-kept":
                log.warning("model selection reads dev examples that are also scored (%s split) for %s: their "
                            "scores are optimistic (--dev-test-overlap holdout avoids it)", self.cfg.eval_split,
                            ", ".join(tasks))
            else:
                log.info("validation of %s: %s", ", ".join(tasks), DEV_SOURCES[source])

    def _eval_autocast(self):
        return half_precision_dtype(self.accelerator.device) if self.cfg.eval_precision == "half" else None

    # -- one stage -------------------------------------------------------------------------------------
    def _start_adapter(self, stage: Stage, current: int | None) -> None:
        params = self.engine.params
        if self.method.fresh_adapter_per_task or stage.index == 0:
            restore(params, self.built.initial_adapter)
        elif current != stage.index - 1:  # resuming: the previous stage's saved adapter and method state
            previous = self.stages[stage.index - 1].dirname
            self._load_stage_adapter(previous)
            state = self.run_dir.method_state(previous)  # verified with the stage (``_verified_stages``)
            if state:
                self.method.load_state_dict(state)

    def _load_stage_adapter(self, dirname: str) -> None:
        """A finished stage's adapter into the model: checked (loads, finite, fits the model) and
        loaded on the main process, whose verdict stops every process; then loaded on the others."""
        rd, model = self.run_dir, self.engine.peft_model
        main_decides(self.accelerator, lambda: rd.load_adapter(model, dirname))
        if not self.is_main:
            load_adapter_weights(model, rd.adapter_dir(dirname))

    def _train_stage(self, stage: Stage, current: int | None) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self._start_adapter(stage, current)
        earlier = self.tasks[: stage.index] if not self.method.joint else []
        memory = (ReplayMemory.reference([self.data[t].train for t in earlier], cfg.memory_ratio, cfg.seed,
                                         cfg.memory_cap_per_task)
                  if self.method.uses_memory else ReplayMemory())
        train = [e for t in stage.train_tasks for e in self.data[t].train]
        val = None
        if cfg.select_best_every and cfg.validation == "train-holdout":
            val = holdout_validation_set(self.data, stage.train_tasks, cfg.seed)
        elif cfg.select_best_every:
            val = validation_set(self.data, self.tasks[: stage.index + 1], cfg.val_per_task, cfg.seed)
        writes = self.run_dir is not None and self.is_main
        trace = None
        if writes:
            trace = open(stage_trace(self.run_dir.begin_stage(stage.dirname)), "a", encoding="utf-8")
        acc.wait_for_everyone()
        memory_reset = start_stage_memory()
        timers, start = Timers(), time.perf_counter()
        log.info("stage %d/%d: %s (%d training examples, memory %d)", stage.index + 1, len(self.stages),
                 stage.name, len(train), len(memory))
        try:
            report = train_stage(self.engine, self.train_settings, stage, train, memory, self.method, timers, trace,
                                 val=val, progress=cfg.progress, sink=self.records)
        finally:
            if trace is not None:
                trace.close()
        with timers.section("eval"):
            evals = evaluate_tasks(self.engine.peft_model, self.built.formatter, self.data, stage.eval_tasks,
                                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                   accelerator=acc, label=f"[{stage.index + 1}]", progress=cfg.progress,
                                   autocast_dtype=self._eval_autocast(), deal_batches=not self.sharded)
        use = stage_use_scores(evals, self.data, cfg.scoring)
        record = {"index": stage.index, "name": stage.name, "row": stage.row,
                  "scores": {t: e.score for t, e in evals.items()}, **({"use_scores": use} if use else {}), **report,
                  "memory_size": len(memory), "timing": timers.as_dict(),
                  "wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb(),
                  **stage_memory(memory_reset)}
        if writes:
            self.run_dir.commit_stage(stage.dirname, record, {t: e.rows for t, e in evals.items()},
                                      self.engine.peft_model, self.method.state_dict())
        acc.wait_for_everyone()
        return record

    def _zero_shot(self) -> Optional[dict]:
        if not self.cfg.zero_shot:
            return None
        done = self._finished.get(ZERO_SHOT)
        if done is not None:
            return done["scores"]
        restore(self.engine.params, self.built.initial_adapter)
        evals = evaluate_tasks(self.engine.peft_model, self.built.formatter, self.data, self.tasks,
                               batch_size=self.cfg.eval_batch_size, max_new_tokens=self.cfg.max_new_tokens,
                               accelerator=self.accelerator, label="[zero-shot]", progress=self.cfg.progress,
                               autocast_dtype=self._eval_autocast(), deal_batches=not self.sharded)
        scores = {t: e.score for t, e in evals.items()}
        if self.run_dir is not None and self.is_main:
            self.run_dir.commit_stage(ZERO_SHOT, {"scores": scores}, {t: e.rows for t, e in evals.items()})
        self.accelerator.wait_for_everyone()
        return scores

    # -- the whole run ---------------------------------------------------------------------------------
    def run(self, *, keep_lock: bool = False) -> RunResult:
        """The whole run. With a run directory, the main process holds its lock from before the
        config check to the end, and releases it also when the run fails or is interrupted.
        ``keep_lock``: a run that ends normally keeps holding it, for a caller that still writes
        into the directory (plots); the caller releases it with ``run_dir.unlock()``."""
        try:
            result = self._run()
        except BaseException:
            self._release()
            raise
        if not keep_lock:
            self._release()
        return result

    def _release(self) -> None:
        if self.run_dir is not None and self.is_main:
            self.run_dir.unlock()

    def _claim(self) -> bool:
        """Lock the run directory, then check it fits the config (True: replace the run in it)."""
        self.run_dir.lock()
        return self.run_dir.check(self.cfg)

    def _eval_ids(self, tasks: list[str]) -> dict[str, list]:
        return {t: [e.id for e in self.data[t].test] for t in tasks}

    def _verified_stages(self) -> dict[str, dict]:
        """The records of the stages an earlier invocation finished, each verified against the plan,
        its checksums and its files (a damaged one stops the run with one line)."""
        rd, out = self.run_dir, {}
        if self.cfg.zero_shot:
            done = rd.finished(ZERO_SHOT, eval_ids=self._eval_ids(self.tasks))
            if done is not None:
                out[ZERO_SHOT] = done
        for stage in self.stages:
            done = rd.finished(stage.dirname, planned={"index": stage.index, "name": stage.name, "row": stage.row},
                               eval_ids=self._eval_ids(stage.eval_tasks))
            if done is not None:
                out[stage.dirname] = done
        return out

    def _run(self) -> RunResult:
        cfg, rd, acc = self.cfg, self.run_dir, self.accelerator
        self._finished: dict[str, dict] = {}
        previous, replace = None, False
        if rd is not None:
            replace = main_decides(acc, self._claim)
            if not replace:  # what an earlier invocation left: checked before anything is built
                self._finished = main_decides(acc, self._verified_stages)
                previous = main_decides(acc, rd.previous_results)
        self.built = build_engine(cfg, acc, self.model, shard=self.sharded,
                                  rank_multiplier=self.method.adapter_rank_multiplier(len(self.tasks)))
        self.engine = self.built.engine
        if rd is not None and self.is_main:
            rd.init(cfg, replace)
        acc.wait_for_everyone()
        self._earlier_peak_rss = previous.get("peak_rss_mb") if previous else None
        zero_shot = self._zero_shot()
        records: list[dict] = []
        current: int | None = None
        for stage in self.stages:
            done = self._finished.get(stage.dirname)
            if done is not None:
                log.info("stage %d/%d: %s already finished, skipped", stage.index + 1, len(self.stages), stage.name)
                records.append(done)
                continue
            records.append(self._train_stage(stage, current))
            current = stage.index
            self._results(records, zero_shot, complete=False)
        results = self._results(records, zero_shot, complete=True)
        if os.environ.get(RANK_DUMP_ENV):
            self._dump_rank_state()
        self.accelerator.wait_for_everyone()  # every process returns once the files are written
        if current is None and self.stages and rd is not None:  # nothing trained now: the last adapter
            self._load_stage_adapter(self.stages[-1].dirname)
        trace = read_jsonl(rd.trace_file) if rd is not None and rd.trace_file.is_file() else list(self.records)
        return RunResult(tasks=list(self.tasks), accuracy_matrix=results["accuracy_matrix"], metrics=results["metrics"],
                         trace=trace, timings=results["timing"], model=self.engine.peft_model, results=results,
                         run_dir=rd.path if rd is not None else None)

    def _results(self, records: list[dict], zero_shot, complete: bool) -> dict:
        cfg = self.cfg
        rows = {r["row"]: r["scores"] for r in records}
        stages = [{k: v for k, v in r.items() if k != "scores"} for r in records]
        results = build_results(cfg_dict=cfg.to_dict(), tasks=self.tasks, rows=rows,
                                task_metrics={t: d.metric for t, d in self.data.items()},
                                reference=self.reference, zero_shot=zero_shot, stages=stages,
                                complete=complete, single=self.method.fresh_adapter_per_task)
        # the peak over the processes that worked on the run: each stage records its process's peak
        # at its end; a resumed run's earlier results.json covers stages written without one
        peaks = [p for p in [s.get("peak_rss_mb") for s in stages] + [self._earlier_peak_rss] if p]
        results["peak_rss_mb"] = max(peaks) if peaks else peak_rss_mb()
        cuda = [s["stage_peak_cuda_mb"] for s in stages if s.get("stage_peak_cuda_mb")]
        if cuda:  # the stages trained now or earlier on CUDA (torch's allocations, this process)
            results["peak_cuda_mb"] = max(cuda)
        results["num_processes"] = self.accelerator.num_processes
        results["fsdp"] = self.sharded
        if self.run_dir is not None and self.is_main:
            self.run_dir.write_results(results, [stage_dirname(r["index"], r["name"]) for r in records], complete)
        return results

    def _dump_rank_state(self) -> None:
        """The AIMMERGING_RANK_DUMP hook (see ``runs.process``)."""
        from safetensors.torch import save_file

        out = Path(os.environ[RANK_DUMP_ENV])
        rank = self.accelerator.process_index
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.engine.peft_model.named_parameters() if "lora_" in n}
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"rank{rank}.safetensors"))
        from torch.distributed.tensor import DTensor

        params = list(self.engine.peft_model.parameters())
        sharded = [p for p in params if isinstance(p, DTensor)]
        held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params)
        atomic_write_json(out / f"rank{rank}.json", {"rank": rank, "num_processes": self.accelerator.num_processes,
                                                      "sharded_params": len(sharded), "param_bytes": held,
                                                      "full_param_bytes": sum(p.nbytes for p in params),
                                                      "records": self.records})


def run_config(cfg: RunConfig, *, run_dir: RunDirectory | None = None, keep_lock: bool = False, **kwargs) -> RunResult:
    """Run ``cfg`` with its run directory (``--output-dir``, default ``runs/<method>``), as the CLI does.
    ``keep_lock``: see :meth:`Runner.run` (pass ``run_dir`` to release it afterwards)."""
    rd = run_dir if run_dir is not None else RunDirectory(cfg.run_dir)
    return Runner(cfg, run_dir=rd, **kwargs).run(keep_lock=keep_lock)
