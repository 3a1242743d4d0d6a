"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), as used for language
models: from the second task on, the adapter the previous task ended with is a frozen *teacher*,
and every training micro-batch adds

    lwf_alpha * KL( softmax(z_teacher / T) || softmax(z_student / T) )

averaged over the answer positions of the micro-batch (the positions whose label is not -100;
the full vocabulary at each). z are the logits of the current task's inputs, teacher-forced on
the gold answer as the student is, so the teacher sees exactly the student's forward.

Defaults: ``lwf_alpha`` 1.0 and ``lwf_temperature`` 2.0, the paper's lambda_o = 1 and T = 2.

Choices where the paper is silent (it distils a CNN's old-task heads):

* the teacher is the whole previous adapter (the LoRA tensors at ``before_task``), not old heads:
  a language model has one head, so LwF distils its next-token distributions at the answer
  positions; prompt positions carry no loss in this harness and are not distilled either;
* no T^2 factor (Hinton et al. scale the soft loss by T^2; Li & Hoiem do not): ``lwf_alpha``
  is the weight of the KL as written above;
* the teacher runs with dropout off (eval mode), as the paper records the old network's
  responses once before training; the student trains with the run's LoRA dropout. The teacher
  pass draws no random numbers, so it does not shift the student's dropout masks;
* the teacher's logits are computed on the fly for every micro-batch (the paper precomputes
  them once per example: same values, since the teacher is frozen, without storing a
  vocabulary-sized tensor per training token);
* under several processes each process distils its share of the micro-batch (its mean over its
  own answer positions; DDP averages the gradients).

How the teacher pass works: ``view.forward(inputs.examples, adapter=teacher)`` runs the
micro-batch again, collated as the training forward collated it, with the LoRA tensors holding the
teacher's values for the pass (put back bit for bit before the loop runs the student's backward),
dropout off and no gradients. The teacher passes are timed under ``distillation`` (inside the
loop's ``inner`` time), and the term's mean per step goes to the trace (``distillation``).

Nothing has to survive a resume: the teacher is the adapter a stage starts from, which a resumed
run loads from the previous stage's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX
from ..models.lora import snapshot
from ..settings import Bounded, option
from . import register_method
from .base import Method


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the positions where ``mask`` holds of KL(softmax(teacher / T) || softmax(student / T))."""
    log_s = F.log_softmax(student[mask].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


@dataclass
class LwFSettings(Bounded):
    lwf_alpha: float = option(1.0, "lwf: weight of the distillation term (KL from the previous task's adapter)",
                              ge=0)
    lwf_temperature: float = option(2.0, "lwf: softmax temperature T of the distillation", gt=0)


@register_method
class LwF(Method):
    name = "lwf"
    own_forward_passes = True
    paper = "LwF: Learning without Forgetting (Li & Hoiem, TPAMI 2017)"
    summary = ("from task 2 on, distils the previous task's adapter's answer-token distributions on the "
               "current inputs (KL at --lwf-temperature, weight --lwf-alpha)")
    Settings = LwFSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.teacher: Optional[list[torch.Tensor]] = None

    def before_task(self, view) -> None:
        self.teacher = None
        if view.stage.index > 0 and self.settings.lwf_alpha > 0:
            self.teacher = snapshot(view.params)

    def extra_loss(self, view, inputs) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        mask = inputs.labels != IGNORE_INDEX
        if not bool(mask.any()):  # a masked stand-in share (several processes): nothing to distil
            return None
        with view.timed("distillation"):
            teacher = view.forward(inputs.examples, adapter=self.teacher).logits.detach()
        term = self.settings.lwf_alpha * distillation_kl(inputs.logits, teacher, mask, self.settings.lwf_temperature)
        view.log("distillation", float(term.detach()))
        return term
