"""VBM: replay on a step-based forgetting-curve schedule, after "Do Your Best and Get Enough Rest
for Continual Learning" (Kang et al., CVPR 2025, arXiv 2503.18371), as FOREVER (arXiv 2601.03938)
compares against it on language models.

The VBM paper's view-batch model is for image classifiers: it fills a batch with V augmented views
of one sample so that the *recall interval* (the training steps between two visits of the same
sample) grows V-fold, per the Ebbinghaus forgetting curve, plus a self-supervised loss across the
views. Augmented views of a text prompt do not exist in this harness, so, as FOREVER's baseline,
``vbm`` keeps the idea that matters for continual fine-tuning, replay spaced along the forgetting
curve in *training steps*:

* the retention of earlier tasks since the last replay is taken as the Ebbinghaus curve
  R(dt) = exp(-dt / S), dt in inner steps, with strength S = ``vbm_interval`` (24);
* a replay is due when R falls to 1/e, i.e. every S steps (steps S, 2S, ... of a task);
* a replay is ``vbm_replay_steps`` (4) updates on random memory batches of ``--memory-batch-size``
  examples with a separate AdamW (``vbm_lr`` 1e-3, no weight decay, its moments kept for the whole
  task), the loss divided by the accumulation steps as in AIMMerging's replay.

Constants and their sources: S = 24 is the interval FOREVER reports for its scheduler (issue 30,
from third-party readings of the paper), used here in steps so that ``vbm`` is FOREVER with a step
clock; 1e-3 is FOREVER's beta_base, the replay strength before its intensity scaling (and the
``outer_lr`` default of the AIMMerging and Recurrent-KIF code); 4 replay updates is Recurrent-KIF's
outer loop. None of them is from the VBM paper, whose schedule lives in its sampler; the 1/e
threshold, the separate optimizer and its weight decay of 0 are choices made here.

The first task has no memory and trains plainly. Replay records: ``{"event": "replay", "step",
"clock", "retention", "lr", "replay_loss", "replay_skipped"}``. The schedule starts again at every
task, so nothing needs to survive a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..settings import option
from . import register_method
from .base import Method


def retention(elapsed: float, strength: float) -> float:
    """The Ebbinghaus forgetting curve: R = exp(-elapsed / strength)."""
    return math.exp(-elapsed / strength)


class ForgettingCurveSchedule:
    """Replay when the retention since the last replay has fallen to 1/e: ``clock - last >= strength``
    (the clock in steps for VBM, in model time for FOREVER)."""

    def __init__(self, strength: float):
        if not strength > 0:
            raise ValueError(f"strength must be > 0, got {strength}")
        self.strength = strength
        self.last = 0.0  # the clock at the last replay (0: the task start)

    def due(self, clock: float) -> bool:
        return clock - self.last >= self.strength

    def retention(self, clock: float) -> float:
        return retention(clock - self.last, self.strength)

    def replayed(self, clock: float) -> None:
        self.last = clock


@dataclass
class VBMSettings:
    vbm_interval: int = option(24, "vbm: inner steps between two replays (the forgetting curve's strength S)",
                               maximum=100_000)
    vbm_replay_steps: int = option(4, "vbm: replay updates on memory batches at each replay", maximum=100_000)
    vbm_lr: float = option(1e-3, "vbm: learning rate of the replay optimizer (AdamW, one per task)")

    def __post_init__(self) -> None:
        if not self.vbm_interval >= 1:
            raise ValueError("vbm_interval: must be >= 1")
        if not self.vbm_replay_steps >= 1:
            raise ValueError("vbm_replay_steps: must be >= 1")
        if not self.vbm_lr > 0:
            raise ValueError("vbm_lr: must be > 0")


@register_method
class VBM(Method):
    name = "vbm"
    paper = "VBM (Kang et al., CVPR 2025, arXiv 2503.18371), as FOREVER's step-based replay baseline"
    summary = ("replay on a forgetting-curve schedule in training steps: every S steps (--vbm-interval), a few "
               "replay updates on memory batches (--vbm-replay-steps, --vbm-lr)")
    Settings = VBMSettings
    uses_memory = True

    # what FOREVER overrides: the clock, the strength S, the replay steps and the replay's LR
    def strength(self) -> float:
        return float(self.settings.vbm_interval)

    def replay_steps(self) -> int:
        return self.settings.vbm_replay_steps

    def tick(self, view, record) -> float:
        """The clock after this inner step: the step count."""
        return float(view.step)

    def replay_lr(self) -> float:
        return self.settings.vbm_lr

    def before_task(self, view) -> None:
        self.active = bool(view.memory)
        if not self.active:
            return
        self.schedule = ForgettingCurveSchedule(self.strength())
        self.replay_optimizer = torch.optim.AdamW(view.params, lr=self.replay_lr(), weight_decay=0.0)

    def after_step(self, view, record):
        if not self.active:
            return None
        clock = self.tick(view, record)
        if not self.schedule.due(clock):
            return None
        lr, kept = self.replay_lr(), self.schedule.retention(clock)
        for group in self.replay_optimizer.param_groups:
            group["lr"] = lr
        with view.timed("replay"):
            losses = [view.update(view.memory.sample(view.rng("replay"), view.memory_batch_size),
                                  self.replay_optimizer, 1.0 / view.grad_accum) for _ in range(self.replay_steps())]
        self.schedule.replayed(clock)
        self.after_replay(view)
        done = [x for x in losses if x is not None]
        return [{"event": "replay", "step": view.step, "clock": clock, "retention": kept, "lr": lr,
                 "replay_loss": sum(done) / len(done) if done else None, "replay_skipped": len(losses) - len(done)}]

    def after_replay(self, view) -> None:
        """Called after each replay (FOREVER: its clock must not count the replay's updates)."""
