"""AIMMerging as a ``transformers.TrainerCallback``: the method inside any ``Trainer`` / ``SFTTrainer``
that trains a PEFT LoRA model.

One callback per task: create it with the replay memory of the earlier tasks and pass it to the
task's trainer (``Trainer(..., callbacks=[cb])``, then optionally ``cb.attach(trainer)``), or use
``AIMMergingCallback.for_trainer(trainer, memory, ...)``, which does both. After every optimizer
step (``on_step_end``) it does what ``--method aimmerging`` does in aimmerging's own loop
(``aimmerging.methods.aimmerging``; ALGORITHM.md §3):

1. **probe**: the loss on a random memory batch, collated with the trainer's own data collator,
   without gradients; ``probe_mode="train"`` (the reference) runs it in train mode (dropout on)
   and divides it by ``gradient_accumulation_steps``, ``"eval"`` is the plain eval-mode loss;
2. the L1 norm of the adapter's change since the anchor (the last merge, or the task start);
3. both go to :class:`~aimmerging.controller.MergeController`; on a merge it runs the replay steps
   (fresh random memory batches, loss / accumulation steps, the **trainer's optimizer** at its
   current learning rate, the LR scheduler not stepped, gradients clipped to the trainer's
   ``max_grad_norm``), fuses with :func:`aimmerging.fusion.fuse_in_place` and moves the anchor.

With an empty memory (the first task) it neither probes nor merges nor writes trace records.

**The memory** is a list (or a ``datasets.Dataset``) of rows *in the form of the trainer's own
training rows*: whatever its data collator takes, e.g. ``{"input_ids", "attention_mask",
"labels"}`` with ``labels`` -100 outside the answer (:func:`aimmerging.hf.tokenize_examples` makes
them from ``{"input", "output"}`` examples), or the rows of an earlier ``SFTTrainer``'s
``trainer.train_dataset`` (tokenised by TRL: ``input_ids``, ``labels``). The batch must carry
``labels`` (-100 = no loss). Columns the trainer's dataloader does not use are dropped first, as
the trainer does. Losses are summed over the answer tokens of the whole memory batch and divided by
their number (as aimmerging's engine; causal models shift the labels by one, seq2seq models do not).

**Trace.** It appends to ``<output_dir or args.output_dir>/trace.jsonl`` the records of
aimmerging's runner (``aimmerging.trace``): a ``task_start`` record with the controller settings,
one ``step`` record per optimizer step (``step`` counted from this ``train()`` call, ``train_loss``
(only when attached to its trainer; else null), ``lr``, ``history_loss``, ``delta_in_l1``,
``interval``, ``threshold``) and one ``merge`` record per merge, all with ``task`` and
``task_index``; so ``aimmerging controller replay TRACE`` reproduces its merges. ``aimmerging plot
DIR`` also needs a ``results.json``: with ``write_results=True`` (default) the callback keeps a
minimal one there (the tasks seen in the directory, an accuracy matrix of nulls,
``"complete": false``), unless a results.json it did not write is already there.

**Several processes** (``accelerate launch``, DDP): every rank draws the same memory batches (the
random streams are seeded from ``seed`` and ``task_index`` only), works on its contiguous share of
each batch, and the losses, token counts and replay gradients are summed over the ranks with
``torch.distributed``; so the probe, the controller's decisions, the replay updates and the fused
adapter are identical on every rank. Mixed precision: the replay steps use the unscaled loss and
the optimizer under the accelerate wrapper, so fp16 with a gradient scaler is not supported for
them (fp32 and bf16 are).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..controller import ControllerConfig, MergeController, MergeDecision
from ..data.formatting import IGNORE_INDEX
from ..errors import ConfigError, UserError
from ..fusion import FUSION_RULES, given_params, rule_name, rule_params, rule_state
from ..io import atomic_write_json, json_safe
from ..models.lora import l1_distance, lora_parameters, snapshot
from ..methods.aimmerging import controller_step, fuse_or_fall_back, merge_record
from ..runs.layout import RunLayout
from ..trace import read_trace, split_tasks
from ..training.engine import guarded_step

SOURCE = "aimmerging.hf"  # the "source" of a results.json written here (never overwrite another's)
PROBE_MODES = ("train", "eval")


def controller_config(config: Any = None, settings: Optional[Mapping[str, Any]] = None) -> ControllerConfig:
    """A :class:`ControllerConfig` from ``config`` (a ControllerConfig, a subclass such as the
    ``aimmerging`` method's settings, a mapping, or None for the defaults) with ``settings`` on top;
    unknown names and bad values are a one-line :class:`ConfigError`."""
    names = [f.name for f in fields(ControllerConfig)]
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"unknown controller option(s) {', '.join(unknown)} (options: {', '.join(names)})")
    if config is None:
        base: dict = {}
    elif isinstance(config, ControllerConfig):
        base = asdict(config)
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"config: expected a ControllerConfig or a mapping, got {type(config).__name__}")
    base.update(settings)
    try:
        return ControllerConfig.from_dict(base)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"controller settings: {e}") from None


def _dist():
    """``torch.distributed`` when several processes are joined, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _share(items: Sequence[Any], rank: int, world: int) -> list:
    """The contiguous share of ``rank`` (as ``accelerate.split_between_processes``)."""
    per, extra = divmod(len(items), world)
    start = rank * per + min(rank, extra)
    return list(items[start:start + per + (1 if rank < extra else 0)])


class AIMMergingCallback(TrainerCallback):
    """AIMMerging after every optimizer step of a ``Trainer`` on a PEFT LoRA model (module docs).

    Args:
        memory: replay rows of the earlier tasks in the form the trainer's data collator takes
            (a list of dicts or a ``datasets.Dataset``); empty for the first task.
        task, task_index: the task's name and position in the stream (trace records, RNG seeds).
        config: a :class:`~aimmerging.controller.ControllerConfig` (or mapping); keyword
            ``controller settings`` (``initial_interval=2``, ``schedule="paper"``, ...) override it.
        probe_mode: ``"train"`` (reference: dropout on, loss / accumulation steps) or ``"eval"``.
        fusion: a name in ``aimmerging.fusion.FUSION_RULES`` or a rule function; a rule with state
            (``importance-mask``) is refused here, one line.
        fusion_params: the rule's parameters (``{"rate": 0.3}``), checked against those it declares.
        output_dir: where ``trace.jsonl`` (and ``results.json``) go; default ``args.output_dir``.
        seed: seeds the probe and replay batch draws (with ``task_index``), as the runner's ``--seed``.
        memory_batch_size: memory rows per probe and per replay step (global, over all processes).
        write_results: keep a minimal ``results.json`` beside the trace for ``aimmerging plot``.
    """

    def __init__(self, memory: Any = (), *, task: str = "task", task_index: int = 0, config: Any = None,
                 probe_mode: str = "train", fusion: str | Callable = "weighted-sum",
                 fusion_params: Optional[Mapping[str, Any]] = None, output_dir: Optional[str] = None, seed: int = 42,
                 memory_batch_size: int = 32, write_results: bool = True, **controller_settings: Any):
        self.config = controller_config(config, controller_settings)
        if probe_mode not in PROBE_MODES:
            raise ConfigError(f"probe_mode: '{probe_mode}' is not one of {', '.join(PROBE_MODES)}")
        if isinstance(fusion, str) and fusion not in FUSION_RULES:
            raise ConfigError(f"fusion: '{fusion}' is not one of {', '.join(FUSION_RULES)}")
        if rule_state(fusion) is not None:
            raise ConfigError(f"fusion: '{rule_name(fusion)}' needs state gathered after every optimizer step, which "
                              "AIMMergingCallback does not gather; use aimmerging run --method aimmerging")
        self.fusion_params = given_params(fusion, fusion_params)
        if not isinstance(memory_batch_size, int) or memory_batch_size < 1:
            raise ConfigError(f"memory_batch_size: must be a positive integer, got {memory_batch_size!r}")
        if not isinstance(task_index, int) or task_index < 0:
            raise ConfigError(f"task_index: must be an integer >= 0, got {task_index!r}")
        self.memory = memory if memory is not None else []
        self.task = str(task)
        self.task_index = task_index
        self.probe_mode = probe_mode
        self.fusion = fusion
        self.output_dir = output_dir
        self.seed = seed
        self.memory_batch_size = memory_batch_size
        self.write_results = write_results
        self.trainer = None
        self.records: list[dict] = []  # every record this callback emitted (on every process)
        self.active = False
        self._trace = None
        self._dir: Optional[Path] = None
        self._main = False

    # -- wiring --------------------------------------------------------------------------------------------
    @classmethod
    def for_trainer(cls, trainer, memory: Any = (), **kwargs: Any) -> "AIMMergingCallback":
        """A callback attached to ``trainer`` and added to its callbacks."""
        cb = cls(memory, **kwargs).attach(trainer)
        trainer.add_callback(cb)
        return cb

    def attach(self, trainer) -> "AIMMergingCallback":
        """Remember the trainer: only needed for the per-step training loss of the trace (the
        trainer's running loss is not handed to callbacks). Returns the callback."""
        self.trainer = trainer
        return self

    # -- helpers -------------------------------------------------------------------------------------------
    def _emit(self, record: dict) -> None:
        record = json_safe({"task": self.task, "task_index": self.task_index, **record})
        self.records.append(record)
        if self._trace is not None:
            self._trace.write(json.dumps(record, allow_nan=False) + "\n")
            self._trace.flush()

    def _reduce(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the processes (float64, the same result on every rank)."""
        dist = _dist()
        if dist is None:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device)
        dist.all_reduce(t)
        return t.tolist()

    def _draw(self, rng: random.Random) -> list[dict]:
        """A random memory batch drawn as ``ReplayMemory.sample`` draws it (same indices)."""
        n = len(self.memory)
        rows = []
        for i in rng.sample(range(n), min(self.memory_batch_size, n)):
            row = self.memory[i]
            if not isinstance(row, Mapping):
                raise UserError(f"memory row {i}: expected a mapping of the trainer's columns, got {type(row).__name__}")
            rows.append(dict(row))
        return rows

    def _local_batches(self, rows: list[dict]) -> tuple[list[dict], int]:
        """This process's share of ``rows``, collated with the trainer's collator in chunks of the
        per-device batch size, and the number of loss tokens in it."""
        dist = _dist()
        mine = _share(rows, dist.get_rank(), dist.get_world_size()) if dist else rows
        if self._columns is not None:
            mine = [{k: v for k, v in r.items() if k in self._columns} for r in mine]
        batches, tokens = [], 0
        for k in range(0, len(mine), self._chunk):
            batch = self._collate(mine[k:k + self._chunk])
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
            if labels is None:
                raise UserError("AIMMergingCallback: the trainer's data collator made a memory batch without "
                                "'labels'; memory rows must be training rows with labels (-100 = no loss)")
            kept = labels if self._seq2seq else labels[:, 1:]
            tokens += int((kept != IGNORE_INDEX).sum())
            batches.append(batch)
        return batches, tokens

    def _loss_sum(self, model, batch: Mapping[str, Any]) -> torch.Tensor:
        """Summed token cross-entropy of the batch's labelled tokens (float32)."""
        batch = {k: (v.to(self._device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        labels = batch["labels"]
        if self._seq2seq:
            logits = model(**batch).logits
        else:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
            labels = labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def _probe(self, model) -> float:
        rows = self._draw(self._probe_rng)
        batches, tokens = self._local_batches(rows)
        was_training = model.training
        model.train(self.probe_mode == "train")
        local = 0.0
        try:
            with torch.no_grad():
                for batch in batches:
                    local += float(self._loss_sum(model, batch))
        finally:
            model.train(was_training)
        total, n = self._reduce([local, tokens])
        h = total / max(1.0, n)
        return h / self._accum if self.probe_mode == "train" else h

    def _zero_grad(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        for p in self._trainable:
            p.grad = None

    def _replay_step(self, model) -> Optional[float]:
        """One replay update on a fresh memory batch (loss / accumulation steps, as the reference);
        None when it was skipped (a non-finite loss, gradient or resulting adapter, or an overflowing
        update, decided alike on every rank: nothing changes; ``training.engine.guarded_step``)."""
        rows = self._draw(self._replay_rng)
        batches, tokens = self._local_batches(rows)
        n = max(1.0, self._reduce([tokens])[0])
        scale = 1.0 / self._accum
        local = 0.0
        for batch in batches:
            loss_sum = self._loss_sum(model, batch)
            (loss_sum * (scale / n)).backward()
            local += float(loss_sum.detach())
        dist = _dist()
        if dist is not None:  # sum the gradients of every rank's share: the same update everywhere
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._trainable]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for p in self._trainable:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        loss = self._reduce([local])[0] / n
        if not math.isfinite(loss):
            self._zero_grad()
            return None
        max_norm = self._max_grad_norm if self._max_grad_norm and self._max_grad_norm > 0 else math.inf
        skipped = guarded_step(self._params, self._optimizer,
                               lambda: torch.nn.utils.clip_grad_norm_(self._trainable, max_norm),
                               lambda bad: self._reduce([float(bad)])[0] > 0)  # the same decision on every rank
        self._zero_grad()
        return loss if skipped is None else None

    def _merge(self, model, d: MergeDecision) -> dict:
        theta_k = snapshot(self._params)
        was_training = model.training
        model.train()
        try:
            losses = [self._replay_step(model) for _ in range(d.outer_steps)]
        finally:
            model.train(was_training)
        salt = None  # a random rule (DARE) draws fresh masks at every merge
        if any(p.seed for p in rule_params(self.fusion)):
            salt = f"{self.seed}-{self.task_index}-{sum(r.get('event') == 'merge' for r in self.records)}"
        fallback = fuse_or_fall_back(self._params, self._anchor, theta_k, d, self.fusion, self.fusion_params, salt=salt)
        self._anchor = snapshot(self._params)
        return merge_record(d, losses, fallback)

    def _running_loss(self) -> Optional[float]:
        t = getattr(self.trainer, "_tr_loss", None) if self.trainer is not None else None
        return float(t) if t is not None else None

    # -- TrainerCallback events ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._dir = Path(self.output_dir or args.output_dir)
        self._main = bool(state.is_world_process_zero)
        self._start = state.global_step
        self._last_step = 0
        self._model_name = type(getattr(model, "get_base_model", lambda: model)()).__name__ if model is not None else "?"
        self.active = len(self.memory) > 0
        if not self.active:
            return
        if model is None or optimizer is None:
            raise UserError("AIMMergingCallback: the trainer handed no model or optimizer to the callback")
        try:
            self._params = lora_parameters(model)
        except RuntimeError:
            raise UserError("AIMMergingCallback: the model has no trainable LoRA parameters "
                            "(train a PEFT LoRA model, e.g. peft.get_peft_model(model, LoraConfig(...)))") from None
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._device = self._params[0].device
        self._optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under accelerate's wrapper
        self._collate = getattr(train_dataloader, "collate_fn", None)
        if self._collate is None and self.trainer is not None:
            self._collate = self.trainer.data_collator
        if self._collate is None:
            from transformers import default_data_collator

            self._collate = default_data_collator
        dataset = getattr(train_dataloader, "dataset", None)
        columns = getattr(dataset, "column_names", None)  # a datasets.Dataset after the trainer dropped unused columns
        self._columns = set(columns) if isinstance(columns, (list, tuple)) else None
        self._chunk = max(1, int(args.per_device_train_batch_size))
        self._accum = max(1, int(args.gradient_accumulation_steps))
        self._max_grad_norm = args.max_grad_norm
        self._seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.controller = MergeController(self.config)
        self._anchor = snapshot(self._params)
        self._probe_rng = random.Random(f"probe-{self.seed}-{self.task_index}")
        self._replay_rng = random.Random(f"replay-{self.seed}-{self.task_index}")
        if self._main:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._trace = open(RunLayout(self._dir).trace, "a", encoding="utf-8")
        self._emit({"event": "task_start", "step": 0, "memory_size": len(self.memory),
                    "controller": self.config.to_dict()})

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.active:
            self._lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
            self._loss_before = self._running_loss()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.active:
            return
        step = state.global_step - self._start
        self._last_step = step
        train_loss = None
        after = self._running_loss()
        if after is not None and self._loss_before is not None:
            train_loss = self._reduce([after - self._loss_before])[0] / (_dist().get_world_size() if _dist() else 1)
        record = {"event": "step", "step": step, "train_loss": train_loss, "lr": self._lr,
                  "history_loss": None, "delta_in_l1": None}
        c = self.controller
        if c.needs_history_loss:
            h = self._probe(model)
            if math.isfinite(h):
                record["history_loss"] = h
            else:
                record["probe_skipped"] = "non-finite history loss"
        decision = controller_step(c, self._params, self._anchor, step, record)
        self._emit(record)
        if decision is not None:
            self._emit(self._merge(model, decision))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        try:
            if self.active:
                decision = self.controller.end_of_task(self._last_step, l1_distance(self._params, self._anchor))
                if decision is not None:
                    self._emit(self._merge(model, decision))
        finally:
            if self._trace is not None:
                self._trace.close()
                self._trace = None
        if self.write_results and self._main:
            self._write_results()

    # -- results.json for `aimmerging plot` -----------------------------------------------------------------------
    def _write_results(self) -> None:
        path = RunLayout(self._dir).results
        if path.is_file():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return
            if not isinstance(existing, dict) or existing.get("source") != SOURCE:
                return  # someone else's results (a runner's, train_stream's): never overwritten
        names: dict[int, str] = {}
        if RunLayout(self._dir).trace.is_file():
            try:
                names = {t.index: t.name for t in split_tasks(read_trace(RunLayout(self._dir).trace))}
            except UserError:
                names = {}
        if path.is_file():
            names.update({i: str(t) for i, t in enumerate(existing.get("tasks") or []) if i not in names})
        names[self.task_index] = self.task
        T = max(names) + 1
        tasks = [names.get(i, f"task-{i}") for i in range(T)]
        self._dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"source": SOURCE, "method": "aimmerging (transformers callback)",
                                 "model": self._model_name, "tasks": tasks,
                                 "accuracy_matrix": [[None] * T for _ in range(T)], "metrics": None,
                                 "complete": False})
