"""The torch side of training: losses, optimizer steps, probes, replay steps.

All example lists handed to the engine are *global* (identical on every process); the engine
shards them over the processes with accelerate and normalises every loss by the number of answer
tokens of the whole global batch, so one process and N processes compute the same gradients and
the same loss values (up to floating-point summation order).

Every process runs the same sequence of forward passes and collectives: a process whose share
of a small list is empty (fewer examples than processes) runs a forward pass on a stand-in
example with every label masked, so it contributes exactly zero to the loss and the gradients
while DDP (or FSDP) sees the same calls on every rank.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX, Formatter
from ..data.olora import Example
from ..methods.base import LossInputs
from ..models.lora import lora_parameters

ExtraLoss = Callable[[LossInputs], Optional[torch.Tensor]]


class Timers:
    """Wall-clock seconds per category (inner, probe, replay, bookkeeping, eval, ...)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.totals.items()}


class Engine:
    def __init__(self, model, formatter: Formatter, accelerator, *, micro_batch_size: int, max_grad_norm: float,
                 full_logits: bool = False):
        self.model = model  # as prepared by accelerate (DDP-wrapped under several processes)
        self.peft_model = accelerator.unwrap_model(model)
        self.formatter = formatter
        self.accelerator = accelerator
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.params = lora_parameters(self.peft_model)
        forward = inspect.signature(self.peft_model.get_base_model().forward).parameters
        self._keep_logits = "logits_to_keep" in forward
        self.full_logits = full_logits  # compute the LM head on every position, not only the answers
        self._position_ids = "position_ids" in forward

    # -- losses ------------------------------------------------------------------------------------
    def label_tokens(self, examples: Sequence[Example]) -> int:
        encs = (self.formatter.encode(e) for e in examples)
        if self.formatter.kind == "causal":
            return sum(e.answer_len for e in encs)
        return sum(len(e.labels) for e in encs)

    def _local_loss_sum(self, examples: Sequence[Example], masked: bool = False) -> torch.Tensor:
        """Summed token cross-entropy of the answer tokens of ``examples`` (this process's share).
        ``masked``: every label ignored, so the loss and its gradient are exactly zero (the
        stand-in forward pass of a process with an empty share)."""
        return self._local_forward(examples, masked)[0]

    def _local_forward(self, examples: Sequence[Example], masked: bool = False):
        """(summed answer loss, logits of the answer positions, their labels) of ``examples``."""
        batch = {k: v.to(self.accelerator.device) for k, v in self.formatter.collate(examples).items()}
        if masked:
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        with self.accelerator.autocast():
            if self.formatter.kind == "seq2seq":
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"]).logits
                labels = batch["labels"]
            else:
                # Left-padded: every answer ends at the last position, so only the last k positions
                # need LM-head logits (position t predicts token t+1).
                k = int(batch["answer_width"]) + 1
                kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                if self._position_ids:
                    kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                if self._keep_logits and not self.full_logits:
                    kwargs["logits_to_keep"] = k
                logits = self.model(**kwargs).logits[:, -k:-1]
                labels = batch["labels"][:, -(k - 1):]
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, logits, labels

    def _reduce(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def _shard(self, examples: Sequence[Example]) -> tuple[list[Example], bool]:
        """This process's share of ``examples`` and whether it is a masked stand-in: with fewer
        examples than processes some shares are empty, and those processes still run a forward
        (and backward) pass, on the first example with every label masked, so that the
        collectives of DDP/FSDP stay matched on all processes."""
        if self.accelerator.num_processes == 1:
            return list(examples), False
        with self.accelerator.split_between_processes(list(examples)) as mine:
            mine = list(mine)
        return (mine, False) if mine else (list(examples[:1]), True)

    def _shard_loss_sum(self, examples: Sequence[Example]) -> torch.Tensor:
        mine, masked = self._shard(examples)
        return self._local_loss_sum(mine, masked=masked)

    def backward(self, examples: Sequence[Example], scale: float, sync: bool, total_tokens: int | None = None,
                 extra_loss: ExtraLoss | None = None) -> float:
        """Backward of ``scale`` x (summed answer loss of ``examples``) / ``total_tokens`` (default:
        the answer tokens of ``examples``), plus ``scale`` x the method's ``extra_loss`` term when
        given. Returns this process's summed answer loss (not reduced)."""
        total = total_tokens or self.label_tokens(examples)
        ctx = nullcontext() if sync or self.accelerator.num_processes == 1 else self.accelerator.no_sync(self.model)
        with ctx:
            mine, masked = self._shard(examples)
            loss_sum, logits, labels = self._local_forward(mine, masked=masked)
            # DDP averages gradients over processes: multiply by their number to get the global sum.
            loss = loss_sum * (scale * self.accelerator.num_processes / total)
            if extra_loss is not None:
                term = extra_loss(LossInputs(examples=mine, logits=logits, labels=labels, scale=scale))
                if term is not None:
                    loss = loss + scale * term
            self.accelerator.backward(loss)
        return float(loss_sum.detach())

    @torch.no_grad()
    def mean_loss(self, examples: Sequence[Example], train_mode: bool) -> float:
        """Mean answer-token loss of ``examples`` without gradients (chunked in micro-batches)."""
        was_training = self.model.training
        self.model.train(train_mode)
        try:
            local = 0.0
            for k in range(0, len(examples), self.micro_batch_size):
                local += float(self._shard_loss_sum(examples[k:k + self.micro_batch_size]))
        finally:
            self.model.train(was_training)
        return self._reduce(local) / max(1, self.label_tokens(examples))

    # -- optimizer steps -------------------------------------------------------------------------------
    def _finish_step(self, optimizer) -> bool:
        """Clip and step unless the gradient is not finite; always clears the gradients."""
        norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        ok = norm is None or math.isfinite(float(norm))
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ok

    def inner_step(self, micro_batches: Sequence[Sequence[Example]], optimizer, scheduler,
                   extra_loss: ExtraLoss | None = None) -> dict:
        """One optimizer update over ``micro_batches`` (gradient accumulation): each micro-batch's
        mean answer loss (plus the method's extra term) divided by the number of micro-batches, as
        HF Trainer does."""
        lr = optimizer.param_groups[0]["lr"]
        local, tokens = [], 0
        for i, mb in enumerate(micro_batches):
            n = self.label_tokens(mb)
            local.append(self.backward(mb, 1.0 / len(micro_batches), sync=i == len(micro_batches) - 1,
                                       extra_loss=extra_loss) / n)
            tokens += sum(self.formatter.length(e) for e in mb)
        loss = self._reduce(sum(local)) / len(micro_batches)
        ok = math.isfinite(loss) and self._finish_step(optimizer)
        if not ok:
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return {"train_loss": loss if math.isfinite(loss) else None, "lr": lr, "tokens": tokens, "skipped": not ok}

    def replay_step(self, examples: Sequence[Example], optimizer, loss_scale: float) -> float | None:
        """One replay (outer) update on a memory batch, chunked into micro-batches with the same
        gradient as one batch; the LR scheduler is not stepped. Returns the batch's mean loss, or
        None when it was not finite (the update is then skipped)."""
        total = self.label_tokens(examples)
        chunks = [examples[k:k + self.micro_batch_size] for k in range(0, len(examples), self.micro_batch_size)]
        local = sum(self.backward(c, loss_scale, sync=i == len(chunks) - 1, total_tokens=total) for i, c in enumerate(chunks))
        loss = self._reduce(local) / total
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            return None
        return loss if self._finish_step(optimizer) else None
