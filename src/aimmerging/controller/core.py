"""Merge controller (ALGORITHM.md §3.3-3.7; paper variant from PAPER_VS_CODE.md rows 2-4).

Vocabulary (paper symbol in brackets):

* interval ``S`` [S_b]: steps planned between merges; ``outer_steps`` ``O``: replay steps per merge.
* history loss ``h`` (forgetting signal): loss of the adapter on a random memory batch, per step.
* threshold [delta]: ``threshold_factor`` x the mean of the first ``floor(2S/3) + 1`` history losses
  after the last merge; a later ``h >= threshold`` is one forgetting *signal*, counted in ``F``.
* learning signal [Lambda]: sum |Delta_in| / S, Delta_in = adapter change since the last merge.

Schedules:

``reference`` (default) -- the reference code's rules. Merge at step g iff (g >= planned and F >= 1)
or F >= 3 (early). With no signal by the planned step, training continues until the first signal
or until planned + S, where a *forced* signal is counted. Fusion weights come from a table on F and
S. After a merge the interval adapts from the ratio of this and the previous learning signal
(after ``cold_start`` + 1 merges of the task): shrink by that ratio when learning speeds up (then
halve if still >= 64), grow by (ratio + 1), or (ratio + 0.5) from S >= 64, when it slows down;
clamp to [min_interval, max_interval]; O = floor(S * O0 / S0).

``paper`` -- same forgetting signal and weights; the interval follows the *trend* of the learning
signal over the last ``trend_window`` merges (least-squares slope relative to the mean): above
``balance_band`` -> S / gamma_minus, below -balance_band -> S * gamma_plus, else unchanged.

``fixed`` -- ablation: merge every S0 steps with fixed weights, no signals (no history loss needed).
``end``   -- ablation: no merges during the task; one replay phase and fusion at its end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional

SCHEDULES = ("reference", "paper", "fixed", "end")
NORMALIZERS = ("planned", "elapsed")
HALVING_INTERVAL = 64  # reference: an interval >= 64 after shrinking is halved; growth uses +0.5 from here
WEIGHT_SPLIT_INTERVAL = 70  # reference weight table: S <= 70 vs S > 70


@dataclass
class ControllerConfig:
    """Settings of the merge controller. Defaults are the reference code's (all three benchmarks)."""

    schedule: str = "reference"
    initial_interval: int = 8  # S0: first planned merge step of every task
    initial_outer_steps: int = 8  # O0: replay steps per merge until the interval adapts
    min_interval: int = 2  # S_min
    max_interval: int = 128  # S_max
    cold_start: int = 3  # merges whose learning signal is only recorded: adaptation from merge cold_start + 2
    threshold_factor: float = 2.0  # threshold = factor x mean of the first floor(2S/3)+1 history losses
    early_merge_signals: int = 3  # merge before the planned step once this many signals fired
    adaptive: bool = True  # adapt the interval from the learning signal
    signal_normalizer: str = "planned"  # divide sum|Delta_in| by the planned S (reference) or the elapsed steps
    trend_window: int = 3  # paper: L_w, merges in the trend window
    gamma_minus: float = 2.0  # paper: shrink factor on an upward trend
    gamma_plus: float = 2.0  # paper: growth factor on a downward trend
    balance_band: float = 0.05  # paper: |relative slope| within this band counts as balanced
    fixed_w_in: float = 0.5  # fixed/end schedules: weight of the new-task update
    fixed_w_out: float = 0.5  # fixed/end schedules: weight of the replay update
    end_outer_steps: Optional[int] = None  # end schedule: replay steps (None: floor(steps / S0) * O0)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.signal_normalizer not in NORMALIZERS:
            raise ValueError(f"signal_normalizer must be one of {', '.join(NORMALIZERS)}")
        if not 1 <= self.min_interval <= self.max_interval:
            raise ValueError("need 1 <= min_interval <= max_interval")
        if not self.min_interval <= self.initial_interval <= self.max_interval:
            raise ValueError("initial_interval must lie within [min_interval, max_interval]")
        if self.initial_outer_steps < 0 or self.cold_start < 0 or self.trend_window < 2:
            raise ValueError("initial_outer_steps and cold_start must be >= 0, trend_window >= 2")
        if self.threshold_factor <= 0 or self.gamma_minus < 1 or self.gamma_plus < 1 or self.balance_band < 0:
            raise ValueError("need threshold_factor > 0, gamma_minus >= 1, gamma_plus >= 1, balance_band >= 0")
        if self.early_merge_signals < 1:
            raise ValueError("early_merge_signals must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MergeDecision:
    """What the controller decided at one merge (all plain numbers, JSON-ready)."""

    step: int  # inner step g at which the merge happens
    reason: str  # planned | early | signal (first signal after the planned step) | forced | fixed | end
    forgetting_count: Optional[int]  # F at merge time (None for the fixed/end schedules)
    w_in: float  # fusion weight of Delta_in (new-task update)
    w_out: float  # fusion weight of Delta_out (replay update)
    outer_steps: int  # replay steps to run at this merge
    learning_signal: float  # Lambda = sum|Delta_in| / normaliser
    interval: int  # S in force before this merge (planned interval)
    elapsed: int  # steps since the previous merge (or the task start)
    threshold: Optional[float]  # forgetting threshold of the interval that just ended
    next_interval: int  # S after adaptation
    next_outer_steps: int  # O after adaptation

    def to_dict(self) -> dict:
        return asdict(self)


def reference_weights(forgetting_count: int, interval: int) -> tuple[float, float]:
    """(w_in, w_out) of the reference table on F and the planned interval S."""
    if forgetting_count > 1:
        return (0.5, 0.5) if interval <= WEIGHT_SPLIT_INTERVAL else (0.4, 0.6)
    return (0.6, 0.4) if interval <= WEIGHT_SPLIT_INTERVAL else (0.5, 0.5)


def _floor(x: float, cap: int) -> int:
    """floor(x) for x >= 0, with +inf (or anything above cap) mapped to cap."""
    return cap if not math.isfinite(x) or x >= cap else math.floor(x)


@dataclass
class _State:
    interval: int
    outer_steps: int
    planned: int
    last_merge_step: int = 0
    window: list = field(default_factory=list)  # history losses of the threshold window
    threshold: Optional[float] = None
    forgetting_count: int = 0
    forced: bool = False
    signals: list = field(default_factory=list)  # learning signal of every merge of the task


class MergeController:
    """One task's merge controller. Create a new one at the start of every task."""

    def __init__(self, config: ControllerConfig | None = None):
        self.config = config or ControllerConfig()
        c = self.config
        self.state = _State(interval=c.initial_interval, outer_steps=c.initial_outer_steps, planned=c.initial_interval)

    # -- read-only views ---------------------------------------------------------------------
    @property
    def interval(self) -> int:
        return self.state.interval

    @property
    def outer_steps(self) -> int:
        return self.state.outer_steps

    @property
    def threshold(self) -> Optional[float]:
        return self.state.threshold

    @property
    def needs_history_loss(self) -> bool:
        return self.config.schedule in ("reference", "paper")

    # -- the per-step entry point --------------------------------------------------------------
    def observe(self, step: int, history_loss: Optional[float], delta_in_l1: float) -> Optional[MergeDecision]:
        """Feed the record of inner step ``step``; returns a decision when a merge is due now."""
        s = self.state
        if self.config.schedule == "end":
            return None
        if self.config.schedule == "fixed":
            if step - s.last_merge_step >= s.interval:
                return self._merge(step, delta_in_l1, "fixed", None, self.config.fixed_w_in, self.config.fixed_w_out)
            return None
        if history_loss is None or not math.isfinite(history_loss):
            raise ValueError(f"step {step}: the {self.config.schedule} schedule needs a finite history loss")
        self._update_forgetting(step, history_loss)
        F = s.forgetting_count
        if (step >= s.planned and F >= 1) or F >= self.config.early_merge_signals:
            if step < s.planned:
                reason = "early"
            elif s.forced:
                reason = "forced"
            else:
                reason = "planned" if step == s.planned else "signal"
            w_in, w_out = reference_weights(F, s.interval)
            return self._merge(step, delta_in_l1, reason, F, w_in, w_out)
        return None

    def end_of_task(self, step: int, delta_in_l1: float) -> Optional[MergeDecision]:
        """Called once after the last step. Only the ``end`` schedule merges here; the others leave
        a partly completed interval unmerged, as the reference does."""
        if self.config.schedule != "end" or step <= 0:
            return None
        c = self.config
        outer = c.end_outer_steps if c.end_outer_steps is not None else (step // c.initial_interval) * c.initial_outer_steps
        self.state.outer_steps = outer
        return self._merge(step, delta_in_l1, "end", None, c.fixed_w_in, c.fixed_w_out, normaliser=step)

    # -- internals -------------------------------------------------------------------------------
    def _update_forgetting(self, step: int, h: float) -> None:
        s = self.state
        m = (2 * s.interval) // 3
        if len(s.window) < m:
            s.window.append(h)
        elif len(s.window) == m:
            s.window.append(h)
            s.threshold = self.config.threshold_factor * (sum(s.window) / len(s.window))
        elif h >= s.threshold:
            s.forgetting_count += 1
        elif step >= s.planned + s.interval:
            s.forgetting_count += 1
            s.forced = True

    def _merge(self, step, delta_in_l1, reason, F, w_in, w_out, normaliser=None) -> MergeDecision:
        s, c = self.state, self.config
        elapsed = step - s.last_merge_step
        if normaliser is None:
            normaliser = s.interval if c.signal_normalizer == "planned" else elapsed
        signal = delta_in_l1 / normaliser
        if c.schedule == "reference":
            new_interval, adapted = self._adapt_reference(signal)
        elif c.schedule == "paper":
            new_interval, adapted = self._adapt_paper(signal)
        else:
            new_interval, adapted = s.interval, False
        new_outer = math.floor(new_interval * c.initial_outer_steps / c.initial_interval) if adapted else s.outer_steps
        decision = MergeDecision(step=step, reason=reason, forgetting_count=F, w_in=w_in, w_out=w_out,
                                 outer_steps=s.outer_steps, learning_signal=signal, interval=s.interval,
                                 elapsed=elapsed, threshold=s.threshold, next_interval=new_interval,
                                 next_outer_steps=new_outer)
        s.signals.append(signal)
        s.interval, s.outer_steps = new_interval, new_outer
        s.planned = step + new_interval
        s.last_merge_step = step
        s.window, s.threshold, s.forgetting_count, s.forced = [], None, 0, False
        return decision

    def _adapt_reference(self, signal: float) -> tuple[int, bool]:
        s, c = self.state, self.config
        if not c.adaptive or len(s.signals) <= c.cold_start:
            return s.interval, False
        prev = s.signals[-1]
        if signal >= prev:  # learning speeds up: merge more often
            ratio = signal / prev if prev > 0 else (1.0 if signal == 0 else math.inf)
            new = max(c.min_interval, _floor(s.interval / ratio, c.max_interval))
            if new >= HALVING_INTERVAL:
                new //= 2
        else:  # learning slows down: merge less often
            ratio = (prev / signal if signal > 0 else math.inf) + (1.0 if s.interval < HALVING_INTERVAL else 0.5)
            new = min(c.max_interval, _floor(s.interval * ratio, c.max_interval))
        return max(new, c.min_interval), True

    def _adapt_paper(self, signal: float) -> tuple[int, bool]:
        s, c = self.state, self.config
        window = (s.signals + [signal])[-c.trend_window:]
        if not c.adaptive or len(window) < c.trend_window:
            return s.interval, False
        n = len(window)
        mean_x, mean_y = (n - 1) / 2, sum(window) / n
        slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(window)) / sum((i - mean_x) ** 2 for i in range(n))
        trend = slope / mean_y if mean_y > 0 else 0.0
        if trend > c.balance_band:
            return max(c.min_interval, _floor(s.interval / c.gamma_minus, c.max_interval)), True
        if trend < -c.balance_band:
            return min(c.max_interval, _floor(s.interval * c.gamma_plus, c.max_interval)), True
        return s.interval, True

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "state": asdict(self.state)}

    def load_state_dict(self, d: dict) -> None:
        self.config = ControllerConfig.from_dict(d["config"])
        self.state = _State(**d["state"])


def replay_records(records: Iterable[dict], config: ControllerConfig) -> list[MergeDecision]:
    """Run one task's per-step records (dicts with ``step``, ``history_loss``, ``delta_in_l1``)
    through a fresh controller; records lacking a value the schedule needs are skipped, exactly as
    the training loop skips them."""
    controller = MergeController(config)
    decisions: list[MergeDecision] = []
    last = None
    for rec in records:
        if rec.get("delta_in_l1") is None:
            continue
        if controller.needs_history_loss and rec.get("history_loss") is None:
            continue
        last = rec
        d = controller.observe(int(rec["step"]), rec.get("history_loss"), float(rec["delta_in_l1"]))
        if d is not None:
            decisions.append(d)
    if last is not None:
        d = controller.end_of_task(int(last["step"]), float(last["delta_in_l1"]))
        if d is not None:
            decisions.append(d)
    return decisions
