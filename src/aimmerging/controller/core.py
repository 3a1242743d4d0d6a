"""Merge controller (ALGORITHM.md §3.3-3.7; paper variant from PAPER_VS_CODE.md rows 2-4).

Vocabulary (paper symbol in brackets):

* interval ``S`` [S_b]: steps planned between merges; ``outer_steps`` ``O``: replay steps per merge.
* history loss ``h`` (forgetting signal): loss of the adapter on a random memory batch, per step.
* threshold [delta]: ``threshold_factor`` x the mean of the first ``floor(2S/3) + 1`` history losses
  after the last merge; a later ``h >= threshold`` is one forgetting *signal*, counted in ``F``.
* learning signal [Lambda]: sum |Delta_in| / S, Delta_in = adapter change since the last merge.

When to merge and how the interval adapts is the job of the *schedule* (``schedules.py``:
``reference``, ``paper``, ``fixed``, ``end``); this module keeps the state, computes the learning
signal and turns a schedule's trigger into a :class:`MergeDecision`. Plain numbers in and out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional

from ..settings import option
from .schedules import SCHEDULES, Schedule, Trigger

NORMALIZERS = ("planned", "elapsed")


@dataclass
class ControllerConfig:
    """Settings of the merge controller, declared once: they are the ``aimmerging`` method's
    flags and YAML keys, the ``controller replay`` flags and the ``task_start`` trace record.
    Defaults are the reference code's (all three benchmarks)."""

    schedule: str = option("reference", "interval schedule: the reference code's; 'paper': the reference's forgetting rule and weights with a trend rule from the paper's text whose constants (L_w, gamma, band) are our choice; or an ablation's", SCHEDULES.choices())
    initial_interval: int = option(8, "S0: first planned merge interval of every task (merge-fixed: the interval)")
    initial_outer_steps: int = option(8, "O0: replay steps per merge until the interval adapts")
    min_interval: int = option(2, "S_min")
    max_interval: int = option(128, "S_max")
    cold_start: int = option(3, "merges per task that only record the learning signal")
    threshold_factor: float = option(2.0, "forgetting threshold = factor x mean of the window's history losses")
    early_merge_signals: int = option(3, "merge before the planned step once this many forgetting signals fired")
    adaptive: bool = option(True, "adapt the merge interval from the learning signal")
    signal_normalizer: str = option("planned", "learning signal = sum|delta_in| / planned S (reference) or elapsed steps", NORMALIZERS)
    trend_window: int = option(3, "paper schedule: L_w, merges in the trend window (our choice)")
    gamma_minus: float = option(2.0, "paper schedule: shrink factor on an upward trend (our choice)")
    gamma_plus: float = option(2.0, "paper schedule: growth factor on a downward trend (our choice)")
    balance_band: float = option(0.05, "paper schedule: relative slope within +-band counts as balanced (our choice)")
    fixed_w_in: float = option(0.5, "merge-fixed/merge-end: weight of the new-task update")
    fixed_w_out: float = option(0.5, "merge-fixed/merge-end: weight of the replay update")
    end_outer_steps: Optional[int] = option(None, "merge-end: replay steps at the task end (default floor(steps/S0) x O0)")

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: '{self.schedule}' is not one of {', '.join(SCHEDULES)}")
        if self.signal_normalizer not in NORMALIZERS:
            raise ValueError(f"signal_normalizer: '{self.signal_normalizer}' is not one of {', '.join(NORMALIZERS)}")
        if not 1 <= self.min_interval <= self.max_interval:
            raise ValueError("need 1 <= min_interval <= max_interval")
        if not self.min_interval <= self.initial_interval <= self.max_interval:
            raise ValueError("initial_interval must lie within [min_interval, max_interval]")
        if self.initial_outer_steps < 0 or self.cold_start < 0 or self.trend_window < 2:
            raise ValueError("initial_outer_steps and cold_start must be >= 0, trend_window >= 2")
        if not (self.threshold_factor > 0 and self.gamma_minus >= 1 and self.gamma_plus >= 1 and self.balance_band >= 0):
            raise ValueError("need threshold_factor > 0, gamma_minus >= 1, gamma_plus >= 1, balance_band >= 0")
        if self.early_merge_signals < 1:
            raise ValueError("early_merge_signals must be >= 1")
        if not all(math.isfinite(x) for x in (self.threshold_factor, self.gamma_minus, self.gamma_plus,
                                               self.balance_band, self.fixed_w_in, self.fixed_w_out)):
            raise ValueError("threshold_factor, gamma_minus, gamma_plus, balance_band, fixed_w_in and fixed_w_out must be finite")
        if self.end_outer_steps is not None and self.end_outer_steps < 0:
            raise ValueError("end_outer_steps must be >= 0")

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


@dataclass
class ControllerState:
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
        self.schedule: Schedule = SCHEDULES.get(c.schedule)()
        self.state = ControllerState(interval=c.initial_interval, outer_steps=c.initial_outer_steps,
                                     planned=c.initial_interval)

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
        return self.schedule.needs_history_loss

    # -- the per-step entry point --------------------------------------------------------------
    def observe(self, step: int, history_loss: Optional[float], delta_in_l1: float) -> Optional[MergeDecision]:
        """Feed the record of inner step ``step``; returns a decision when a merge is due now."""
        if self.needs_history_loss and (history_loss is None or not math.isfinite(history_loss)):
            raise ValueError(f"step {step}: the {self.config.schedule} schedule needs a finite history loss")
        trigger = self.schedule.on_step(self, step, history_loss)
        return self._merge(step, delta_in_l1, trigger) if trigger else None

    def end_of_task(self, step: int, delta_in_l1: float) -> Optional[MergeDecision]:
        """Called once after the last step (only the ``end`` schedule merges here)."""
        trigger = self.schedule.on_task_end(self, step)
        return self._merge(step, delta_in_l1, trigger) if trigger else None

    # -- internals -------------------------------------------------------------------------------
    def _merge(self, step: int, delta_in_l1: float, t: Trigger) -> MergeDecision:
        s, c = self.state, self.config
        elapsed = step - s.last_merge_step
        by_elapsed = self.schedule.signal_over_elapsed or c.signal_normalizer == "elapsed"
        signal = delta_in_l1 / (elapsed if by_elapsed else s.interval)
        new_interval, adapted = self.schedule.adapt(self, signal)
        new_outer = math.floor(new_interval * c.initial_outer_steps / c.initial_interval) if adapted else s.outer_steps
        decision = MergeDecision(step=step, reason=t.reason, forgetting_count=t.forgetting_count, w_in=t.w_in,
                                 w_out=t.w_out, outer_steps=s.outer_steps, learning_signal=signal,
                                 interval=s.interval, elapsed=elapsed, threshold=s.threshold,
                                 next_interval=new_interval, next_outer_steps=new_outer)
        s.signals.append(signal)
        s.interval, s.outer_steps = new_interval, new_outer
        s.planned = step + new_interval
        s.last_merge_step = step
        s.window, s.threshold, s.forgetting_count, s.forced = [], None, 0, False
        return decision

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "state": asdict(self.state)}

    def load_state_dict(self, d: dict) -> None:
        self.config = ControllerConfig.from_dict(d["config"])
        self.schedule = SCHEDULES.get(self.config.schedule)()
        self.state = ControllerState(**d["state"])


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
