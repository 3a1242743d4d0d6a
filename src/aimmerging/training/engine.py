"""The torch side of training: losses, optimizer steps, probes, replay steps.

All example lists handed to the engine are *global* (identical on every process); the engine
shards them over the processes with accelerate and normalises every loss by the number of answer
tokens of the whole global batch, so one process and N processes compute the same gradients and
the same loss values (up to floating-point summation order) when LoRA dropout is off. With dropout
on, each process draws the masks of its own share from its own random stream, which are not the
masks one process draws for the whole batch: the N-process adapters then differ from the
one-process ones by more than summation order (tests/test_distributed.py compares them with
dropout 0).

Every process runs the same sequence of forward passes and collectives: a process whose share
of a small list is empty (fewer examples than processes) runs a forward pass on a stand-in
example with every label masked, so it contributes exactly zero to the loss and the gradients
while DDP (or FSDP) sees the same calls on every rank.

A non-finite value never reaches the adapter through an optimizer step: an update whose loss,
gradient or resulting adapter is not finite (NaN, +-inf) is skipped (see :meth:`Engine._finish_step`),
and the step reports why (:data:`SKIP_LOSS`, :data:`SKIP_GRADIENT`, :data:`SKIP_UPDATE`); so is an
update that torch refuses because a scalar of it overflows the parameters' type (a finite but huge
learning rate or weight decay: :data:`SKIP_OVERFLOW`).
:data:`FAULTS` is a test hook that injects such faults at chosen steps (off by default).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX, Formatter
from ..data.olora import Example
from ..errors import ConfigError
from ..methods.base import ForwardOutput, LossInputs
from ..models.lora import lora_parameters

ExtraLoss = Callable[[LossInputs], Optional[torch.Tensor]]

# Why an optimizer step was skipped (the ``skipped`` field of a step's trace record).
SKIP_LOSS = "non-finite loss"
SKIP_GRADIENT = "non-finite gradient"
SKIP_UPDATE = "non-finite adapter after the optimizer step"
SKIP_OVERFLOW = "optimizer step overflowed (a value too large for the parameters' type)"

FAULT_KINDS = ("loss", "gradient", "update")
Calls = Union[Collection[int], bool]  # call numbers (1-based), or True for every call


@dataclass
class FaultInjector:
    """Test hook: makes chosen optimizer steps non-finite, to exercise the guards of
    :meth:`Engine._finish_step` without extreme options.

    Every optimizer step the engine attempts (:meth:`Engine.inner_step` and
    :meth:`Engine.replay_step` alike, in the order they run in this process) is one *call*,
    numbered from 1. For each kind, the calls it hits: a collection of call numbers, or True for
    every call.

    * ``loss``: the step's (reduced) loss is replaced by NaN after the backward passes;
    * ``gradient``: the first LoRA tensor's gradient is filled with NaN before clipping;
    * ``update``: the first LoRA tensor is filled with NaN right after ``optimizer.step()``, as an
      update that overflowed would leave it.

    ``fired`` lists ``(call, kind, where)`` for each fault injected (``where``: ``"inner"`` or
    ``"replay"``), so a test can tell which kind of step it hit. Install it for a test with
    ``monkeypatch.setattr(aimmerging.training.engine, "FAULTS", FaultInjector(update={3}))``;
    the engine reads :data:`FAULTS` at every step and does nothing more while it is None.
    """

    loss: Calls = ()
    gradient: Calls = ()
    update: Calls = ()
    calls: int = 0
    fired: list = field(default_factory=list)

    def next_call(self, where: str) -> frozenset[str]:
        """Count one optimizer step; the kinds of fault to inject into it."""
        self.calls += 1
        kinds = frozenset(k for k in FAULT_KINDS if _hits(getattr(self, k), self.calls))
        self.fired.extend((self.calls, k, where) for k in FAULT_KINDS if k in kinds)
        return kinds


def _hits(calls: Calls, n: int) -> bool:
    return calls is True or (calls is not False and n in calls)


FAULTS: Optional[FaultInjector] = None  # the fault-injection hook: None (off) outside tests

_NO_FAULTS: frozenset[str] = frozenset()


def _faults(where: str) -> frozenset[str]:
    return _NO_FAULTS if FAULTS is None else FAULTS.next_call(where)


@torch.no_grad()
def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one device synchronisation when they
    share a device."""
    flags = [torch.isfinite(t).all() for t in tensors]
    if len({f.device for f in flags}) == 1:
        return bool(torch.stack(flags).all())
    return all(bool(f) for f in flags)


def optimizer_state(optimizer) -> list:
    """A copy of the per-parameter state of ``optimizer`` (AdamW: step, exp_avg, exp_avg_sq)."""
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            saved.append((p, {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                              for k, v in state.items()} if state else None))
    return saved


_OVERFLOW = re.compile(r"cannot be converted to type \S+ without overflow")


def optimizer_step(optimizer) -> bool:
    """``optimizer.step()``; False when torch refused it because a scalar of the update overflows
    the parameters' type. AdamW's step size is ``lr / (1 - beta1**t)`` (10 x lr at the first step):
    a finite learning rate above about 3.4e37 makes ``param.addcdiv_`` raise ``RuntimeError: value
    cannot be converted to type float without overflow`` (and ``1 - lr * weight_decay`` can do the
    same to ``param.mul_``), possibly after some parameters and moments were already updated, so
    the caller must put back the parameters and the optimizer's state. Any other error propagates."""
    try:
        optimizer.step()
    except RuntimeError as e:
        if not _OVERFLOW.search(str(e)):
            raise
        return False
    return True


def restore_optimizer_state(optimizer, saved: list) -> None:
    for p, state in saved:
        if state is None:
            optimizer.state.pop(p, None)
        else:
            optimizer.state[p] = state


def guarded_step(params: Sequence[torch.Tensor], optimizer, clip: Callable[[], Optional[torch.Tensor]],
                 agree: Callable[[bool], bool] = bool, after_step: Callable[[], None] | None = None) -> Optional[str]:
    """Clip (``clip()`` returns the gradient norm, or None), step ``optimizer`` and clear its
    gradients, unless something is not finite; returns None when the step was taken, or why not:

    * the gradient norm is not finite: no step (:data:`SKIP_GRADIENT`);
    * ``params`` are not finite after ``optimizer.step()`` (e.g. 0/0 in Adam with eps 0, an
      infinite learning rate): the parameters *and the optimizer's state* are put back as they
      were before the step (:data:`SKIP_UPDATE`);
    * torch refused the step as overflowing (a finite but huge learning rate, see
      :func:`optimizer_step`): put back the same way (:data:`SKIP_OVERFLOW`).

    ``agree(bad)`` makes the put-back decision the same on every process (e.g. any rank bad);
    ``after_step`` runs right after the step (a test hook). The one guarded step of both hosts:
    the engine's inner and replay steps and the HF callback's replay steps."""
    norm = clip()
    if norm is not None and not math.isfinite(float(norm)):
        optimizer.zero_grad(set_to_none=True)
        return SKIP_GRADIENT
    with torch.no_grad():
        before = [p.detach().clone() for p in params]
    state = optimizer_state(optimizer)
    stepped = optimizer_step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    if agree(not stepped or not _all_finite(params)):
        with torch.no_grad():
            for p, v in zip(params, before):
                p.copy_(v)
        restore_optimizer_state(optimizer, state)
        return SKIP_UPDATE if stepped else SKIP_OVERFLOW
    return None


def share(items: Sequence, rank: int, world: int) -> list:
    """The contiguous share of process ``rank`` of ``world`` (as ``accelerate``'s
    ``split_between_processes``: the first ``len(items) % world`` processes get one more). The one
    sharding rule of both hosts."""
    per, extra = divmod(len(items), world)
    start = rank * per + min(rank, extra)
    return list(items[start:start + per + (1 if rank < extra else 0)])


class Timers:
    """Wall-clock seconds per category (inner, probe, replay, bookkeeping, eval, and a method's
    own: fisher, distillation, ...). Exclusive: a section opened inside another (a method's
    distillation pass inside the inner step) is counted in its own category only, so the
    categories add up to the time spent in sections."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, seconds spent in nested sections] per open section

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        self._open.append([name, 0.0])
        try:
            yield
        finally:
            _, nested = self._open.pop()
            spent = time.perf_counter() - start
            self.totals[name] += spent - nested
            if self._open:
                self._open[-1][1] += spent

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.totals.items()}


class Engine:
    def __init__(self, model, formatter: Formatter, accelerator, *, micro_batch_size: int, max_grad_norm: float,
                 full_logits: bool = False, sharded: bool = False):
        # as prepared by accelerate (DDP-wrapped under several processes), or the PEFT model whose
        # base ``models.sharding`` sharded (``sharded``: the engine averages the gradients itself)
        self.model = model
        self.sharded = sharded
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

    def _local_forward(self, examples: Sequence[Example], masked: bool = False, hidden_states: bool = False):
        """(summed answer loss, logits of the answer positions, their labels, hidden-state groups or
        None) of ``examples`` through the training model (DDP-wrapped under several processes)."""
        batch = self._collate(examples)
        if masked:
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return self._run(self.model, batch, hidden_states)

    def _collate(self, examples: Sequence[Example], rows: Sequence[int] | None = None) -> dict:
        """The batch of ``examples`` on the device; ``rows``: only those rows of it (padded as the
        whole batch is, so positions line up with a forward of the whole batch)."""
        batch = {k: v.to(self.accelerator.device) for k, v in self.formatter.collate(examples).items()}
        if rows is not None:
            index = torch.as_tensor(list(rows), dtype=torch.long, device=self.accelerator.device)
            n = len(examples)
            batch = {k: v.index_select(0, index) if v.dim() > 0 and v.shape[0] == n else v for k, v in batch.items()}
        return batch

    def _run(self, model, batch: dict, hidden_states: bool = False):
        extra = {"output_hidden_states": True} if hidden_states else {}
        with self.accelerator.autocast():
            if self.formatter.kind == "seq2seq":
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], **extra)
                logits, labels = out.logits, batch["labels"]
                hidden = ([(out.encoder_hidden_states[1:], batch["attention_mask"]),
                           (out.decoder_hidden_states[1:], labels != IGNORE_INDEX)] if hidden_states else None)
            else:
                # Left-padded: every answer ends at the last position, so only the last k positions
                # need LM-head logits (position t predicts token t+1).
                k = int(batch["answer_width"]) + 1
                kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                if self._position_ids:
                    kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                if self._keep_logits and not self.full_logits:
                    kwargs["logits_to_keep"] = k
                out = model(**kwargs, **extra)
                logits = out.logits[:, -k:-1]
                labels = batch["labels"][:, -(k - 1):]
                hidden = [(out.hidden_states[1:], batch["attention_mask"])] if hidden_states else None
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, logits, labels, hidden

    def forward(self, examples: Sequence[Example], *, rows: Sequence[int] | None = None, train_mode: bool = False,
                grad: bool = False, hidden_states: bool = False) -> ForwardOutput:
        """A method's own forward pass (``TrainingView.forward``) on this process: ``examples``
        collated as one batch (``rows``: only those rows of it), through the PEFT model (not the
        DDP wrapper: no collectives), under the run's autocast, dropout on only in ``train_mode``
        (the previous mode is restored), with gradients only when ``grad``. Not on a sharded base,
        whose every forward pass needs every process (methods that use it are refused under --fsdp)."""
        if self.sharded and self.accelerator.num_processes > 1:
            raise ConfigError("fsdp: the method runs forward passes of its own (view.forward), which a sharded base "
                              "cannot serve; run it without --fsdp (DDP)")
        was_training = self.peft_model.training
        self.peft_model.train(train_mode)
        try:
            with torch.set_grad_enabled(grad):
                loss_sum, logits, labels, hidden = self._run(self.peft_model, self._collate(examples, rows), hidden_states)
        finally:
            self.peft_model.train(was_training)
        tokens = int((labels != IGNORE_INDEX).sum())
        return ForwardOutput(logits=logits, labels=labels, loss=loss_sum / max(tokens, 1), hidden=hidden)

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
        mine = share(examples, self.accelerator.process_index, self.accelerator.num_processes)
        return (mine, False) if mine else (list(examples[:1]), True)

    def _shard_loss_sum(self, examples: Sequence[Example]) -> torch.Tensor:
        mine, masked = self._shard(examples)
        return self._local_loss_sum(mine, masked=masked)

    def backward(self, examples: Sequence[Example], scale: float, sync: bool, total_tokens: int | None = None,
                 extra_loss: ExtraLoss | None = None, hidden_states: bool = False) -> float:
        """Backward of ``scale`` x (summed answer loss of ``examples``) / ``total_tokens`` (default:
        the answer tokens of ``examples``), plus ``scale`` x the method's ``extra_loss`` term when
        given. Returns this process's summed answer loss (not reduced)."""
        total = total_tokens or self.label_tokens(examples)
        solo = sync or self.accelerator.num_processes == 1 or self.sharded
        ctx = nullcontext() if solo else self.accelerator.no_sync(self.model)
        with ctx:
            mine, masked = self._shard(examples)
            loss_sum, logits, labels, hidden = self._local_forward(mine, masked=masked,
                                                                   hidden_states=hidden_states and extra_loss is not None)
            # DDP averages gradients over processes: multiply by their number to get the global sum.
            loss = loss_sum * (scale * self.accelerator.num_processes / total)
            if extra_loss is not None:
                term = extra_loss(LossInputs(examples=mine, logits=logits, labels=labels, scale=scale, hidden=hidden))
                if term is not None:
                    loss = loss + scale * term
            self.accelerator.backward(loss)
        if sync and self.sharded and self.accelerator.num_processes > 1:
            self._average_gradients()
        return float(loss_sum.detach())

    @torch.no_grad()
    def _average_gradients(self) -> None:
        """The mean over the processes of the LoRA gradients accumulated since the last step, as DDP
        gives it: one all-reduce of all of them flattened into one buffer (the sharded base holds no
        gradient: it is frozen)."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    @torch.no_grad()
    def mean_loss(self, examples: Sequence[Example], train_mode: bool, chunk: int | None = None) -> float:
        """Mean answer-token loss of ``examples`` without gradients, in passes of ``chunk`` examples
        (default: the micro-batch size)."""
        sums = self._chunk_loss_sums(examples, train_mode, chunk or self.micro_batch_size)
        return sum(loss for loss, _, _ in sums) / max(1, sum(tokens for _, tokens, _ in sums))

    @torch.no_grad()
    def batch_mean_loss(self, examples: Sequence[Example], batch_size: int) -> float:
        """HF Trainer's evaluation loss (eval mode): each batch's mean answer-token loss, averaged
        over the batches weighted by their number of examples."""
        sums = self._chunk_loss_sums(examples, False, batch_size)
        return sum(n * loss / max(1, tokens) for loss, tokens, n in sums) / max(1, len(examples))

    def _chunk_loss_sums(self, examples: Sequence[Example], train_mode: bool, chunk: int) -> list[tuple[float, int, int]]:
        """(summed answer loss over all processes, answer tokens, examples) per pass of ``chunk``."""
        was_training = self.model.training
        self.model.train(train_mode)
        try:
            out = []
            for k in range(0, len(examples), chunk):
                part = examples[k:k + chunk]
                out.append((self._reduce(float(self._shard_loss_sum(part))), self.label_tokens(part), len(part)))
        finally:
            self.model.train(was_training)
        return out

    # -- optimizer steps -------------------------------------------------------------------------------
    def _finish_step(self, optimizer, faults: frozenset[str] = _NO_FAULTS) -> Optional[str]:
        """Clip and step through :func:`guarded_step` (which says when and why a step is skipped),
        with the skip decision agreed over the processes; always clears the gradients. Either way a skipped step leaves no trace in the adapter or the optimizer (moments and step
        count as before, so Adam's bias correction does not count it), exactly as a step skipped for
        a non-finite loss, which never reaches this point. The LR scheduler is the caller's: it
        still advances. The snapshot taken before every step is a copy of the LoRA tensors and
        their optimizer state (small); the step's arithmetic is unchanged."""
        if "gradient" in faults:
            self._poison_gradient()

        def poison_update() -> None:
            if "update" in faults:
                with torch.no_grad():
                    self.params[0].fill_(math.nan)

        def agree(bad: bool) -> bool:  # the same decision on every process
            return self._reduce(float(bad)) > 0 if self.accelerator.num_processes > 1 else bad

        return guarded_step(self.params, optimizer, lambda: self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm),
                            agree, poison_update)

    @torch.no_grad()
    def _poison_gradient(self) -> None:
        p = self.params[0]
        if p.grad is None:
            p.grad = torch.full_like(p, math.nan)
        else:
            p.grad.fill_(math.nan)

    def inner_step(self, micro_batches: Sequence[Sequence[Example]], optimizer, scheduler,
                   extra_loss: ExtraLoss | None = None, hidden_states: bool = False) -> dict:
        """One optimizer update over ``micro_batches`` (gradient accumulation): each micro-batch's
        mean answer loss (plus the method's extra term) divided by the number of micro-batches, as
        HF Trainer does. ``skipped`` in the result: None, or why the update was skipped."""
        faults = _faults("inner")
        lr = optimizer.param_groups[0]["lr"]
        local, tokens = [], 0
        for i, mb in enumerate(micro_batches):
            n = self.label_tokens(mb)
            local.append(self.backward(mb, 1.0 / len(micro_batches), sync=i == len(micro_batches) - 1,
                                       extra_loss=extra_loss, hidden_states=hidden_states) / n)
            tokens += sum(self.formatter.length(e) for e in mb)
        loss = self._reduce(sum(local)) / len(micro_batches)
        if "loss" in faults:
            loss = math.nan
        if math.isfinite(loss):
            skipped = self._finish_step(optimizer, faults)
        else:
            optimizer.zero_grad(set_to_none=True)
            skipped = SKIP_LOSS
        scheduler.step()
        return {"train_loss": loss if math.isfinite(loss) else None, "lr": lr, "tokens": tokens, "skipped": skipped}

    def replay_step(self, examples: Sequence[Example], optimizer, loss_scale: float,
                    penalty: Optional[Callable[[], torch.Tensor]] = None) -> float | None:
        """One replay (outer) update on a memory batch, chunked into micro-batches with the same
        gradient as one batch; the LR scheduler is not stepped. ``penalty``: a term of the LoRA
        tensors alone (e.g. an L2 anchor), added once to the update's loss, times ``loss_scale``,
        with the last chunk (whose backward synchronises the processes). Returns the batch's mean
        answer loss (without the penalty), or None when the update was skipped (a non-finite loss,
        gradient or adapter: see :meth:`_finish_step`)."""
        faults = _faults("replay")
        total = self.label_tokens(examples)
        chunks = [examples[k:k + self.micro_batch_size] for k in range(0, len(examples), self.micro_batch_size)]
        last = len(chunks) - 1
        extra = None if penalty is None else (lambda inputs: penalty())
        local = sum(self.backward(c, loss_scale, sync=i == last, total_tokens=total,
                                  extra_loss=extra if i == last else None) for i, c in enumerate(chunks))
        loss = self._reduce(local) / total
        if "loss" in faults:
            loss = math.nan
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            return None
        return loss if self._finish_step(optimizer, faults) is None else None
