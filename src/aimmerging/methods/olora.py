"""O-LoRA: a new LoRA per task in a subspace orthogonal to the earlier tasks' LoRAs.

Wang et al., EMNLP Findings 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning" (arXiv 2310.14152; code ``cmnfriend/O-LoRA``). Each task t gets a new LoRA (A_t, B_t);
the LoRAs of earlier tasks are frozen; the training loss adds

    lambda_1 * sum_{i < t} L_orth(A_i, A_t)  +  lambda_2 * L2(A_t, B_t)

and inference uses all LoRAs together (the weight update is sum_i B_i A_i). The paper defines
``L_orth(A_i, A_t) = sum_{j,k} O[j,k]^2`` with ``O = A_i^T A_t`` in its d x r layout, i.e. the
squared Frobenius norm of ``A_t A_i^T`` in PEFT's r x d layout; the reference code sums the
*absolute* entries instead (``torch.abs(torch.mm(lora_A, loranew_A.T)).sum()``) and its L2 term is
the sum of the (unsquared) Frobenius norms of the new LoRA's A and B (``torch.norm(param, p=2)``).

**Rank slots** (one PEFT adapter per run, saved with ``save_pretrained``). The run's adapter is
built with rank ``r x T`` (T = number of tasks, r = ``--lora-r``) and ``lora_alpha x T``, so that
PEFT's scaling alpha / rank stays alpha / r and every slot acts exactly as a rank-r LoRA with alpha.
Task t owns slot t: rows ``t*r:(t+1)*r`` of every lora_A and the same columns of every lora_B.
``B @ A = sum_i B_i A_i``, so evaluating the adapter is inference with all LoRAs together. Slots of
later tasks keep their initial values (PEFT: A random, B = 0, so they add nothing) until their task
comes; slots of earlier tasks keep their trained values. Both are frozen by (1) a gradient hook on
every LoRA tensor that zeroes the gradient outside slot t (so gradient clipping and AdamW's moments
see only slot t) and (2) copying the frozen entries back after every optimizer step
(``after_step``), which also undoes AdamW's weight decay there: frozen slots stay bit-identical.
The saved adapter of every stage holds the LoRAs of all tasks so far (one adapter of rank r x T)
and loads with plain ``PeftModel.from_pretrained``; no method state is needed for a resume.

**Needs a core change**: the runner must build the adapter with the larger rank. The method
declares it with :meth:`OLoRA.adapter_rank_multiplier` (``n_tasks``: the runner calls it once,
before building the model, with the number of tasks of the stream; the method records the number).
Until ``runs/runner.py::build_engine`` reads it, ``before_task`` raises a ConfigError.

Defaults and choices where the paper is silent:

* ``olora_lambda1 = 0.5`` and ``olora_lambda2 = 0`` (the reference scripts' ``--lamda_1 0.5
  --lamda_2 0``); ``olora_orth = "squared"`` is the paper's definition, ``"abs"`` the reference
  code's.
* The L2 term is the reference code's: sum over layers of ||A_t||_F + ||B_t||_F (not squared). It
  is computed only when lambda_2 > 0 (at B_t = 0 the norm's gradient is taken as 0, as torch does).
* The terms are added once per optimizer step (the loop scales every micro-batch's term by 1 /
  accumulation steps). The reference adds them, unscaled, to each accumulation micro-batch's
  already-divided loss, so its effective weights are lambda x its accumulation steps.
* The earlier A_i enter the orthogonality term detached (they are frozen anyway).
* The first task (t = 0) has no orthogonality term. The LoRA dropout is one dropout on the layer
  input shared by all slots (the reference has one per LoRA); with dropout 0 they are the same.
* Only (lora_A, lora_B) weight pairs are supported; other trainable LoRA tensors are a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..models.lora import lora_layers, snapshot
from ..settings import Bounded, option
from . import register_method
from .base import Method

ORTH_FORMS = ("squared", "abs")

NOT_WIRED = ("olora needs the adapter built with rank lora_r x T and lora_alpha x T (T = number of tasks: one "
             "rank-lora_r slot per task), but the runner did not ask the method for it: runs/runner.py::build_engine "
             "must read Method.adapter_rank_multiplier(n_tasks) (see aimmerging.methods.olora)")


@dataclass
class OLoRASettings(Bounded):
    olora_lambda1: float = option(0.5, "olora: weight of the orthogonality loss between the new task's lora_A and "
                                  "every earlier task's", ge=0)
    olora_lambda2: float = option(0.0, "olora: weight of the L2 term on the new task's LoRA (sum of the Frobenius "
                                  "norms of its A and B)", ge=0)
    olora_orth: str = option("squared", "olora: orthogonality term per earlier task, the sum of the squared "
                             "('squared', the paper's) or absolute ('abs', the reference code's) entries of "
                             "A_t A_i^T", ORTH_FORMS)


def orthogonality_loss(a_new: torch.Tensor, a_old: torch.Tensor, form: str = "squared") -> torch.Tensor:
    """L_orth between a new LoRA's A (r x d) and earlier ones' (k x d, stacked): the sum of the
    squared (``squared``) or absolute (``abs``) entries of ``a_old @ a_new^T``; 0 exactly when
    every row of ``a_new`` is orthogonal to every row of ``a_old``."""
    overlap = a_old @ a_new.T
    if form == "squared":
        return overlap.square().sum()
    if form == "abs":
        return overlap.abs().sum()
    raise ValueError(f"form must be one of {ORTH_FORMS}, got {form!r}")


def _keep_slot(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    return hook


@register_method
class OLoRA(Method):
    """``olora`` (module docstring): one rank-r slot of the run's rank r x T adapter per task,
    earlier and later slots frozen, orthogonality loss between the new slot's A and the earlier
    slots' A."""

    name = "olora"
    paper = "O-LoRA (Wang et al., EMNLP Findings 2023, arXiv 2310.14152)"
    summary = ("a new LoRA per task in its own rank slot (earlier ones frozen) with an orthogonality loss against "
               "the earlier lora_A; inference uses all (--olora-lambda1, --olora-lambda2)")
    Settings = OLoRASettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.n_tasks: Optional[int] = None
        self._handles: list = []

    def adapter_rank_multiplier(self, n_tasks: int) -> int:
        """The run's adapter is built with rank lora_r x this (and lora_alpha x this): one slot per
        task. The runner calls it once, before building the model."""
        self.n_tasks = int(n_tasks)
        return self.n_tasks

    def slot_rank(self, total_rank: int) -> int:
        if self.n_tasks is None:
            raise ConfigError(NOT_WIRED)
        if total_rank % self.n_tasks:
            raise ConfigError(f"olora: the adapter has rank {total_rank}, not lora_r x {self.n_tasks} (one slot per "
                              "task); in a trainer, build the PEFT model with LoraConfig(r=lora_r x tasks, "
                              "lora_alpha=lora_alpha x tasks); in aimmerging's runner, runs/runner.py::build_engine "
                              "must multiply both by Method.adapter_rank_multiplier(n_tasks)")
        return total_rank // self.n_tasks

    def before_task(self, view) -> None:
        layers = lora_layers(view.model, view.params)
        if layers.others or not layers.pairs:
            raise ConfigError("olora: supports LoRA adapters made of lora_A/lora_B weight pairs only")
        ranks = {view.params[ia].shape[0] for ia, _ in layers.pairs}
        if len(ranks) != 1:
            raise ConfigError(f"olora: the adapted layers have different ranks {sorted(ranks)}")
        total = ranks.pop()
        r = self.slot_rank(total)
        t = view.stage.index
        if t >= self.n_tasks:
            raise ConfigError(f"olora: stage {t} has no slot (the adapter has {self.n_tasks})")
        self.t, self.r = t, r
        self.layers = [(view.params[ia], view.params[ib]) for ia, ib in layers.pairs]
        self.masks: list[torch.Tensor] = [None] * len(view.params)  # type: ignore[list-item]
        for ia, ib in layers.pairs:
            rows = torch.zeros(total, dtype=torch.bool, device=view.params[ia].device)
            rows[t * r:(t + 1) * r] = True
            self.masks[ia] = rows.view(-1, 1)  # lora_A: r_total x d_in, slot rows
            self.masks[ib] = rows.view(1, -1)  # lora_B: d_out x r_total, slot columns
        self.frozen = snapshot(view.params)
        self._remove_hooks()
        self._handles = [p.register_hook(_keep_slot(m)) for p, m in zip(view.params, self.masks)]
        self._last_orth: Optional[torch.Tensor] = None

    def penalties(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(orthogonality term, L2 term) of the current slot, each None when its lambda is 0 (or,
        for the orthogonality term, on the first task)."""
        t, r, s = self.t, self.r, self.settings
        orth = l2 = None
        if s.olora_lambda1 > 0 and t > 0:
            orth = sum(orthogonality_loss(A[t * r:(t + 1) * r], A[:t * r].detach(), s.olora_orth)
                       for A, _ in self.layers)
        if s.olora_lambda2 > 0:
            l2 = sum(torch.linalg.vector_norm(A[t * r:(t + 1) * r]) + torch.linalg.vector_norm(B[:, t * r:(t + 1) * r])
                     for A, B in self.layers)
        return orth, l2

    def extra_loss(self, view, inputs) -> Optional[torch.Tensor]:
        orth, l2 = self.penalties()
        terms = []
        if orth is not None:
            self._last_orth = orth.detach()
            terms.append(self.settings.olora_lambda1 * orth)
        if l2 is not None:
            terms.append(self.settings.olora_lambda2 * l2)
        return sum(terms) if terms else None

    @torch.no_grad()
    def after_step(self, view, record):
        for p, m, f in zip(view.params, self.masks, self.frozen):
            p.copy_(torch.where(m, p, f))  # frozen slots back to their values, bit for bit
        if self._last_orth is not None:
            record["orth_loss"] = float(self._last_orth)  # of the step's last micro-batch, before the update
        return None

    def after_task(self, view):
        self._remove_hooks()
        return None

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["NOT_WIRED", "OLoRA", "OLoRASettings", "orthogonality_loss"]
