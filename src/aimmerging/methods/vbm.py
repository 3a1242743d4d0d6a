"""VBM: replay on an Ebbinghaus schedule in training steps, after "Do Your Best and Get Enough Rest
for Continual Learning" (Kang et al., CVPR 2025, arXiv 2503.18371), as FOREVER (arXiv 2601.03938,
Table 1: "VBM (step-based Ebbinghaus)") compares against it on language models.

The VBM paper's view-batch model is for image classifiers: it fills a batch with V augmented views
of one sample so that the *recall interval* (the training steps between two visits of the same
sample) grows V-fold, per the Ebbinghaus forgetting curve, plus a self-supervised loss across the
views. Augmented views of a text prompt do not exist in this harness, so ``vbm`` is what FOREVER
sets against its own scheduler: the same Ebbinghaus replay thresholds with *training steps* as the
clock (FOREVER's step-based time-calibration ablation, "STC", reads the same way):

* one "day" is S = ``vbm_interval`` (24) inner steps; replay j is due at the first step whose count
  reaches day_j x S, day_j in 1, 2, 4, 7, 15, 30 (the Ebbinghaus days FOREVER uses, §3.2.1 in the
  paper notes quoted in ``methods/forever.py``), then 60, 120, ... (doubling: a choice made here,
  the notes end in "..."). With S = 24 the replays come after steps 24, 48, 96, 168, 360, 720, ...
  of a task: dense early, sparse late. The count restarts at every task;
* a replay is ``vbm_replay_steps`` (4) updates on random memory batches of ``--memory-batch-size``
  examples with a separate AdamW (``vbm_lr`` 1e-3, no weight decay, its moments kept for the whole
  task), the loss divided by the accumulation steps as in AIMMerging's replay. No L2 anchor (that is
  FOREVER's intensity-aware regularisation, which a step-based baseline does not have).

Constants and their sources: S = 24 and the day list are FOREVER's (S is its warm-up window, which
defines the model-time day; here it is a day in steps); 4 replay updates is Recurrent-KIF's outer
loop and 1e-3 the ``outer_lr`` default of the same group's AIMMerging and Recurrent-KIF code (how
many replay updates and at which learning rate FOREVER's baselines replay is not in the notes). None
of them is from the VBM paper, whose schedule lives in its sampler; the doubling after day 30, the
separate optimizer and its weight decay of 0 are choices made here.

The first task has no memory and trains plainly. Replay records: ``{"event": "replay", "step",
"clock", "day", "lr", "anchor_weight", "replay_loss", "replay_skipped"}`` (``day``: the last
Ebbinghaus day the clock passed; one replay however many days a step passes). The schedule starts
again at every task, so nothing needs to survive a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..settings import Bounded, option
from . import register_method
from .base import Method

# the Ebbinghaus review days FOREVER maps onto its clock (§3.2.1 of the paper, per the notes)
EBBINGHAUS_DAYS = (1, 2, 4, 7, 15, 30)


def ebbinghaus_day(j: int) -> float:
    """The day of the j-th replay (0-based): 1, 2, 4, 7, 15, 30, then doubling: 60, 120, ..."""
    if j < len(EBBINGHAUS_DAYS):
        return float(EBBINGHAUS_DAYS[j])
    return float(EBBINGHAUS_DAYS[-1] * 2 ** (j - len(EBBINGHAUS_DAYS) + 1))


class EbbinghausSchedule:
    """Replay j is due once the clock reaches ``ebbinghaus_day(j)`` days (a day: ``day`` units of the
    clock, steps for VBM, accumulated update norm for FOREVER; None while not yet known)."""

    def __init__(self):
        self.next = 0  # the index of the next replay's day

    def due(self, clock: float, day: Optional[float]) -> bool:
        return day is not None and day > 0 and clock >= ebbinghaus_day(self.next) * day

    def replayed(self, clock: float, day: float) -> float:
        """Moves past every day the clock has reached (one replay for all of them); returns the last."""
        passed = ebbinghaus_day(self.next)
        while clock >= ebbinghaus_day(self.next) * day:
            passed = ebbinghaus_day(self.next)
            self.next += 1
        return passed


@dataclass
class VBMSettings(Bounded):
    vbm_interval: int = option(24, "vbm: inner steps in one day of the Ebbinghaus replay schedule (S)",
                               maximum=100_000, ge=1)
    vbm_replay_steps: int = option(4, "vbm: replay updates on memory batches at each replay", maximum=100_000,
                                   ge=1)
    vbm_lr: float = option(1e-3, "vbm: learning rate of the replay optimizer (AdamW, one per task)", gt=0)


@register_method
class VBM(Method):
    name = "vbm"
    paper = "VBM (Kang et al., CVPR 2025, arXiv 2503.18371), as FOREVER's step-based replay baseline"
    summary = ("replay on an Ebbinghaus schedule in training steps: after 1, 2, 4, 7, 15, 30 days of S steps "
               "(--vbm-interval), a few replay updates on memory batches (--vbm-replay-steps, --vbm-lr)")
    Settings = VBMSettings
    uses_memory = True

    # what FOREVER overrides: the clock and its day, the replay steps, the replay's LR and its anchor
    def tick(self, view, record) -> float:
        """The clock after this inner step: the step count."""
        return float(view.step)

    def day(self) -> Optional[float]:
        """The length of one day on the clock: S steps."""
        return float(self.settings.vbm_interval)

    def replay_steps(self) -> int:
        return self.settings.vbm_replay_steps

    def replay_lr(self) -> float:
        return self.settings.vbm_lr

    def anchor_weight(self) -> float:
        """The weight of the replay's L2 anchor (FOREVER's beta_t); none here."""
        return 0.0

    def before_task(self, view) -> None:
        self.active = bool(view.memory)
        if not self.active:
            return
        self.schedule = EbbinghausSchedule()
        self.anchor = None  # the adapter the task starts from, for FOREVER's anchor
        self.replay_optimizer = torch.optim.AdamW(view.params, lr=self.replay_lr(), weight_decay=0.0)

    def after_step(self, view, record):
        if not self.active:
            return None
        clock = self.tick(view, record)
        day = self.day()
        if not self.schedule.due(clock, day):
            return None
        passed = self.schedule.replayed(clock, day)
        lr, weight = self.replay_lr(), self.anchor_weight()
        penalty = self._anchor_penalty(view, weight) if weight > 0 else None
        for group in self.replay_optimizer.param_groups:
            group["lr"] = lr
        with view.timed("replay"):
            losses = [view.update(view.memory.sample(view.rng("replay"), view.memory_batch_size),
                                  self.replay_optimizer, 1.0 / view.grad_accum, penalty=penalty)
                      for _ in range(self.replay_steps())]
        self.after_replay(view)
        done = [x for x in losses if x is not None]
        return [{"event": "replay", "step": view.step, "clock": clock, "day": passed, "lr": lr,
                 "anchor_weight": weight, "replay_loss": sum(done) / len(done) if done else None,
                 "replay_skipped": len(losses) - len(done)}]

    def _anchor_penalty(self, view, weight: float) -> Callable[[], torch.Tensor]:
        """weight x the squared L2 distance of the LoRA tensors to ``self.anchor`` (summed over entries)."""
        anchor = self.anchor
        return lambda: weight * sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(view.params, anchor))

    def after_replay(self, view) -> None:
        """Called after each replay (FOREVER: its clock must not count the replay's updates)."""
