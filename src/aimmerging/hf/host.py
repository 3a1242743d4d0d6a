"""The Trainer host: a method's :class:`~aimmerging.methods.base.TrainingView` over a Hugging Face
``Trainer`` (or TRL ``SFTTrainer``), so that any registered method runs inside it.

aimmerging's own loop is one host of a method (``training.loop.StageView`` over the engine); this
is the other. The method's hooks see the same interface; what differs is where things come from:

* **items** are the trainer's own rows, wrapped as :class:`Row` (``data``: the row as the trainer's
  data collator takes it; ``task``, ``id``: which task it belongs to and a content key), so a
  method that keys examples by ``(task, id)`` (EWC) or tells memory rows from current ones
  (I-LoRA) works unchanged. The replay memory is a :class:`~aimmerging.data.memory.ReplayMemory` of
  rows, drawn by the same seeded streams as in the engine;
* **batches** are made by the trainer's data collator, **forward passes** run the trainer's
  model (the PEFT model, not a DDP wrapper), **updates** (``view.update``: replay steps) use the
  optimizer the method hands in (the trainer's own, unwrapped, or the method's) through the
  guarded step both hosts share (``training.engine.guarded_step``);
* **replay mixing** (``extra_examples``) and **loss terms** (``extra_loss``) reach the trainer's
  own step through two wrappers installed on the trainer (:func:`install`): its data collator
  adds the method's rows to every micro-batch and marks the batch, and its ``compute_loss`` adds
  the method's term, scaled as the trainer scales its loss for gradient accumulation.

Losses are summed over the answer tokens and divided by their number (causal models: labels
shifted by one; seq2seq: not), as in the engine. Several processes: every rank draws the same
memory batches, works on its contiguous share (``training.engine.share``), and losses, token counts
and replay gradients are summed over the ranks, so every rank takes the same decisions and updates.
Replay mixing differs from the engine there: the trainer shards its own rows before the collator
sees them, so every rank adds the same memory rows to its share (the engine adds them to the
global micro-batch and then shards it). The wrappers act only in train mode: batches of the
trainer's evaluation pass through unchanged.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX
from ..data.memory import ReplayMemory
from ..errors import UserError
from ..methods.base import ForwardOutput, LossInputs, Method, StageInfo
from ..models.lora import adapter_values, lora_parameters
from ..training.engine import Timers, guarded_step, share
from ..training.loop import ViewBase

BATCH_KEY = "_aimmerging_batch"  # marks a training batch made through the wrapped collator


@dataclass(frozen=True)
class Row:
    """One trainer row as a method's item: the row itself, its task and a key of its content."""

    data: Mapping[str, Any]
    task: str
    id: str


def row_id(data: Mapping[str, Any]) -> str:
    """A key of a row's content (its ``input_ids`` and ``labels``, or the whole row)."""
    keep = {k: data[k] for k in ("input_ids", "labels") if k in data} or dict(data)
    text = repr({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in sorted(keep.items())})
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def as_rows(items: Any, task: str) -> list[Row]:
    """Rows (mappings, a ``datasets.Dataset``, or :class:`Row`) as :class:`Row` of ``task``."""
    out = []
    for i, item in enumerate(items if items is not None else []):
        if isinstance(item, Row):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Row(dict(item), task, row_id(item)))
        else:
            raise UserError(f"memory row {i}: expected a mapping of the trainer's columns, got {type(item).__name__}")
    return out


def _dist():
    """``torch.distributed`` when several processes are joined, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def reduce_sum(values: Sequence[float], device) -> list[float]:
    """Element-wise sum over the processes (float64, the same result on every rank)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def answer_positions(logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict labelled tokens and those labels (causal: shifted by one)."""
    return (logits, labels) if seq2seq else (logits[:, :-1], labels[:, 1:])


class TrainerView(ViewBase):
    """A :class:`~aimmerging.methods.base.TrainingView` over a trainer (module docs)."""

    def __init__(self, *, stage: StageInfo, model, optimizer, collate: Callable, columns: Optional[set],
                 chunk: int, grad_accum: int, max_grad_norm: Optional[float], max_steps: int, seed: int,
                 memory: ReplayMemory, memory_batch_size: int, emit: Callable[[dict], None], timers: Timers):
        super().__init__(stage=stage, max_steps=max_steps, seed=seed, grad_accum=grad_accum,
                         memory_batch_size=memory_batch_size, params=lora_parameters(model), model=model,
                         memory=memory, optimizer=optimizer, timers=timers, emit=emit)
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._device = self.params[0].device
        self._collate = collate
        self._columns = columns
        self._chunk = max(1, int(chunk))
        self._max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf

    @classmethod
    def for_trainer(cls, args, state, model, optimizer, train_dataloader, collate: Optional[Callable], **kwargs
                    ) -> "TrainerView":
        """The view of a trainer's ``on_train_begin`` event: its model, its torch optimizer (under
        accelerate's wrapper), its collator (``collate``, else the dataloader's, else transformers'
        default) and the columns its dataloader keeps; ``kwargs``: the stage, seed, memory, ..."""
        if model is None or optimizer is None:
            raise UserError("ContinualCallback: the trainer handed no model or optimizer to the callback")
        collate = collate or getattr(train_dataloader, "collate_fn", None)
        if collate is None:
            from transformers import default_data_collator as collate
        columns = getattr(getattr(train_dataloader, "dataset", None), "column_names", None)
        try:
            return cls(model=model, optimizer=getattr(optimizer, "optimizer", optimizer), collate=collate,
                       columns=set(columns) if isinstance(columns, (list, tuple)) else None,
                       chunk=args.per_device_train_batch_size, grad_accum=max(1, int(args.gradient_accumulation_steps)),
                       max_grad_norm=args.max_grad_norm, max_steps=int(state.max_steps or 0), **kwargs)
        except RuntimeError:
            raise UserError("ContinualCallback: the model has no trainable LoRA parameters "
                            "(train a PEFT LoRA model, e.g. peft.get_peft_model(model, LoraConfig(...)))") from None

    # -- the TrainingView interface -------------------------------------------------------------------------
    def mean_loss(self, examples: Sequence[Row], train_mode: bool) -> float:
        # sorted by length when passed in several batches: less padding, as the engine
        rows = sorted(examples, key=_length) if len(examples) > self._chunk else list(examples)
        batches, tokens = self._local_batches(rows)
        was_training = self.model.training
        self.model.train(train_mode)
        local = 0.0
        try:
            with torch.no_grad():
                for batch in batches:
                    local += float(self._run(batch)[0])
        finally:
            self.model.train(was_training)
        total, n = reduce_sum([local, tokens], self._device)
        return total / max(1.0, n)

    def forward(self, examples: Sequence[Row], *, rows: Optional[Sequence[int]] = None,
                adapter: Optional[Sequence[torch.Tensor]] = None, train_mode: bool = False, grad: bool = False,
                hidden_states: bool = False) -> ForwardOutput:
        """``TrainingView.forward``: ``examples`` collated as one batch (``rows``: only those rows of it),
        through the PEFT model with the LoRA tensors holding ``adapter`` for the pass."""
        batch = self.collate(examples)
        if rows is not None:
            index = torch.as_tensor(list(rows), dtype=torch.long, device=self._device)
            n = len(examples)
            batch = {k: v.index_select(0, index) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                     for k, v in batch.items()}
        was_training = self.model.training
        self.model.train(train_mode)
        try:
            with adapter_values(self.params, adapter) if adapter is not None else nullcontext(), torch.set_grad_enabled(grad):
                loss_sum, logits, labels, hidden = self._run(batch, hidden_states)
        finally:
            self.model.train(was_training)
        tokens = int((labels != IGNORE_INDEX).sum())
        return ForwardOutput(logits=logits, labels=labels, loss=loss_sum / max(tokens, 1), hidden=hidden)

    def update(self, examples: Sequence[Row], optimizer, loss_scale: float,
               penalty: Optional[Callable[[], torch.Tensor]] = None) -> Optional[float]:
        """One guarded update on ``rows`` (the engine's ``replay_step``): ``loss_scale`` x (their mean
        answer loss + ``penalty()``); gradients summed over the ranks; None when skipped."""
        dist = _dist()
        world = dist.get_world_size() if dist else 1
        batches, tokens = self._local_batches(list(examples))
        n = max(1.0, reduce_sum([tokens], self._device)[0])
        local = 0.0
        for i, batch in enumerate(batches):
            loss_sum = self._run(batch)[0]
            loss = loss_sum * (loss_scale / n)
            if penalty is not None and i == len(batches) - 1:
                loss = loss + penalty() * (loss_scale / world)  # summed over the ranks below: once
            loss.backward()
            local += float(loss_sum.detach())
        if penalty is not None and not batches:
            (penalty() * (loss_scale / world)).backward()
        if dist is not None:  # every rank's share summed: the same update everywhere
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._trainable]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for p in self._trainable:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        loss = reduce_sum([local], self._device)[0] / n
        if not math.isfinite(loss):
            self._zero_grad(optimizer)
            return None
        skipped = guarded_step(self.params, optimizer,
                               lambda: torch.nn.utils.clip_grad_norm_(self._trainable, self._max_grad_norm),
                               lambda bad: reduce_sum([float(bad)], self._device)[0] > 0)
        self._zero_grad(optimizer)
        return loss if skipped is None else None

    # -- batches and passes ---------------------------------------------------------------------------------
    def collate(self, rows: Sequence[Row]) -> dict:
        """``rows`` collated by the trainer's collator (columns it does not use dropped first)."""
        data = [dict(r.data) for r in rows]
        if self._columns is not None:
            data = [{k: v for k, v in d.items() if k in self._columns} for d in data]
        batch = self._collate(data)
        if not isinstance(batch, Mapping) or batch.get("labels") is None:
            raise UserError("the trainer's data collator made a batch without 'labels'; memory rows must be "
                            "training rows with labels (-100 = no loss)")
        return {k: (v.to(self._device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _local_batches(self, rows: list[Row]) -> tuple[list[dict], int]:
        """This process's share of ``rows`` in batches of the per-device size, and its loss tokens."""
        dist = _dist()
        mine = share(rows, dist.get_rank(), dist.get_world_size()) if dist else rows
        batches, tokens = [], 0
        for k in range(0, len(mine), self._chunk):
            batch = self.collate(mine[k:k + self._chunk])
            labels = batch["labels"] if self.seq2seq else batch["labels"][:, 1:]
            tokens += int((labels != IGNORE_INDEX).sum())
            batches.append(batch)
        return batches, tokens

    def _run(self, batch: dict, hidden_states: bool = False):
        """(summed answer loss, answer-position logits, labels, hidden-state groups or None)."""
        extra = {"output_hidden_states": True} if hidden_states else {}
        if self.seq2seq:
            out = self.model(**batch, **extra)
        else:
            out = self.model(**{k: v for k, v in batch.items() if k != "labels"}, **extra)
        logits, labels = answer_positions(out.logits, batch["labels"], self.seq2seq)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, logits, labels, hidden_groups(out, batch, self.seq2seq) if hidden_states else None

    def _zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        for p in self._trainable:
            p.grad = None


def hidden_groups(out, batch: Mapping[str, Any], seq2seq: bool) -> list:
    """The hidden-state groups of ``LossInputs.hidden`` from a model output with hidden states."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    if seq2seq:
        return [(out.encoder_hidden_states[1:], mask), (out.decoder_hidden_states[1:], batch["labels"] != IGNORE_INDEX)]
    return [(out.hidden_states[1:], mask)]


def _length(row: Row) -> int:
    ids = row.data.get("input_ids")
    return len(ids) if ids is not None else 0


# -- the two wrappers that reach into the trainer's own step ------------------------------------------------------

def install(trainer, host) -> None:
    """Wrap ``trainer``'s data collator (replay mixing, batch marking) and ``compute_loss`` (the
    method's loss term) so they call ``host`` (a :class:`~aimmerging.hf.callback.ContinualCallback`),
    once per trainer; both pass through unchanged while ``host.view`` is None."""
    if getattr(trainer, "_aimmerging_host", None) is host:
        return
    trainer._aimmerging_host = host
    collate, compute_loss = trainer.data_collator, trainer.compute_loss
    host.collate = collate
    if collate is None:
        from transformers import default_data_collator

        host.collate = collate = default_data_collator

    def collate_with_method(features):
        view, method = host.view, host.method
        if view is None or not view.model.training:  # outside training, or the trainer's evaluation
            return collate(features)
        rows = [Row(dict(f), view.stage.name, row_id(f)) for f in features]
        extra = method.extra_examples(view, rows) or []
        if extra:
            keys = set(rows[0].data)
            rows = rows + [Row({k: v for k, v in r.data.items() if k in keys}, r.task, r.id) for r in extra]
        batch = collate([r.data for r in rows])
        if type(method).extra_loss is not Method.extra_loss:
            batch[BATCH_KEY] = host.keep_rows(rows)
        return batch

    def compute_loss_with_method(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        rows = host.take_rows(inputs.pop(BATCH_KEY, None))
        view, method = host.view, host.method
        if rows is None or view is None or not model.training:
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch,
                                **kwargs)
        hidden = bool(method.training_hidden_states)
        labels = inputs["labels"]
        call = {**inputs, "output_hidden_states": True} if hidden else inputs
        loss, outputs = compute_loss(model, call, return_outputs=True, num_items_in_batch=num_items_in_batch, **kwargs)
        logits, answer_labels = answer_positions(outputs.logits, labels, view.seq2seq)
        scale = 1.0 / view.grad_accum
        term = method.extra_loss(view, LossInputs(examples=rows, logits=logits, labels=answer_labels, scale=scale,
                                                  hidden=hidden_groups(outputs, inputs, view.seq2seq) if hidden else None))
        if term is not None:
            # the trainer divides the loss by the accumulation steps unless it is already scaled for them
            loss = loss + (term * scale if _scaled_for_accumulation(trainer, num_items_in_batch) else term)
        return (loss, outputs) if return_outputs else loss

    trainer.data_collator = collate_with_method
    trainer.compute_loss = compute_loss_with_method


def _scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether the trainer's loss is already normalised over the accumulated batch (as
    ``Trainer.training_step`` decides it)."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)
