"""FOREVER: FORgEtting curVe-inspired mEmory Replay (Feng et al., ACL 2026, arXiv 2601.03938), on
the LoRA tensors.

FOREVER is ``vbm``'s forgetting-curve replay (``methods/vbm.py``) with two changes from the
paper's abstract: the curve runs in *model time*, the accumulated magnitude of the optimizer's
updates, instead of training steps ("identical training steps can result in varying degrees of
parameter change"), and the replay's strength follows the *update intensity*.

1. Model time (:class:`ModelClock`). After every inner step, u_t = ||theta_t - theta_{t-1}||_2
   over all LoRA entries (a skipped step moves nothing: u_t = 0). The first S steps of a task
   calibrate the unit: during them the clock counts steps; after them, with u_ref the mean u over
   those of them that moved (u > 0: the first step of a warm-up has learning rate 0), each step
   adds u_t / u_ref. One unit of model time is one "typical early step" of the
   task, so when the learning rate decays or the task is learnt the clock slows down and replays
   thin out; a burst of large updates brings the next replay forward.
2. Schedule: the Ebbinghaus curve R = exp(-dtau / S) in model time; a replay is due when R falls to
   1/e (dtau >= S), so the first replay comes at step S exactly (``vbm.ForgettingCurveSchedule``).
3. Intensity-aware replay: the intensity rho is an EMA, rate lambda, of u_t / u_ref (1 during the
   calibration); each replay runs ``forever_replay_steps`` updates on memory batches with a
   separate AdamW at learning rate beta = beta_base * clip(rho, 0.5, 3.0).

Constants. S = 24, lambda = 0.05, beta_base = 1e-3 and the clip [0.5, 3.0] are the settings the
paper reports (as issue 30 quotes them from third-party readings of its Table/appendix; the
paper's method section could not be read here). *Their roles above are this implementation's
reading*, checked against nothing but the abstract: S as the curve's strength (the replay
interval, in model-time units) and the calibration window, lambda as the intensity's EMA rate,
beta_base as the replay learning rate (it equals the ``outer_lr`` default of the same group's
AIMMerging and Recurrent-KIF code) and the clip on the intensity multiplier. Check them against
the paper before quoting a number as "FOREVER's".

Choices where the paper (as far as read) is silent: the L2 norm of the update; updates of replay
steps not counted in model time (the clock measures the task's training; ``after_replay`` re-bases
it); the 1/e threshold; 4 replay updates per replay (Recurrent-KIF's outer loop); a separate AdamW
without weight decay whose moments live for the task; memory batches of ``--memory-batch-size``
examples with the loss divided by the accumulation steps, as AIMMerging's replay; a calibration
whose updates were all zero (every step skipped) extends until one moves. The first task has no
memory and trains plainly. Every step record of a later task gets ``model_time``, ``update_norm``
and ``intensity``; replays are ``{"event": "replay", ...}`` records (``clock`` is the model time).
Everything restarts at each task, so nothing needs to survive a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.lora import snapshot
from ..settings import option
from . import register_method
from .vbm import VBM


class ModelClock:
    """Model time from update magnitudes: one unit per step during the first ``window`` steps, then
    each step adds its magnitude over the mean magnitude of those of them that moved (> 0)."""

    def __init__(self, window: int):
        self.window = window
        self.steps = 0
        self.time = 0.0
        self.unit: Optional[float] = None  # the mean calibration magnitude, once known
        self._sum, self._moved = 0.0, 0

    def tick(self, magnitude: float) -> float:
        self.steps += 1
        if self.unit is None:
            self.time += 1.0
            if magnitude > 0:
                self._sum, self._moved = self._sum + magnitude, self._moved + 1
            if self.steps >= self.window and self._moved:
                self.unit = self._sum / self._moved
        else:
            self.time += magnitude / self.unit
        return self.time


def intensity_multiplier(rho: float, low: float = 0.5, high: float = 3.0) -> float:
    """The replay strength's factor: the intensity clipped to [low, high]."""
    return min(max(rho, low), high)


@dataclass
class ForeverSettings:
    forever_interval: int = option(24, "forever: calibration steps and replay interval in model time (S)",
                                   maximum=100_000)
    forever_lambda: float = option(0.05, "forever: EMA rate of the update intensity (lambda)")
    forever_beta_base: float = option(1e-3, "forever: replay learning rate at intensity 1 (beta_base)")
    forever_clip_min: float = option(0.5, "forever: lower clip of the intensity multiplier")
    forever_clip_max: float = option(3.0, "forever: upper clip of the intensity multiplier")
    forever_replay_steps: int = option(4, "forever: replay updates on memory batches at each replay", maximum=100_000)

    def __post_init__(self) -> None:
        if not self.forever_interval >= 1:
            raise ValueError("forever_interval: must be >= 1")
        if not 0 < self.forever_lambda <= 1:
            raise ValueError("forever_lambda: must be in (0, 1]")
        if not self.forever_beta_base > 0:
            raise ValueError("forever_beta_base: must be > 0")
        if not 0 < self.forever_clip_min <= self.forever_clip_max:
            raise ValueError("forever_clip_min, forever_clip_max: need 0 < min <= max")
        if not self.forever_replay_steps >= 1:
            raise ValueError("forever_replay_steps: must be >= 1")


@register_method
class Forever(VBM):
    name = "forever"
    paper = "FOREVER (ACL 2026, arXiv 2601.03938)"
    summary = ("replay on a forgetting-curve schedule in model time (accumulated update magnitude), replay "
               "strength scaled by the update intensity (--forever-interval, --forever-beta-base)")
    Settings = ForeverSettings

    def strength(self) -> float:
        return float(self.settings.forever_interval)

    def replay_steps(self) -> int:
        return self.settings.forever_replay_steps

    def replay_lr(self) -> float:
        s = self.settings
        return s.forever_beta_base * intensity_multiplier(self.rho, s.forever_clip_min, s.forever_clip_max)

    def before_task(self, view) -> None:
        self.clock, self.rho = ModelClock(self.settings.forever_interval), 1.0
        super().before_task(view)
        if self.active:
            self.previous = snapshot(view.params)

    @torch.no_grad()
    def tick(self, view, record) -> float:
        with view.timed("bookkeeping"):
            u = math.sqrt(sum(float(((p - q).float() ** 2).sum()) for p, q in zip(view.params, self.previous)))
            self.previous = snapshot(view.params)
        calibrated = self.clock.unit is not None
        now = self.clock.tick(u)
        if calibrated:
            lam = self.settings.forever_lambda
            self.rho = (1 - lam) * self.rho + lam * u / self.clock.unit
        record.update(model_time=now, update_norm=u, intensity=self.rho)
        return now

    def after_replay(self, view) -> None:
        self.previous = snapshot(view.params)
