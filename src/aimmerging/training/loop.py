"""Training one stage (one task, or all tasks at once for ``mtl``) with method hooks.

The loop, top to bottom, for each inner step g = 1 .. max_steps:

1. take ``accum`` micro-batches from the task's shuffled training stream (epochs run into each
   other, as HF Trainer's gradient accumulation does); the method may add examples to each
   (``replay`` mixes memory examples in);
2. one optimizer update (clip, AdamW, linear warm-up/decay schedule);
3. ``method.after_step``: AIMMerging probes the memory here, feeds its controller and merges;
4. optionally the validation loss, to keep the best adapter (``--select-best-every``);
5. one trace record.

``method.before_task`` / ``method.after_task`` run around the loop.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..config import RunConfig
from ..data.olora import Example
from ..models.lora import restore, snapshot
from .engine import Engine, Timers


def steps_per_task(n_examples: int, cfg: RunConfig, n_tasks: int = 1) -> int:
    """Reference rule: epochs x floor(ceil(N / micro) / accum), at least 1; or --max-steps per
    task, so a stage on ``n_tasks`` tasks together (``mtl``) gets as many steps as the stream."""
    if cfg.max_steps is not None:
        return cfg.max_steps * n_tasks
    micro_batches = math.ceil(n_examples / cfg.micro_batch_size)
    return max(1, cfg.epochs * (micro_batches // cfg.grad_accum))


def micro_batch_stream(examples: Sequence[Example], size: int, rng: random.Random,
                       length=None) -> Iterator[list[Example]]:
    """Endless micro-batches: a fresh shuffle every epoch; with ``length``, examples of similar
    length are grouped (sorted inside mega-batches of 50 micro-batches, longest first)."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        if length is not None:
            mega = size * 50
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k:k + mega], key=lambda j: -length(examples[j]))]
        for k in range(0, len(order), size):
            yield [examples[i] for i in order[k:k + size]]


@dataclass
class Stage:
    """One training stage: ``index`` in the run, its name, and the tasks it trains on."""

    index: int
    name: str
    train_tasks: list[str]
    row: int  # row of the accuracy matrix this stage fills
    eval_tasks: list[str] = field(default_factory=list)

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


class TaskSession:
    """What a method can see and use while one stage trains."""

    def __init__(self, engine: Engine, cfg: RunConfig, stage: Stage, train: list[Example], memory: list[Example],
                 max_steps: int, optimizer, scheduler, timers: Timers, trace_file, sink: list | None = None):
        self.engine, self.cfg, self.stage = engine, cfg, stage
        self.train, self.memory = train, memory
        self.max_steps, self.optimizer, self.scheduler = max_steps, optimizer, scheduler
        self.timers = timers
        self.params = engine.params
        self.step = 0
        self.merges = 0
        self._trace_file = trace_file
        self._sink = sink  # every emitted record is also appended here, on every process (debugging)
        seed = f"{cfg.seed}-{stage.index}"
        # independent random streams, identical on every process
        self.probe_rng = random.Random(f"probe-{seed}")
        self.replay_rng = random.Random(f"replay-{seed}")
        self.mix_rng = random.Random(f"mix-{seed}")
        self._outer_optimizer = None

    # -- memory ------------------------------------------------------------------------------------
    def memory_batch(self, rng: random.Random, size: int | None = None) -> list[Example]:
        """A fresh random batch drawn without replacement (the whole memory when it is small)."""
        size = size or self.cfg.memory_batch_size
        return rng.sample(self.memory, min(size, len(self.memory)))

    def probe(self) -> float:
        """History loss on a random memory batch, no gradients. Reference mode: train mode (dropout
        on) and the loss divided by the accumulation steps; eval mode: the plain loss."""
        batch = self.memory_batch(self.probe_rng)
        if self.cfg.probe_mode == "train":
            return self.engine.mean_loss(batch, train_mode=True) / self.cfg.grad_accum
        return self.engine.mean_loss(batch, train_mode=False)

    def outer_optimizer(self):
        """The optimizer of the replay steps: the task's own (reference) or a separate AdamW."""
        if self.cfg.outer_optimizer == "inner":
            return self.optimizer
        if self._outer_optimizer is None:
            opt = torch.optim.AdamW(self.params, lr=self.cfg.outer_lr)
            sched = get_linear_schedule_with_warmup(opt, 50, 200)
            self._outer_optimizer = (opt, sched)
        return self._outer_optimizer

    def replay(self, steps: int) -> list[float | None]:
        """``steps`` replay updates on fresh random memory batches (loss / accumulation, as the
        reference does). Returns their losses (None for a skipped, non-finite one)."""
        opt = self.outer_optimizer()
        sched = None
        if isinstance(opt, tuple):
            opt, sched = opt
        losses = []
        for _ in range(steps):
            losses.append(self.engine.replay_step(self.memory_batch(self.replay_rng), opt, 1.0 / self.cfg.grad_accum))
            if sched is not None:
                sched.step()
        return losses

    def emit(self, record: dict) -> None:
        record = {"task": self.stage.name, "task_index": self.stage.index, **record}
        if self._sink is not None:
            self._sink.append(record)
        if self._trace_file is not None:
            self._trace_file.write(json.dumps(record) + "\n")
            self._trace_file.flush()


def validation_loss(engine: Engine, val: list[Example]) -> float:
    return engine.mean_loss(val, train_mode=False)


def train_stage(engine: Engine, cfg: RunConfig, stage: Stage, train: list[Example], memory: list[Example],
                method, timers: Timers, trace_path: Path | None, val: list[Example] | None = None,
                progress: bool = True, sink: list | None = None) -> dict:
    """Train one stage in place on ``engine.params``; returns a small report. ``sink``: a list
    that receives every trace record, on every process (the trace file is the main process's)."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed + 1000 * stage.index)
    max_steps = steps_per_task(len(train), cfg, len(stage.train_tasks))
    optimizer = torch.optim.AdamW(engine.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, max_steps)
    rng = random.Random(f"data-{cfg.seed}-{stage.index}")
    length = engine.formatter.length if cfg.group_by_length else None
    stream = micro_batch_stream(train, cfg.micro_batch_size, rng, length)
    is_main = engine.accelerator.is_main_process
    trace_file = open(trace_path, "a", encoding="utf-8") if (trace_path is not None and is_main) else None
    session = TaskSession(engine, cfg, stage, train, memory, max_steps, optimizer, scheduler, timers, trace_file, sink)
    engine.model.train()
    best = {"loss": math.inf, "step": None, "params": None}
    tokens = skipped = 0
    try:
        method.before_task(session)
        bar = tqdm(range(1, max_steps + 1), desc=f"[{stage.index + 1}] {stage.name}", unit="step",
                   disable=not progress or not is_main, dynamic_ncols=True)
        for step in bar:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            micro = [mb + method.extra_examples(session, mb) for mb in micro]
            with timers.section("inner"):
                stats = engine.inner_step(micro, optimizer, scheduler)
            tokens += stats["tokens"]
            skipped += stats["skipped"]
            session.step = step
            record = {"event": "step", "step": step, "train_loss": stats["train_loss"], "lr": stats["lr"],
                      "history_loss": None, "delta_in_l1": None}
            if stats["skipped"]:
                record["skipped"] = "non-finite loss or gradient"
            extra = method.after_step(session, record) or []
            if val and cfg.select_best_every and step % cfg.select_best_every == 0:
                with timers.section("validation"):
                    loss = validation_loss(engine, val)
                record["val_loss"] = loss
                if loss < best["loss"]:
                    best = {"loss": loss, "step": step, "params": snapshot(engine.params)}
            session.emit(record)
            for r in extra:
                session.emit(r)
            if stats["train_loss"] is not None:
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", merges=session.merges, refresh=False)
        for r in method.after_task(session) or []:
            session.emit(r)
        if best["params"] is not None:
            restore(engine.params, best["params"])
            session.emit({"event": "select_best", "step": best["step"], "val_loss": best["loss"]})
    finally:
        if trace_file is not None:
            trace_file.close()
    return {"steps": max_steps, "merges": session.merges, "tokens": tokens, "skipped_steps": skipped,
            "best_step": best["step"]}
