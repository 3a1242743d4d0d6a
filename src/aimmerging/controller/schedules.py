"""Merge schedules: when to merge and with which weights, and how the interval adapts.

A schedule is a small stateless class; the :class:`~aimmerging.controller.core.MergeController`
owns the state (``controller.state``) and the config, and asks its schedule three questions:

* :meth:`Schedule.on_step`: is a merge due at this inner step? (returns a :class:`Trigger`)
* :meth:`Schedule.on_task_end`: is a merge due after the last step?
* :meth:`Schedule.adapt`: the interval after a merge with this learning signal.

Registered schedules (``SCHEDULES``): ``reference`` (the reference code), ``paper`` (the
reference's forgetting rule and weight table with an interval rule written from the paper's text;
its constants L_w = 3, gamma = 2, band 0.05 are this library's choice, not the paper's), ``fixed``
and ``end`` (the ablations). A new schedule is one class here plus ``SCHEDULES.register``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..registry import Registry

MergeController = Any  # core.MergeController (core imports this module: no import back)

HALVING_INTERVAL = 64  # reference: an interval >= 64 after shrinking is halved; growth uses +0.5 from here
WEIGHT_SPLIT_INTERVAL = 70  # reference weight table: S <= 70 vs S > 70


@dataclass(frozen=True)
class Trigger:
    """A merge is due: why, the forgetting count F (None without signals) and the fusion weights."""

    reason: str  # planned | early | signal | forced | fixed | end
    forgetting_count: Optional[int]
    w_in: float
    w_out: float


def reference_weights(forgetting_count: int, interval: int) -> tuple[float, float]:
    """(w_in, w_out) of the reference table on F and the planned interval S."""
    if forgetting_count > 1:
        return (0.5, 0.5) if interval <= WEIGHT_SPLIT_INTERVAL else (0.4, 0.6)
    return (0.6, 0.4) if interval <= WEIGHT_SPLIT_INTERVAL else (0.5, 0.5)


def floor_capped(x: float, cap: int) -> int:
    """floor(x) for x >= 0, with +inf (or anything above cap) mapped to cap."""
    return cap if not math.isfinite(x) or x >= cap else math.floor(x)


class Schedule:
    name = "base"
    needs_history_loss = True  # the controller must be fed a finite history loss every step
    signal_over_elapsed = False  # learning signal over the elapsed steps whatever signal_normalizer says

    def on_step(self, c: MergeController, step: int, history_loss: Optional[float]) -> Optional[Trigger]:
        return None

    def on_task_end(self, c: MergeController, step: int) -> Optional[Trigger]:
        """The others leave a partly completed interval unmerged, as the reference does."""
        return None

    def adapt(self, c: MergeController, signal: float) -> tuple[int, bool]:
        """(next interval, whether it adapted) after a merge with learning signal ``signal``."""
        return c.state.interval, False


SCHEDULES: Registry[Schedule] = Registry("schedule")


class ForgettingSchedule(Schedule):
    """The reference's forgetting signal: a threshold of ``threshold_factor`` x the mean of the
    first floor(2S/3)+1 history losses after a merge; each later loss >= threshold is a signal.
    Merge at step g iff (g >= planned and F >= 1) or F >= ``early_merge_signals``; with no signal
    by the planned step, the first signal or planned + S (a *forced* signal) triggers it. Weights
    from the reference table on F and S."""

    def on_step(self, c, step, h):
        s = c.state
        m = (2 * s.interval) // 3
        if len(s.window) < m:
            s.window.append(h)
        elif len(s.window) == m:
            s.window.append(h)
            s.threshold = c.config.threshold_factor * (sum(s.window) / len(s.window))
        elif h >= s.threshold:
            s.forgetting_count += 1
        elif step >= s.planned + s.interval:
            s.forgetting_count += 1
            s.forced = True
        F = s.forgetting_count
        if (step >= s.planned and F >= 1) or F >= c.config.early_merge_signals:
            if step < s.planned:
                reason = "early"
            elif s.forced:
                reason = "forced"
            else:
                reason = "planned" if step == s.planned else "signal"
            return Trigger(reason, F, *reference_weights(F, s.interval))
        return None


@SCHEDULES.register("reference")
class ReferenceSchedule(ForgettingSchedule):
    """After ``cold_start`` + 1 merges of the task, from the ratio of this and the previous
    learning signal: shrink by it when learning speeds up (then halve if still >= 64), grow by
    (ratio + 1), or (ratio + 0.5) from S >= 64, when it slows down; clamp to [S_min, S_max]."""

    name = "reference"

    def adapt(self, c, signal):
        s, cfg = c.state, c.config
        if not cfg.adaptive or len(s.signals) <= cfg.cold_start:
            return s.interval, False
        prev = s.signals[-1]
        if signal >= prev:  # learning speeds up: merge more often
            ratio = signal / prev if prev > 0 else (1.0 if signal == 0 else math.inf)
            new = max(cfg.min_interval, floor_capped(s.interval / ratio, cfg.max_interval))
            if new >= HALVING_INTERVAL:
                new //= 2
        else:  # learning slows down: merge less often
            ratio = (prev / signal if signal > 0 else math.inf) + (1.0 if s.interval < HALVING_INTERVAL else 0.5)
            new = min(cfg.max_interval, floor_capped(s.interval * ratio, cfg.max_interval))
        return max(new, cfg.min_interval), True


@SCHEDULES.register("paper")
class PaperSchedule(ForgettingSchedule):
    """Not the paper's schedule, but what its text describes, made concrete: the reference's
    forgetting rule and weight table, with an interval that follows the *trend* of the learning
    signal over the last ``trend_window`` merges (least-squares slope relative to the mean): above
    ``balance_band`` -> S / gamma_minus, below -balance_band -> S * gamma_plus, else unchanged.
    The paper gives no values: L_w = 3, gamma = 2 and band = 0.05 are this library's choice."""

    name = "paper"

    def adapt(self, c, signal):
        s, cfg = c.state, c.config
        window = (s.signals + [signal])[-cfg.trend_window:]
        if not cfg.adaptive or len(window) < cfg.trend_window:
            return s.interval, False
        n = len(window)
        mean_x, mean_y = (n - 1) / 2, sum(window) / n
        slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(window)) / sum((i - mean_x) ** 2 for i in range(n))
        trend = slope / mean_y if mean_y > 0 else 0.0
        if trend > cfg.balance_band:
            return max(cfg.min_interval, floor_capped(s.interval / cfg.gamma_minus, cfg.max_interval)), True
        if trend < -cfg.balance_band:
            return min(cfg.max_interval, floor_capped(s.interval * cfg.gamma_plus, cfg.max_interval)), True
        return s.interval, True


@SCHEDULES.register("fixed")
class FixedSchedule(Schedule):
    """Ablation: merge every S0 steps with the fixed weights; no signals (no history loss needed)."""

    name = "fixed"
    needs_history_loss = False

    def on_step(self, c, step, h):
        if step - c.state.last_merge_step >= c.state.interval:
            return Trigger("fixed", None, c.config.fixed_w_in, c.config.fixed_w_out)
        return None


@SCHEDULES.register("end")
class EndSchedule(Schedule):
    """Ablation: no merges during the task; one replay phase (``end_outer_steps``, default
    floor(steps / S0) x O0) and one fusion with the fixed weights at its end."""

    name = "end"
    needs_history_loss = False
    signal_over_elapsed = True

    def on_task_end(self, c, step):
        if step <= 0:
            return None
        cfg = c.config
        outer = cfg.end_outer_steps if cfg.end_outer_steps is not None else (step // cfg.initial_interval) * cfg.initial_outer_steps
        c.state.outer_steps = outer
        return Trigger("end", None, cfg.fixed_w_in, cfg.fixed_w_out)
