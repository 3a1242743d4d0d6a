"""Merge controller (aimmerging.controller.core) against ALGORITHM.md §3.3-3.7.

Pure logic: records are fed by hand, no torch. Conventions used by the helpers below:

* LOW is the history loss of every step of a threshold window, so the threshold is 2 * LOW.
* "never fires": every step has h = LOW < threshold, so only a forced signal can occur.
* "always fires": every monitored step (threshold already set) has h = HIGH >= threshold.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from aimmerging.controller import (
    SCHEDULES,
    ControllerConfig,
    MergeController,
    MergeDecision,
    reference_weights,
    replay_records,
)

LOW = 1.0
HIGH = 1000.0


def make(S: int = 8, **kw) -> MergeController:
    kw.setdefault("initial_outer_steps", S)
    kw.setdefault("min_interval", 2)
    kw.setdefault("max_interval", max(128, S))
    return MergeController(ControllerConfig(initial_interval=S, **kw))


def run_until_merge(ctrl: MergeController, start: int, *, fire: bool, signal: float = 1.0,
                    delta_l1: float | None = None, limit: int = 1000) -> MergeDecision:
    """Feed steps start+1, start+2, ... until the controller merges; return the decision.

    The L1 change passed at every step is ``delta_l1`` or, if not given, ``signal * planned S``
    so that the learning signal of the merge (planned normaliser) equals ``signal``."""
    step = start
    while step < start + limit:
        step += 1
        h = HIGH if (fire and ctrl.threshold is not None) else LOW
        d = ctrl.observe(step, h, delta_l1 if delta_l1 is not None else signal * ctrl.interval)
        if d is not None:
            return d
    raise AssertionError(f"no merge within {limit} steps after step {start}")


def merge_sequence(ctrl: MergeController, signals: list[float], fire: bool = True) -> list[MergeDecision]:
    """One merge per entry of ``signals``, each with that learning signal."""
    decisions, step = [], 0
    for sig in signals:
        d = run_until_merge(ctrl, step, fire=fire, signal=sig)
        decisions.append(d)
        step = d.step
    return decisions


# ---------------------------------------------------------------------------------------------
# §3.4 worked timings
# ---------------------------------------------------------------------------------------------

# S: (merge step, F) when the probe never fires  /  (merge step, F, reason) when it always fires
NEVER = {2: 4, 3: 6, 4: 8, 8: 16, 12: 24, 13: 26, 16: 32, 64: 128, 128: 256}
ALWAYS = {
    2: (3, 1, "signal"),  # window 2 (steps 1-2), step 3 fires after the planned step 2
    3: (4, 1, "signal"),  # window 3, step 4 fires after the planned step 3
    4: (4, 1, "planned"),  # window 3, step 4 = planned fires
    8: (8, 2, "planned"),  # window 6, steps 7 and 8 fire
    12: (12, 3, "planned"),  # window 9, steps 10, 11, 12 fire; 12 is planned
    13: (12, 3, "early"),  # window 9 (m = floor(26/3) = 8), third signal at 12 < 13
    16: (14, 3, "early"),  # window 11, signals at 12, 13, 14
    64: (46, 3, "early"),  # window 43, signals at 44, 45, 46
    128: (89, 3, "early"),  # window 86, signals at 87, 88, 89
}


@pytest.mark.parametrize("S", sorted(NEVER))
def test_timing_never_fires_forces_merge_after_two_intervals(S):
    ctrl = make(S, adaptive=False)
    d = run_until_merge(ctrl, 0, fire=False)
    assert (d.step, d.forgetting_count, d.reason) == (NEVER[S], 1, "forced")
    assert d.interval == S
    assert d.elapsed == 2 * S
    assert d.threshold == 2.0 * LOW


@pytest.mark.parametrize("S", sorted(ALWAYS))
def test_timing_always_fires(S):
    ctrl = make(S, adaptive=False)
    d = run_until_merge(ctrl, 0, fire=True)
    assert (d.step, d.forgetting_count, d.reason) == ALWAYS[S]
    assert d.interval == S


@pytest.mark.parametrize("S", [2, 3, 4, 8, 12, 13, 16, 64, 128])
def test_threshold_is_set_at_step_m_plus_1(S):
    m = (2 * S) // 3
    ctrl = make(S, adaptive=False)
    for step in range(1, m + 1):
        ctrl.observe(step, float(step), 0.0)
        assert ctrl.threshold is None
    ctrl.observe(m + 1, float(m + 1), 0.0)
    # threshold = 2 x mean(1, 2, ..., m+1) = 2 x (m+2)/2 = m + 2
    assert ctrl.threshold == pytest.approx(m + 2)


def test_signals_before_planned_step_are_remembered():
    # S = 8: window steps 1-6, one signal at step 7 (below 3), none at step 8 -> merge at 8 with F = 1
    ctrl = make(8, adaptive=False)
    losses = [LOW] * 6 + [HIGH, LOW]
    decisions = [ctrl.observe(i + 1, h, 1.0) for i, h in enumerate(losses)]
    assert decisions[:7] == [None] * 7
    d = decisions[7]
    assert (d.step, d.forgetting_count, d.reason) == (8, 1, "planned")


def test_first_signal_after_planned_step_merges_with_reason_signal():
    ctrl = make(8, adaptive=False)
    losses = [LOW] * 6 + [LOW, LOW, LOW, HIGH]  # steps 7-9 quiet, step 10 fires
    decisions = [ctrl.observe(i + 1, h, 1.0) for i, h in enumerate(losses)]
    assert decisions[:9] == [None] * 9
    assert (decisions[9].step, decisions[9].forgetting_count, decisions[9].reason) == (10, 1, "signal")


def test_signal_fires_when_loss_equals_threshold():
    # threshold_factor 1: threshold = mean of the constant losses = LOW, and h >= threshold fires
    ctrl = make(8, adaptive=False, threshold_factor=1.0)
    d = run_until_merge(ctrl, 0, fire=False)
    assert (d.step, d.forgetting_count, d.reason) == (8, 2, "planned")


def test_early_merge_signals_setting():
    # S = 16, window 11 steps, signals at 12 and 13: early merge at 13 with 2 signals
    ctrl = make(16, adaptive=False, early_merge_signals=2)
    d = run_until_merge(ctrl, 0, fire=True)
    assert (d.step, d.forgetting_count, d.reason) == (13, 2, "early")


def test_planned_step_is_relative_to_previous_merge():
    ctrl = make(8, adaptive=False)
    first = run_until_merge(ctrl, 0, fire=False)  # forced at 16
    second = run_until_merge(ctrl, first.step, fire=False)
    assert (first.step, second.step) == (16, 32)
    third = run_until_merge(ctrl, second.step, fire=True)
    assert (third.step, third.elapsed, third.reason) == (40, 8, "planned")


# ---------------------------------------------------------------------------------------------
# §3.5 fusion weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("F, S, expected", [
    (2, 8, (0.5, 0.5)), (3, 70, (0.5, 0.5)),  # F > 1, S <= 70
    (2, 71, (0.4, 0.6)), (3, 128, (0.4, 0.6)),  # F > 1, S > 70
    (1, 2, (0.6, 0.4)), (1, 70, (0.6, 0.4)),  # F <= 1, S <= 70
    (1, 71, (0.5, 0.5)), (1, 128, (0.5, 0.5)),  # F <= 1, S > 70
])
def test_reference_weight_table(F, S, expected):
    assert reference_weights(F, S) == expected


@pytest.mark.parametrize("S, fire", [(8, False), (8, True), (12, True), (64, False), (64, True), (128, False), (128, True)])
def test_decisions_carry_weights_from_the_table(S, fire):
    ctrl = make(S, adaptive=False)
    d = run_until_merge(ctrl, 0, fire=fire)
    assert (d.w_in, d.w_out) == reference_weights(d.forgetting_count, S)


@pytest.mark.parametrize("S, fire, expected", [
    (8, False, (0.6, 0.4)),  # forced, F = 1, S <= 70
    (8, True, (0.5, 0.5)),  # F = 2, S <= 70
    (128, False, (0.5, 0.5)),  # forced, F = 1, S > 70
    (128, True, (0.4, 0.6)),  # early, F = 3, S > 70
])
def test_forced_and_early_weights_concrete_values(S, fire, expected):
    d = run_until_merge(make(S, adaptive=False), 0, fire=fire)
    assert (d.w_in, d.w_out) == expected


# ---------------------------------------------------------------------------------------------
# §3.6 learning signal and adaptive interval
# ---------------------------------------------------------------------------------------------

def test_cold_start_keeps_interval_for_first_four_merges():
    ctrl = make(8)
    decisions = merge_sequence(ctrl, [100.0, 10.0, 1000.0, 1.0])
    assert [d.interval for d in decisions] == [8, 8, 8, 8]
    assert [(d.next_interval, d.next_outer_steps, d.outer_steps) for d in decisions] == [(8, 8, 8)] * 4
    fifth = run_until_merge(ctrl, decisions[-1].step, fire=True, signal=2.0)
    # 2.0 >= 1.0: f = 2 -> S = floor(8 / 2) = 4
    assert (fifth.interval, fifth.next_interval, fifth.next_outer_steps) == (8, 4, 4)


def test_cold_start_zero_adapts_from_second_merge():
    ctrl = make(8, cold_start=0)
    first, second = merge_sequence(ctrl, [100.0, 80.0])
    assert first.next_interval == 8
    assert second.next_interval == 18


def test_interval_examples_from_section_3_6():
    ctrl = make(8)
    decisions = merge_sequence(ctrl, [100.0] * 4 + [80.0, 120.0])
    fifth, sixth = decisions[4], decisions[5]
    # S = 8, prev 100, now 80: f = 100/80 + 1 = 2.25 -> floor(18.0) = 18, O = S
    assert fifth.learning_signal == pytest.approx(80.0)
    assert (fifth.next_interval, fifth.next_outer_steps) == (18, 18)
    # now 120 vs 80: f = 1.5 -> floor(18 / 1.5) = 12
    assert sixth.interval == 18 and sixth.outer_steps == 18
    assert sixth.learning_signal == pytest.approx(120.0)
    assert (sixth.next_interval, sixth.next_outer_steps) == (12, 12)
    assert ctrl.interval == 12 and ctrl.outer_steps == 12


def test_interval_example_growth_from_64():
    ctrl = make(64)
    decisions = merge_sequence(ctrl, [120.0] * 4 + [100.0])
    # S = 64 (>= 64): f = 120/100 + 0.5 = 1.7 -> floor(108.8) = 108
    assert decisions[-1].next_interval == 108
    assert decisions[-1].next_outer_steps == 108


def test_interval_example_shrink_from_128_is_halved():
    ctrl = make(128)
    decisions = merge_sequence(ctrl, [100.0] * 4 + [110.0])
    # S = 128, f = 1.1 -> floor(116.36) = 116 >= 64 -> 58
    assert decisions[-1].next_interval == 58


def test_equal_signal_keeps_small_interval_and_halves_large_one():
    assert merge_sequence(make(8), [5.0] * 5)[-1].next_interval == 8
    assert merge_sequence(make(64), [5.0] * 5)[-1].next_interval == 32  # f = 1, 64 >= 64 -> 32


@pytest.mark.parametrize("O0, expected_outer", [(4, 9), (3, 6), (16, 36)])
def test_outer_steps_follow_ratio_after_adaptation(O0, expected_outer):
    # S: 8 -> 18 as in the §3.6 example; O = floor(18 * O0 / 8)
    ctrl = make(8, initial_outer_steps=O0)
    decisions = merge_sequence(ctrl, [100.0] * 4 + [80.0])
    assert [d.outer_steps for d in decisions] == [O0] * 5
    assert (decisions[-1].next_interval, decisions[-1].next_outer_steps) == (18, expected_outer)


@pytest.mark.parametrize("min_interval, expected", [(2, 2), (4, 4)])
def test_shrink_is_clamped_to_min_interval(min_interval, expected):
    # f = 1000 -> floor(8 / 1000) = 0 -> clamped
    ctrl = make(8, min_interval=min_interval)
    assert merge_sequence(ctrl, [1.0] * 4 + [1000.0])[-1].next_interval == expected


@pytest.mark.parametrize("max_interval, expected", [(128, 128), (50, 50)])
def test_growth_is_clamped_to_max_interval(max_interval, expected):
    # f = 1000/1 + 1 -> floor(8 * 1001) -> clamped
    ctrl = MergeController(ControllerConfig(initial_interval=8, max_interval=max_interval))
    assert merge_sequence(ctrl, [1000.0] * 4 + [1.0])[-1].next_interval == expected


def test_non_adaptive_reference_never_changes_interval():
    ctrl = make(8, adaptive=False)
    decisions = merge_sequence(ctrl, [100.0, 50.0, 10.0, 1.0, 1000.0, 1.0])
    assert {(d.next_interval, d.next_outer_steps) for d in decisions} == {(8, 8)}


def test_learning_signal_uses_planned_interval():
    # forced merge after 16 steps of an S = 8 interval: Lambda = 160 / 8 = 20
    ctrl = make(8, adaptive=False)
    d = run_until_merge(ctrl, 0, fire=False, delta_l1=160.0)
    assert (d.step, d.elapsed, d.interval) == (16, 16, 8)
    assert d.learning_signal == pytest.approx(20.0)


def test_learning_signal_elapsed_normalizer():
    ctrl = make(8, adaptive=False, signal_normalizer="elapsed")
    d = run_until_merge(ctrl, 0, fire=False, delta_l1=160.0)
    assert d.learning_signal == pytest.approx(10.0)  # 160 / 16 elapsed steps
    ctrl = make(16, adaptive=False, signal_normalizer="elapsed")
    d = run_until_merge(ctrl, 0, fire=True, delta_l1=140.0)  # early merge at step 14
    assert (d.step, d.learning_signal) == (14, pytest.approx(10.0))


def test_learning_signal_early_merge_with_planned_normalizer():
    ctrl = make(16, adaptive=False)
    d = run_until_merge(ctrl, 0, fire=True, delta_l1=140.0)  # early merge at step 14
    assert (d.step, d.learning_signal) == (14, pytest.approx(140.0 / 16))


def test_adaptation_uses_elapsed_signals_when_configured():
    # elapsed: forced merges (16 steps) with delta 160 -> 10; then an on-time merge (8 steps)
    # with delta 160 -> 20 >= 10: S = floor(8 / 2) = 4
    ctrl = make(8, signal_normalizer="elapsed")
    step = 0
    for _ in range(4):
        step = run_until_merge(ctrl, step, fire=False, delta_l1=160.0).step
    d = run_until_merge(ctrl, step, fire=True, delta_l1=160.0)
    assert (d.elapsed, d.learning_signal, d.next_interval) == (8, pytest.approx(20.0), 4)


# ---------------------------------------------------------------------------------------------
# paper schedule
# ---------------------------------------------------------------------------------------------

def paper(**kw) -> MergeController:
    return make(8, schedule="paper", **kw)


def test_paper_upward_trend_shrinks_by_gamma_minus():
    d = merge_sequence(paper(), [100.0, 110.0, 120.0])
    # slope 10, mean 110: relative slope 0.091 > 0.05 -> S = floor(8 / 2) = 4
    assert [x.next_interval for x in d] == [8, 8, 4]
    assert d[-1].next_outer_steps == 4


def test_paper_downward_trend_grows_by_gamma_plus():
    d = merge_sequence(paper(), [120.0, 110.0, 100.0])
    assert [x.next_interval for x in d] == [8, 8, 16]
    assert d[-1].next_outer_steps == 16


def test_paper_custom_gammas():
    assert merge_sequence(paper(gamma_minus=4.0), [100.0, 110.0, 120.0])[-1].next_interval == 2
    assert merge_sequence(paper(gamma_plus=3.0), [120.0, 110.0, 100.0])[-1].next_interval == 24


def test_paper_balanced_band_keeps_interval():
    # slope 0.5, mean 100.33: relative slope 0.005 within +-0.05
    d = merge_sequence(paper(initial_outer_steps=4), [100.0, 100.0, 101.0])
    assert (d[-1].next_interval, d[-1].next_outer_steps) == (8, 4)


def test_paper_nothing_changes_before_trend_window_is_full():
    d = merge_sequence(paper(trend_window=4), [100.0, 1000.0, 10.0, 10000.0])
    assert [x.next_interval for x in d[:3]] == [8, 8, 8]
    # window [100, 1000, 10, 10000]: slope > 0 -> shrink
    assert d[3].next_interval == 4


def test_paper_uses_the_last_trend_window_signals_only():
    d = merge_sequence(paper(), [1000.0, 1.0, 100.0, 110.0, 120.0])
    # windows: [1000, 1, 100] down -> 16; [1, 100, 110] up -> 8; [100, 110, 120] up -> 4
    assert [x.next_interval for x in d] == [8, 8, 16, 8, 4]


def test_paper_clamps_to_bounds():
    d = merge_sequence(make(4, schedule="paper", min_interval=3), [1.0, 2.0, 3.0])
    assert d[-1].next_interval == 3  # floor(4 / 2) = 2 -> clamped to 3
    d = merge_sequence(make(8, schedule="paper", max_interval=12), [3.0, 2.0, 1.0])
    assert d[-1].next_interval == 12  # 16 -> clamped to 12


def test_paper_keeps_reference_forgetting_rules():
    ctrl = paper(adaptive=False)
    d = run_until_merge(ctrl, 0, fire=False)
    assert (d.step, d.forgetting_count, d.reason, d.w_in, d.w_out) == (16, 1, "forced", 0.6, 0.4)


# ---------------------------------------------------------------------------------------------
# fixed and end schedules
# ---------------------------------------------------------------------------------------------

def test_fixed_schedule_merges_every_interval_without_history_loss():
    ctrl = MergeController(ControllerConfig(schedule="fixed", initial_interval=8, initial_outer_steps=3,
                                            fixed_w_in=0.7, fixed_w_out=0.3))
    assert not ctrl.needs_history_loss
    decisions = [d for step in range(1, 33) if (d := ctrl.observe(step, None, 8.0 * step)) is not None]
    assert [d.step for d in decisions] == [8, 16, 24, 32]
    for d in decisions:
        assert (d.reason, d.forgetting_count, d.w_in, d.w_out) == ("fixed", None, 0.7, 0.3)
        assert (d.outer_steps, d.interval, d.next_interval, d.next_outer_steps, d.elapsed) == (3, 8, 8, 3, 8)
        assert d.learning_signal == pytest.approx(d.step)  # (8 * step) / 8
    assert ctrl.end_of_task(35, 1.0) is None


def test_fixed_default_weights_are_half_half():
    ctrl = MergeController(ControllerConfig(schedule="fixed", initial_interval=4))
    d = [d for s in range(1, 5) if (d := ctrl.observe(s, None, 0.0))][0]
    assert (d.step, d.w_in, d.w_out) == (4, 0.5, 0.5)


def test_end_schedule_merges_only_at_the_end():
    ctrl = MergeController(ControllerConfig(schedule="end", initial_interval=8, initial_outer_steps=3))
    assert not ctrl.needs_history_loss
    assert all(ctrl.observe(step, None, 1.0) is None for step in range(1, 101))
    d = ctrl.end_of_task(100, 50.0)
    # floor(100 / 8) * 3 = 12 * 3 = 36
    assert (d.step, d.reason, d.forgetting_count, d.outer_steps) == (100, "end", None, 36)
    assert (d.w_in, d.w_out) == (0.5, 0.5)
    assert d.learning_signal == pytest.approx(0.5)  # 50 / 100 steps


def test_end_schedule_explicit_outer_steps():
    ctrl = MergeController(ControllerConfig(schedule="end", end_outer_steps=5, fixed_w_in=0.8, fixed_w_out=0.2))
    d = ctrl.end_of_task(100, 1.0)
    assert (d.outer_steps, d.w_in, d.w_out) == (5, 0.8, 0.2)


def test_end_schedule_without_steps_does_not_merge():
    assert MergeController(ControllerConfig(schedule="end")).end_of_task(0, 0.0) is None


@pytest.mark.parametrize("schedule", ["reference", "paper"])
def test_end_of_task_leaves_partial_interval_unmerged(schedule):
    ctrl = make(8, schedule=schedule)
    for step in range(1, 6):
        assert ctrl.observe(step, LOW, 1.0) is None
    assert ctrl.end_of_task(5, 1.0) is None


# ---------------------------------------------------------------------------------------------
# errors, replay, state
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["reference", "paper"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_non_finite_history_loss_raises(schedule, bad):
    ctrl = make(8, schedule=schedule)
    with pytest.raises(ValueError, match="history loss"):
        ctrl.observe(1, bad, 0.0)


def random_records(n: int, seed: int = 0) -> list[dict]:
    """Per-step records whose history losses spike now and then (so all kinds of merges occur)."""
    rng = random.Random(seed)
    recs = []
    for step in range(1, n + 1):
        h = 1.0 + rng.random() * 0.2
        if rng.random() < 0.15:
            h *= 5
        recs.append({"step": step, "history_loss": h, "delta_in_l1": rng.uniform(1.0, 100.0) * step})
    return recs


def feed(ctrl: MergeController, records: list[dict]) -> list[MergeDecision]:
    return [d for r in records if (d := ctrl.observe(r["step"], r["history_loss"], r["delta_in_l1"])) is not None]


@pytest.mark.parametrize("schedule", ["reference", "paper"])
def test_replay_records_matches_live_controller(schedule):
    config = ControllerConfig(schedule=schedule, initial_interval=8, initial_outer_steps=8)
    records = random_records(600)
    live = feed(MergeController(config), records)
    assert len(live) >= 8
    assert {d.reason for d in live} >= {"planned"}
    assert replay_records(records, config) == live


@pytest.mark.parametrize("schedule", ["reference", "paper"])
def test_replay_records_skips_records_without_history_loss(schedule):
    config = ControllerConfig(schedule=schedule)
    records = random_records(400, seed=3)
    with_gaps = []
    for r in records:
        with_gaps.append(r)
        if r["step"] % 7 == 0:
            with_gaps.append({"step": r["step"], "history_loss": None, "delta_in_l1": 5.0})
            with_gaps.append({"step": r["step"], "delta_in_l1": 5.0})
            with_gaps.append({"step": r["step"], "history_loss": 1.0, "delta_in_l1": None})
    assert replay_records(with_gaps, config) == replay_records(records, config)
    assert replay_records(records, config) == feed(MergeController(config), records)


def test_replay_records_fixed_and_end_need_no_history_loss():
    records = [{"step": s, "history_loss": None, "delta_in_l1": float(s)} for s in range(1, 21)]
    fixed = replay_records(records, ControllerConfig(schedule="fixed", initial_interval=6))
    assert [d.step for d in fixed] == [6, 12, 18]
    end = replay_records(records, ControllerConfig(schedule="end", initial_interval=6, initial_outer_steps=2))
    assert len(end) == 1
    assert (end[0].step, end[0].reason, end[0].outer_steps) == (20, "end", 6)  # floor(20/6) * 2


def test_replay_records_empty():
    assert replay_records([], ControllerConfig()) == []


@pytest.mark.parametrize("schedule", ["reference", "paper"])
@pytest.mark.parametrize("cut", [5, 37, 250])
def test_state_dict_round_trip_continues_identically(schedule, cut):
    config = ControllerConfig(schedule=schedule, initial_interval=8, initial_outer_steps=4)
    records = random_records(500, seed=7)
    reference = feed(MergeController(config), records)

    first = MergeController(config)
    before = feed(first, records[:cut])
    saved = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = MergeController()  # default config: load_state_dict must restore the saved one
    resumed.load_state_dict(saved)
    assert resumed.config == config
    after = feed(resumed, records[cut:])
    assert before + after == reference


def test_schedules_constant():
    assert SCHEDULES.names() == ["reference", "paper", "fixed", "end"]


def test_decision_to_dict_is_json_ready():
    d = run_until_merge(make(8), 0, fire=True)
    data = json.loads(json.dumps(d.to_dict()))
    assert data["step"] == 8 and data["reason"] == "planned" and data["forgetting_count"] == 2


def test_config_dict_round_trip_ignores_unknown_keys():
    c = ControllerConfig(schedule="paper", initial_interval=4, min_interval=2)
    assert ControllerConfig.from_dict({**c.to_dict(), "something_else": 1}) == c


def test_import_controller_does_not_import_torch_or_numpy():
    code = "import sys, aimmerging.controller; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kw", [
    {"schedule": "bogus"},
    {"signal_normalizer": "steps"},
    {"min_interval": 0},
    {"min_interval": 10, "max_interval": 5, "initial_interval": 8},
    {"initial_interval": 1},  # below min_interval 2
    {"initial_interval": 200},  # above max_interval 128
    {"initial_outer_steps": -1},
    {"cold_start": -1},
    {"trend_window": 1},
    {"threshold_factor": 0.0},
    {"threshold_factor": -1.0},
    {"gamma_minus": 0.5},
    {"gamma_plus": 0.9},
    {"balance_band": -0.01},
    {"early_merge_signals": 0},
])
def test_controller_config_rejects_invalid_values(kw):
    with pytest.raises(ValueError):
        ControllerConfig(**kw)


def test_controller_config_defaults_are_reference():
    c = ControllerConfig()
    assert (c.schedule, c.initial_interval, c.initial_outer_steps, c.min_interval, c.max_interval, c.cold_start,
            c.threshold_factor, c.early_merge_signals, c.adaptive, c.signal_normalizer) == \
        ("reference", 8, 8, 2, 128, 3, 2.0, 3, True, "planned")
