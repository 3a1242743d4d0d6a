"""Training one stage (one task, or all tasks at once for ``mtl``) with method hooks.

The loop, top to bottom, for each inner step g = 1 .. max_steps:

1. take ``accum`` micro-batches from the task's shuffled training stream (epochs run into each
   other, as HF Trainer's gradient accumulation does); the method may add examples to each
   (``replay`` mixes memory examples in);
2. one optimizer update (clip, AdamW, linear warm-up/decay schedule), with the method's extra
   loss term on every micro-batch;
3. ``method.after_step``: AIMMerging probes the memory here, feeds its controller and merges;
4. optionally the validation loss, to keep the best adapter (``--select-best-every``);
5. one trace record.

A step whose loss, gradient or update is not finite, or whose update overflows (a finite but huge
learning rate), is skipped by the engine (the adapter and the optimizer's state stay as they were); its record says why (``skipped``) and the stage's report
counts it (``skipped_steps``; ``skipped_replay_steps`` for the merges' replay steps). Trace
records are strict JSON: a non-finite float is written as null.

``method.before_task`` / ``method.after_task`` / ``method.task_end_adapter`` run around the loop.
An adapter that is not finite at the end of the stage (a method hook wrote a NaN or inf into it)
stops the run with one line (:class:`NonFiniteAdapter`) before anything of the stage is saved.
Methods see the stage through a :class:`StageView` (the ``TrainingView`` of ``methods.base``).
"""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..data.memory import ReplayMemory
from ..data.olora import Example
from ..errors import UserError
from ..io import json_safe
from ..methods.base import ForwardOutput, Method, StageInfo
from ..models.lora import adapter_values, all_finite, restore, snapshot
from .engine import Engine, Timers
from .stages import Stage


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation settings a stage needs (a slice of the run config)."""

    seed: int
    max_steps: Optional[int]
    epochs: int
    batch_size: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    group_by_length: bool
    memory_batch_size: int
    select_best_every: Optional[int]
    val_loss: str = "token-mean"
    val_batch_size: Optional[int] = None

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    @classmethod
    def from_config(cls, cfg) -> "TrainSettings":
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


def steps_per_task(n_examples: int, cfg: TrainSettings, n_tasks: int = 1) -> int:
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


class ViewBase:
    """What both hosts' views (this loop's :class:`StageView`, ``aimmerging.hf``'s ``TrainerView``)
    share: the state every method sees, the seeded random streams, the per-step term log, the
    timers and the trace."""

    def __init__(self, *, stage: StageInfo, max_steps: int, seed: int, grad_accum: int, memory_batch_size: int,
                 params, model, memory: ReplayMemory, optimizer, timers: Timers, emit: Callable[[dict], None]):
        self.stage = stage
        self.step = 0
        self.max_steps = max_steps
        self.seed = seed
        self.grad_accum = grad_accum
        self.memory_batch_size = memory_batch_size
        self.params = params
        self.model = model
        self.memory = memory
        self.optimizer = optimizer
        self._timers = timers
        self._emit = emit
        self._rngs: dict[str, random.Random] = {}
        self._terms: dict[str, list[float]] = {}

    def rng(self, name: str) -> random.Random:
        if name not in self._rngs:  # independent streams, identical on every process and in both hosts
            self._rngs[name] = random.Random(f"{name}-{self.seed}-{self.stage.index}")
        return self._rngs[name]

    def log(self, name: str, value: float) -> None:
        self._terms.setdefault(name, []).append(float(value))

    def step_terms(self) -> dict[str, float]:
        """The mean of each term logged since the last call (the host puts them in the step's record)."""
        terms = {name: sum(values) / len(values) for name, values in self._terms.items()}
        self._terms = {}
        return terms

    def timed(self, category: str):
        return self._timers.section(category)

    def emit(self, record: dict) -> None:
        self._emit(record)


class StageView(ViewBase):
    """What a method may read and do while one stage trains (see ``methods.base.TrainingView``)."""

    def __init__(self, engine: Engine, cfg: TrainSettings, stage: Stage, memory: ReplayMemory, max_steps: int,
                 optimizer, timers: Timers, emit: Callable[[dict], None]):
        super().__init__(stage=StageInfo(stage.index, stage.name, tuple(stage.train_tasks)), max_steps=max_steps,
                         seed=cfg.seed, grad_accum=cfg.grad_accum, memory_batch_size=cfg.memory_batch_size,
                         params=engine.params, model=engine.peft_model, memory=memory, optimizer=optimizer,
                         timers=timers, emit=emit)
        self._engine = engine
        self._micro = cfg.micro_batch_size

    def mean_loss(self, examples: Sequence[Example], train_mode: bool) -> float:
        # a batch larger than a micro-batch (the probe's memory batch) is passed in micro-batches of
        # similar lengths: less padding, the same loss (measured against one pass and random
        # micro-batches in BENCHMARKS.md)
        if len(examples) > self._micro:
            examples = sorted(examples, key=self._engine.formatter.length)
        return self._engine.mean_loss(examples, train_mode=train_mode)

    def forward(self, examples: Sequence[Example], *, rows: Optional[Sequence[int]] = None,
                adapter: Optional[Sequence[torch.Tensor]] = None, train_mode: bool = False, grad: bool = False,
                hidden_states: bool = False) -> ForwardOutput:
        values = adapter_values(self.params, adapter) if adapter is not None else nullcontext()
        with values:
            return self._engine.forward(examples, rows=rows, train_mode=train_mode, grad=grad,
                                        hidden_states=hidden_states)

    def update(self, examples: Sequence[Example], optimizer, loss_scale: float,
               penalty: Optional[Callable[[], torch.Tensor]] = None) -> Optional[float]:
        if penalty is None:
            return self._engine.replay_step(examples, optimizer, loss_scale)
        return self._engine.replay_step(examples, optimizer, loss_scale, penalty=penalty)


def validation_loss(engine: Engine, val: list[Example], cfg: TrainSettings) -> float:
    """The validation loss (eval mode): over all answer tokens, or HF Trainer's mean of per-batch means."""
    if cfg.val_loss == "batch-mean":
        return engine.batch_mean_loss(val, cfg.val_batch_size or cfg.micro_batch_size)
    return engine.mean_loss(val, train_mode=False, chunk=cfg.val_batch_size)


def train_stage(engine: Engine, cfg: TrainSettings, stage: Stage, train: list[Example], memory: ReplayMemory,
                method: Method, timers: Timers, trace: IO[str] | None, val: list[Example] | None = None,
                progress: bool = True, sink: list | None = None) -> dict:
    """Train one stage in place on ``engine.params``; returns a small report. Every trace record
    goes to ``trace`` (an open text file, or None) and to ``sink`` (a list, or None)."""
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
    merges = replay_skipped = 0

    def emit(record: dict) -> None:
        nonlocal merges, replay_skipped
        record = json_safe({"task": stage.name, "task_index": stage.index, **record})  # NaN/inf -> null
        if record.get("event") == "merge":
            merges += 1
            replay_skipped += record.get("replay_skipped") or 0
        if sink is not None:
            sink.append(record)
        if trace is not None:
            trace.write(json.dumps(record, allow_nan=False) + "\n")
            trace.flush()

    view = StageView(engine, cfg, stage, memory, max_steps, optimizer, timers, emit)
    extra_loss = _extra_loss_hook(method, view)
    engine.model.train()
    best = {"loss": math.inf, "step": None, "params": None}
    tokens = skipped = 0
    method.before_task(view)
    bar = tqdm(range(1, max_steps + 1), desc=f"[{stage.index + 1}] {stage.name}", unit="step",
               disable=not progress or not is_main, dynamic_ncols=True)
    for step in bar:
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        micro = [mb + method.extra_examples(view, mb) for mb in micro]
        with timers.section("inner"):
            stats = engine.inner_step(micro, optimizer, scheduler, extra_loss=extra_loss,
                                      hidden_states=bool(method.training_hidden_states))
        tokens += stats["tokens"]
        view.step = step
        record = {"event": "step", "step": step, "train_loss": stats["train_loss"], "lr": stats["lr"],
                  "history_loss": None, "delta_in_l1": None}
        if stats["skipped"]:
            skipped += 1
            record["skipped"] = stats["skipped"]  # non-finite loss, gradient, update; overflow (engine.SKIP_*)
        record.update(view.step_terms())  # the method's per-step terms (view.log)
        extra = method.after_step(view, record) or []
        if val and cfg.select_best_every and step % cfg.select_best_every == 0:
            with timers.section("validation"):
                loss = validation_loss(engine, val, cfg)
            record["val_loss"] = loss
            if loss < best["loss"]:
                best = {"loss": loss, "step": step, "params": snapshot(engine.params)}
        emit(record)
        for r in extra:
            emit(r)
        if stats["train_loss"] is not None:
            bar.set_postfix(loss=f"{stats['train_loss']:.3f}", merges=merges, refresh=False)
    # the selection comes before the task-end hooks, so that a task-end merge (merge-end) acts on
    # the selected adapter rather than being thrown away by the restore
    if best["params"] is not None:
        restore(engine.params, best["params"])
        emit({"event": "select_best", "step": best["step"], "val_loss": best["loss"]})
    finish_stage(method, view, emit, max_steps)
    refuse_non_finite_adapter(engine.peft_model, engine.params, stage.dirname, method)
    return {"steps": max_steps, "merges": merges, "tokens": tokens, "skipped_steps": skipped,
            "skipped_replay_steps": replay_skipped, "best_step": best["step"]}


def finish_stage(method: Method, view, emit: Callable[[dict], None], step: int) -> None:
    """The end of a stage, in both hosts (this loop and ``aimmerging.hf``): ``after_task``'s records,
    then ``task_end_adapter``'s values written into the adapter, only when they are all finite
    (else the trained adapter is kept and a record says so)."""
    for r in method.after_task(view) or []:
        emit(r)
    replacement = method.task_end_adapter(view)
    if replacement is not None:
        if all_finite(replacement):
            restore(view.params, replacement)
        else:  # a non-finite value never reaches the adapter: keep the trained one
            emit({"event": "task_end_adapter", "step": step,
                  "fallback": "trained adapter (non-finite task_end_adapter values dropped)"})


class NonFiniteAdapter(UserError):
    """A method's hook left a non-finite value in the adapter: the stage is not saved (the run stops
    before its evaluation and commit, so the same command resumes at it once the cause is fixed)."""


def refuse_non_finite_adapter(model, params, stage: str, method: Method) -> None:
    """The optimizer steps and the task-end replacement never write a non-finite value, so one found
    at the end of a stage came from a method hook writing into the adapter (``after_step``,
    ``after_task``, ...): stop with one line naming the stage, the method and the tensor."""
    if all_finite(params):
        return
    name = next((n for n, p in model.named_parameters()
                 if "lora_" in n and not bool(torch.isfinite(p.detach()).all())), "a LoRA tensor")
    raise NonFiniteAdapter(f"stage {stage}: method '{method.name}' left a non-finite value (NaN or inf) in "
                           f"the adapter ({name}) through one of its hooks; the stage was not saved: fix the cause "
                           "and rerun the same command to resume at this stage")


def _extra_loss_hook(method: Method, view: StageView):
    """The method's loss hook bound to this stage, or None when the method has none (so plain
    methods run exactly the computation they ran before hooks existed)."""
    if type(method).extra_loss is Method.extra_loss:
        return None
    return lambda inputs: method.extra_loss(view, inputs)
