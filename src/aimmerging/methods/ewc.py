"""EWC: Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting
in neural networks", PNAS), on the LoRA tensors.

After each task t the method keeps the adapter theta*_t it ended with and a diagonal Fisher
information F_t estimated on that task's training examples; every later micro-batch adds

    ewc_lambda / 2 * sum_t sum_i F_t,i * (theta_i - theta*_t,i)^2

(one quadratic penalty per earlier task, as in the paper's "separate penalties" form; their sum
is what "accumulated over tasks" means here). ``--ewc-online`` is online EWC (Schwarz et al. 2018,
"Progress & Compress"; Huszar 2018): a single penalty, F <- ewc_gamma * F + F_t and the anchor is
always the latest task's adapter.

The Fisher estimate is the empirical Fisher: the mean over ``ewc_fisher_examples`` training
examples of the squared gradient of each example's answer loss, one example at a time (batches of
one: squaring a batch gradient would not be the Fisher). It is computed once per task, after
training, on the adapter the task ends with, under ``view.timed("fisher")``, and recorded in the
trace (``{"event": "fisher", "examples": n, "fisher_sum": ...}``).

Defaults: ``ewc_lambda`` 1000, ``ewc_fisher_examples`` 32, ``ewc_online`` off, ``ewc_gamma`` 1.0.

Choices where the paper is silent:

* ``ewc_lambda`` = 1000 is an order-of-magnitude guess, not a tuned value: the paper tunes lambda
  per experiment, and the Fisher entries of LoRA tensors under a token-mean loss are small
  squared gradients, so lambda must be large for the penalty to matter. Tune it per model; every
  step record of a later task carries the penalty (``ewc_penalty``) and every task's ``fisher``
  record the Fisher's sum, to make that easy;
* the loss whose gradient is squared is the example's answer loss as the training loss defines
  it: the mean cross-entropy over its answer tokens (gold answers: the *empirical* Fisher, not
  samples from the model), with dropout off (eval mode);
* which examples: the view does not expose the task's training set (see below), so the Fisher is
  estimated on the last ``ewc_fisher_examples`` distinct training examples the task trained on
  (its final micro-batches; the stream is reshuffled every epoch, so they are a random sample of
  the training set, fewer when the task saw fewer). Under several processes each process takes
  its share (ceil(n / processes)) of the examples its own micro-batches held, and the sums are
  all-reduced, so every process holds the same Fisher;
* when: in ``task_end_adapter`` (which returns None, keeping the trained adapter), the last hook
  of a stage, so that theta* and F are those of the adapter actually carried on, also when
  ``--select-best-every`` restored an earlier one (after ``after_task``);
* the last task's Fisher is estimated too (the view does not say which stage is the last).

How the Fisher pass reaches the examples: while the task trains, ``extra_loss`` keeps the
micro-batches it sees (``inputs.examples``) and, per distinct example, which row of which
micro-batch it was; the Fisher pass runs ``view.forward(micro_batch, rows=[row], grad=True)``
(collated as the training forward collated it, dropout off) and takes
``torch.autograd.grad`` of the row's loss, so the optimizer's ``.grad`` fields are not touched.

Resume: ``state_dict()`` holds the Fisher tensors and anchors of every penalty (CPU copies), saved
with every stage; ``load_state_dict`` restores them, so a resumed stage trains exactly as it would
have.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.formatting import IGNORE_INDEX
from ..models.lora import snapshot
from ..settings import Bounded, option
from . import register_method
from .base import Method


@dataclass
class EWCSettings(Bounded):
    ewc_lambda: float = option(1000.0, "ewc: penalty weight lambda in lambda/2 * sum F (theta - theta*)^2", ge=0)
    ewc_fisher_examples: int = option(32, "ewc: training examples per task for the diagonal Fisher estimate", ge=1)
    ewc_online: bool = option(False, "ewc: online EWC, one penalty: F <- ewc_gamma * F + F_task, anchored at the latest adapter")
    ewc_gamma: float = option(1.0, "ewc: decay of the accumulated Fisher in online EWC (--ewc-online)", ge=0, le=1)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@register_method
class EWC(Method):
    name = "ewc"
    own_forward_passes = True
    paper = "EWC: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017)"
    summary = ("quadratic penalty lambda/2 sum F (theta - theta*)^2 towards earlier tasks' adapters, diagonal "
               "Fisher from each task's training examples (--ewc-online: one decayed Fisher)")
    Settings = EWCSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.fishers: list[list[torch.Tensor]] = []  # one per penalty (one in online mode)
        self.anchors: list[list[torch.Tensor]] = []
        self.kept: OrderedDict = OrderedDict()  # (task, id) -> (its micro-batch's examples, its row)

    # -- the penalty -------------------------------------------------------------------------------------
    def penalty(self, params) -> torch.Tensor:
        """lambda/2 * sum over penalties and entries of F * (theta - anchor)^2."""
        total = sum((f * (p - a) ** 2).sum() for fisher, anchor in zip(self.fishers, self.anchors)
                    for p, f, a in zip(params, fisher, anchor))
        return self.settings.ewc_lambda / 2 * total

    def before_task(self, view) -> None:
        device = view.params[0].device
        self.fishers = [[f.to(device) for f in fisher] for fisher in self.fishers]
        self.anchors = [[a.to(device) for a in anchor] for anchor in self.anchors]
        self.kept = OrderedDict()
        self.keep_limit = math.ceil(self.settings.ewc_fisher_examples / _world_size())

    def extra_loss(self, view, inputs) -> Optional[torch.Tensor]:
        self._keep(inputs)
        if not self.fishers or self.settings.ewc_lambda == 0:
            return None
        term = self.penalty(view.params)
        view.log("ewc_penalty", float(term.detach()))
        return term

    # -- the Fisher ----------------------------------------------------------------------------------------
    def _keep(self, inputs) -> None:
        """Remember this micro-batch's examples (the micro-batch and the example's row), newest
        last, at most ``keep_limit`` distinct ones."""
        batch = tuple(inputs.examples)
        for i, example in enumerate(batch):
            if not bool((inputs.labels[i] != IGNORE_INDEX).any()):  # a masked stand-in row (several processes)
                continue
            key = (example.task, example.id)
            self.kept.pop(key, None)
            self.kept[key] = (batch, i)
            while len(self.kept) > self.keep_limit:
                self.kept.popitem(last=False)

    def estimate_fisher(self, view) -> tuple[list[torch.Tensor], int]:
        """Mean over the kept examples (all processes) of the squared gradient of each example's
        mean answer-token loss, dropout off; and the number of examples."""
        params = view.params
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        n = 0
        for batch, row in self.kept.values():
            loss = view.forward(batch, rows=[row], grad=True).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f.add_(g.detach().float() ** 2)
            n += 1
        if _world_size() > 1:
            flat = torch.cat([f.flatten() for f in fisher] + [torch.tensor([float(n)], device=fisher[0].device)])
            torch.distributed.all_reduce(flat)
            n = int(flat[-1].item())
            offset = 0
            for f in fisher:
                f.copy_(flat[offset:offset + f.numel()].view_as(f))
                offset += f.numel()
        return [f / max(n, 1) for f in fisher], n

    def consolidate(self, fisher: list[torch.Tensor], anchor: list[torch.Tensor]) -> None:
        """Add the finished task's penalty (online: fold it into the single decayed one)."""
        if self.settings.ewc_online and self.fishers:
            gamma = self.settings.ewc_gamma
            self.fishers = [[gamma * old + new for old, new in zip(self.fishers[0], fisher)]]
            self.anchors = [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    def task_end_adapter(self, view):
        with view.timed("fisher"):
            fisher, n = self.estimate_fisher(view)
            self.consolidate(fisher, snapshot(view.params))
        view.emit({"event": "fisher", "step": view.step, "examples": n,
                   "fisher_sum": float(sum(f.sum(dtype=torch.float64) for f in fisher))})
        self.kept = OrderedDict()
        return None  # the trained adapter is carried on

    # -- resume -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.fishers:
            return {}
        return {"fishers": [[f.detach().cpu() for f in fisher] for fisher in self.fishers],
                "anchors": [[a.detach().cpu() for a in anchor] for anchor in self.anchors]}

    def load_state_dict(self, state: dict) -> None:
        self.fishers = [list(fisher) for fisher in state.get("fishers", [])]
        self.anchors = [list(anchor) for anchor in state.get("anchors", [])]
