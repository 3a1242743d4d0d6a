"""FOREVER: FORgEtting curVe-inspired mEmory Replay (Feng et al., ACL 2026, arXiv 2601.03938), on
the LoRA tensors.

Sources. The authors' code (``WoodScene/FOREVER``; arXiv v1 links ``anonymous.4open.science/r/
FOREVER-C7D2``) could not be fetched here, and of the paper's own text only the abstract and the
start of the introduction could be read. The method below follows two independent third-party notes
of the paper's method section (a paper-note site's English and Chinese write-ups, ids 61363099164
and 55100968320 in the code index), which agree with each other and with the abstract; the section
numbers (§3.2.1 scheduler, §3.2.2 time calibration, §3.2.3 regularisation) are the notes' labels of
the paper's ablation rows. Nothing here is checked against the authors' code.

FOREVER is ``vbm``'s Ebbinghaus replay (``methods/vbm.py``) with the clock in *model time* instead
of training steps, and an L2 anchor in the replay loss whose weight follows the update intensity.

1. Model time (§3.2.2, :class:`ModelClock`). After every inner step, Delta_t = ||Theta_t -
   Theta_{t-1}||_2 over the trainable LoRA entries (a skipped step moves nothing: Delta_t = 0);
   model time tau_t = sum of Delta_i since the task started (it restarts at each task). The first S
   steps are the warm-up window: tau_day = tau_S, the update norm the model accumulated in them, is
   one "virtual model day".
2. Schedule (§3.2.1, ``vbm.EbbinghausSchedule``). The Ebbinghaus review days D = 1, 2, 4, 7, 15, 30
   map to model-time thresholds d x tau_day; replay j fires at the first step with tau_t >= D_j x
   tau_day. The first replay therefore comes at step S exactly; later ones come sooner when updates
   grow and later when they shrink (a decaying learning rate, a learnt task).
3. Intensity-aware replay regularisation (§3.2.3). Baseline intensity mu_0 = tau_day / S (the mean
   update norm in the window), then an EMA mu_t = (1 - lambda) mu_{t-1} + lambda Delta_t, the
   instability ratio r_t = mu_t / mu_0, and beta_t = beta_base x clip(1 + gamma (r_t - 1), 0.5, 3.0).
   A replay minimises L_old + beta_t x sum_j ||Theta_j - Theta*_j||^2 over memory batches: the
   memory batch's answer loss plus beta_t times the squared L2 distance (summed over all LoRA
   entries) to Theta*, the adapter at the end of the previous task (here: the adapter this task
   starts from). So beta is the weight of an L2 anchor, not a learning rate: growing updates
   (r > 1) pull harder towards the previous task's adapter during the replay.

Constants. S = 24 (warm-up window), lambda = 0.05 (EMA rate), beta_base = 1e-3 and the clip
[0.5, 3.0] (g_min, g_max) are the paper's reported settings, as both notes give them (the issue's
third-party readings quoted the same four numbers); the day list is §3.2.1's. gamma (the
sensitivity in 1 + gamma (r - 1)) appears in the formula but its value is in neither note: 1 here,
so beta_t = beta_base x clip(r_t, 0.5, 3.0).

Choices where the notes are silent (each one ours): 4 replay updates per replay (Recurrent-KIF's
outer loop), on random memory batches of ``--memory-batch-size`` examples, with a separate AdamW at
``forever_replay_lr`` 1e-3 (the ``outer_lr`` default of the same group's AIMMerging and
Recurrent-KIF code), no weight decay, its moments kept for the task; the replay loss divided by the
accumulation steps as AIMMerging's replay (the anchor with it); beta_t held for the whole replay at
its value after the step that triggered it; after day 30 the days double (60, 120, ...; the notes
end in "..."); one replay when a step passes several days at once; the replay's own updates not
counted in model time (the clock measures the task's training; ``after_replay`` re-bases it); the EMA
starting from mu_0 at the end of the window; a window whose updates were all zero (every step
skipped) extends until tau > 0, with mu_0 = tau_day / (the window's steps). The first task has no
memory and trains plainly. Every step record of a later task gets ``model_time`` (tau),
``model_days`` (tau / tau_day), ``update_norm`` (Delta) and ``intensity`` (r; the last two None
before the window ends); replays are ``{"event": "replay", ...}`` records with ``anchor_weight``
(beta_t). Everything restarts at each task, so nothing needs to survive a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.lora import snapshot
from ..settings import Bounded, option
from . import register_method
from .vbm import VBM


class ModelClock:
    """Model time tau = the summed update norms since the task start. After the first ``window``
    steps (longer while tau is still 0) tau_day = tau and the baseline intensity mu_0 = tau / steps."""

    def __init__(self, window: int):
        self.window = window
        self.steps = 0
        self.time = 0.0
        self.day: Optional[float] = None  # tau_day, once the window is over
        self.baseline: Optional[float] = None  # mu_0, likewise

    def tick(self, delta: float) -> float:
        self.steps += 1
        self.time += delta
        if self.day is None and self.steps >= self.window and self.time > 0:
            self.day, self.baseline = self.time, self.time / self.steps
        return self.time


def intensity_factor(ratio: float, gamma: float = 1.0, low: float = 0.5, high: float = 3.0) -> float:
    """The anchor weight's factor: clip(1 + gamma (ratio - 1), low, high)."""
    return min(max(1.0 + gamma * (ratio - 1.0), low), high)


@dataclass
class ForeverSettings(Bounded):
    forever_window: int = option(24, "forever: warm-up steps whose summed update norm is one model-time day (S)",
                                 maximum=100_000, ge=1)
    forever_lambda: float = option(0.05, "forever: EMA rate of the update intensity (lambda)", gt=0, le=1)
    forever_beta_base: float = option(1e-3, "forever: weight of the replay's L2 anchor at intensity ratio 1 (beta_base)",
                                      ge=0, finite=True)
    forever_gamma: float = option(1.0, "forever: sensitivity of the anchor weight to the intensity ratio (gamma)",
                                  finite=True)
    forever_clip_min: float = option(0.5, "forever: lower clip of the anchor weight's factor (g_min)")
    forever_clip_max: float = option(3.0, "forever: upper clip of the anchor weight's factor (g_max)")
    forever_replay_steps: int = option(4, "forever: replay updates on memory batches at each replay",
                                       maximum=100_000, ge=1)
    forever_replay_lr: float = option(1e-3, "forever: learning rate of the replay optimizer (AdamW, one per task)",
                                      gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.forever_clip_min <= self.forever_clip_max < math.inf:
            raise ValueError("forever_clip_min, forever_clip_max: need 0 <= min <= max, finite")


@register_method
class Forever(VBM):
    name = "forever"
    paper = "FOREVER (ACL 2026, arXiv 2601.03938)"
    summary = ("replay on an Ebbinghaus schedule in model time (summed update norms; a day = the first S steps' "
               "sum), with an L2 anchor to the previous task's adapter weighted by the update intensity "
               "(--forever-window, --forever-beta-base)")
    Settings = ForeverSettings

    def day(self) -> Optional[float]:
        return self.clock.day

    def replay_steps(self) -> int:
        return self.settings.forever_replay_steps

    def replay_lr(self) -> float:
        return self.settings.forever_replay_lr

    def anchor_weight(self) -> float:
        s = self.settings
        factor = intensity_factor(self.ratio, s.forever_gamma, s.forever_clip_min, s.forever_clip_max)
        return s.forever_beta_base * factor

    def before_task(self, view) -> None:
        self.clock, self.mu, self.ratio = ModelClock(self.settings.forever_window), None, 1.0
        super().before_task(view)
        if self.active:
            self.previous = snapshot(view.params)
            self.anchor = snapshot(view.params)  # Theta*: the adapter the previous task ended with

    @torch.no_grad()
    def tick(self, view, record) -> float:
        with view.timed("bookkeeping"):
            delta = math.sqrt(sum(float(((p - q).float() ** 2).sum()) for p, q in zip(view.params, self.previous)))
            self.previous = snapshot(view.params)
        calibrated = self.clock.day is not None
        tau = self.clock.tick(delta)
        if self.clock.day is not None:
            lam = self.settings.forever_lambda
            self.mu = self.clock.baseline if not calibrated else (1 - lam) * self.mu + lam * delta
            self.ratio = self.mu / self.clock.baseline
        record.update(model_time=tau, model_days=tau / self.clock.day if self.clock.day else None,
                      update_norm=delta, intensity=self.ratio if self.clock.day is not None else None)
        return tau

    def after_replay(self, view) -> None:
        self.previous = snapshot(view.params)
