"""FOREVER, VBM and Recurrent-KIF: their mechanisms on plain numbers and tiny tensors against hand
computations (each test says which mistake it catches), and each method end to end through the CLI
on both tiny models, with a resume of the last stage that must end bit for bit where the
uninterrupted run ended."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil

import pytest
import torch

from aimmerging.cli.main import main
from aimmerging.data.memory import ReplayMemory
from aimmerging.data.olora import Example
from aimmerging.fusion.importance import (ImportanceEMA, fuse_masked_in_place, importance_mask, quantile,
                                          top_fraction_masks)
from aimmerging.methods.forever import Forever, ForeverSettings, ModelClock, intensity_multiplier
from aimmerging.methods.rkif import RecurrentKIF, RKIFSettings
from aimmerging.methods.vbm import VBM, ForgettingCurveSchedule, VBMSettings

from helpers import stage_adapters, tiny_args


class StandInView:
    """The training loop's view, reduced to what these methods touch: a LoRA-like parameter, one
    memory example, and ``update`` recorded instead of run (it moves the parameter by ``replay_move``
    so that a clock counting replay updates would show it)."""

    def __init__(self, params, replay_move: float = 100.0):
        self.params, self.step, self.grad_accum, self.memory_batch_size = params, 0, 1, 1
        self.memory = ReplayMemory([Example(task="old", id="0", input="x", output="y")])
        self.optimizer = torch.optim.SGD(params, lr=0.1)
        self.replay_move, self.updates = replay_move, []

    def rng(self, name):
        return random.Random(name)

    def timed(self, category):
        return contextlib.nullcontext()

    def update(self, examples, optimizer, loss_scale):
        self.updates.append((self.step, optimizer.param_groups[0]["lr"]))
        with torch.no_grad():
            for p in self.params:
                p.add_(self.replay_move)
        return 1.0


def _run_steps(method, view, moves):
    """Inner steps that move the first entry of the parameter by ``moves[i]``; the records."""
    method.before_task(view)
    records = []
    for step, move in enumerate(moves, start=1):
        with torch.no_grad():
            view.params[0][0] += move
        view.step = step
        record = {"event": "step", "step": step}
        records.append((record, method.after_step(view, record) or []))
    return records


# -- FOREVER's model-time clock and schedule ------------------------------------------------------------------
def test_model_clock_counts_steps_while_calibrating_then_update_magnitudes_over_the_calibration_mean():
    """Window 3, magnitudes 0, 2, 4 (the first is a learning-rate-0 warm-up step), then 1, 6, 3:
    the unit is mean(2, 4) = 3, so the clock reads 1, 2, 3, 3 + 1/3, 3 + 1/3 + 2, 3 + 1/3 + 3.
    Catches: dividing by the window instead of the steps that moved (unit 2), an off-by-one in the
    window (the unit taken after 2 steps), counting magnitudes instead of steps while calibrating."""
    clock = ModelClock(window=3)
    times = [clock.tick(u) for u in (0.0, 2.0, 4.0, 1.0, 6.0, 3.0)]
    assert clock.unit == 3.0
    assert times == pytest.approx([1, 2, 3, 3 + 1 / 3, 5 + 1 / 3, 6 + 1 / 3], abs=1e-12)
    stuck = ModelClock(window=2)  # nothing moved in the window: calibration goes on until something does
    assert [stuck.tick(u) for u in (0.0, 0.0, 0.0, 5.0, 5.0)] == [1, 2, 3, 4, 5] and stuck.unit == 5.0


def test_forgetting_curve_schedule_replays_when_retention_reaches_one_over_e():
    """Strength 3 on the model times of the clock test: due at 3.0 (retention exactly 1/e), not at
    5.33 (2.33 since), due at 6.33. Catches: '>' for '>=' (no replay at 3.0), measuring from the
    step rather than the clock at the last replay, a retention of exp(-S / elapsed)."""
    schedule = ForgettingCurveSchedule(3.0)
    fired = []
    for clock in (1, 2, 3, 3 + 1 / 3, 5 + 1 / 3, 6 + 1 / 3):
        if schedule.due(clock):
            assert schedule.retention(clock) <= math.exp(-1) + 1e-12
            fired.append(clock)
            schedule.replayed(clock)
    assert fired == pytest.approx([3, 6 + 1 / 3])
    assert schedule.retention(6 + 1 / 3 + 1.5) == pytest.approx(math.exp(-0.5))


def test_forever_replays_in_model_time_with_an_intensity_scaled_learning_rate():
    """S = 2, lambda = 0.25, beta_base = 1e-3, one replay update per replay; the parameter moves by
    0, 2, 4, 1, 20 in steps 1-5 (each replay moves it by 100 more). By hand: unit = 2 (only step 2
    moved in the window); model time 1, 2, 4, 4.5, 14.5 -> replays after steps 2, 3 and 5;
    intensity 1 until calibrated, then 0.75 * 1 + 0.25 * 2 = 1.25 (step 3), 0.75 * 1.25 + 0.25 *
    0.5 = 1.0625 (step 4), 0.75 * 1.0625 + 0.25 * 10 = 3.297 (step 5), clipped to 3: learning rates
    1e-3, 1.25e-3, 3e-3. Catches: the EMA's coefficients swapped (1.75 at step 3), no clip,
    replay updates counted as model time (a 100-unit jump), the schedule in steps (replays at 2, 4)."""
    method = Forever(ForeverSettings(forever_interval=2, forever_lambda=0.25, forever_beta_base=1e-3,
                                     forever_replay_steps=1))
    view = StandInView([torch.nn.Parameter(torch.zeros(2))])
    records = _run_steps(method, view, [0.0, 2.0, 4.0, 1.0, 20.0])
    assert [r["model_time"] for r, _ in records] == pytest.approx([1, 2, 4, 4.5, 14.5])
    assert [r["intensity"] for r, _ in records] == pytest.approx([1, 1, 1.25, 1.0625, 3.296875])
    assert [r["update_norm"] for r, _ in records] == pytest.approx([0, 2, 4, 1, 20])
    assert view.updates == [(2, pytest.approx(1e-3)), (3, pytest.approx(1.25e-3)), (5, pytest.approx(3e-3))]
    replays = [extra[0] for _, extra in records if extra]
    assert [r["step"] for r in replays] == [2, 3, 5] and all(r["event"] == "replay" for r in replays)
    assert intensity_multiplier(0.1) == 0.5 and intensity_multiplier(1.7) == 1.7 and intensity_multiplier(9) == 3.0


def test_vbm_replays_every_s_steps_whatever_the_updates():
    """S = 3 over 8 steps with very uneven updates: replays after steps 3 and 6 (retention 1/e),
    each of 2 updates at the fixed replay LR. Catches: an off-by-one (replays after 4 and 8, or a
    replay at step 0/1), the clock following the update sizes, the LR changing between replays."""
    method = VBM(VBMSettings(vbm_interval=3, vbm_replay_steps=2, vbm_lr=5e-4))
    view = StandInView([torch.nn.Parameter(torch.zeros(2))])
    records = _run_steps(method, view, [0.0, 50.0, 0.1, 0.0, 9.0, 0.2, 1.0, 30.0])
    replays = [extra[0] for _, extra in records if extra]
    assert [r["step"] for r in replays] == [3, 6]
    assert all(r["retention"] == pytest.approx(math.exp(-1)) for r in replays)
    assert view.updates == [(3, 5e-4), (3, 5e-4), (6, 5e-4), (6, 5e-4)]
    assert not ForgettingCurveSchedule(3).due(2.999) and ForgettingCurveSchedule(3).due(3)


def test_replay_methods_do_nothing_without_memory():
    """The first task has no memory: no replay and no per-step fields (it trains as ``seq``)."""
    for method in (Forever(), VBM()):
        view = StandInView([torch.nn.Parameter(torch.zeros(2))])
        view.memory = ReplayMemory([])
        records = _run_steps(method, view, [1.0] * 30)
        assert view.updates == [] and all(not extra and "model_time" not in r for r, extra in records)


# -- Recurrent-KIF's importance, masks and fusion -------------------------------------------------------------
def test_importance_ema_of_abs_weight_times_gradient_by_hand():
    """beta1 = 0.25, beta2 = 0.75; w = (2, -1, 0.5). Gradients (1, 3, -4) then (0, 1, 1), so
    |w * g| = (2, 3, 2) then (0, 1, 0.5). By hand: s = 0.75 |w g| = (1.5, 2.25, 1.5), u = 0.25
    |ipt - s| = (0.125, 0.1875, 0.125); then s = 0.25 s + 0.75 ipt = (0.375, 1.3125, 0.75), u =
    0.75 u + 0.25 |ipt - s| = (0.1875, 0.21875, 0.15625); scores s * u. Catches: w * g without the
    absolute value, an EMA coefficient on the wrong side (beta vs 1 - beta), beta1 and beta2
    swapped, the uncertainty measured against the EMA before its update, a non-finite step folded in."""
    w = torch.tensor([2.0, -1.0, 0.5])
    ema = ImportanceEMA(beta1=0.25, beta2=0.75)
    assert ema.update([w], [torch.tensor([1.0, 3.0, -4.0])])
    assert torch.allclose(ema.sensitivity[0], torch.tensor([1.5, 2.25, 1.5]))
    assert torch.allclose(ema.uncertainty[0], torch.tensor([0.125, 0.1875, 0.125]))
    assert ema.update([w], [torch.tensor([0.0, 1.0, 1.0])])
    assert torch.allclose(ema.sensitivity[0], torch.tensor([0.375, 1.3125, 0.75]))
    assert torch.allclose(ema.uncertainty[0], torch.tensor([0.1875, 0.21875, 0.15625]))
    assert torch.allclose(ema.scores([w])[0], torch.tensor([0.0703125, 0.287109375, 0.1171875]))
    assert not ema.update([w], [torch.tensor([math.inf, 0.0, 0.0])]) and ema.updates == 2
    assert torch.allclose(ema.sensitivity[0], torch.tensor([0.375, 1.3125, 0.75]))


def test_top_fraction_masks_take_the_global_top_20_percent():
    """Ten scores 0.1 .. 1.0 over two tensors, the larger five all in the second: the 0.8 quantile
    is 0.82, so only 0.9 and 1.0 are kept. Catches: top-k of the wrong sign (0.1, 0.2 kept), a
    per-tensor threshold (0.5 of the first tensor kept too), '>=' at ties (all-equal scores keep
    nothing, as the reference's strict '>')."""
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), torch.tensor([[0.6, 0.7], [0.8, 0.9]]), torch.tensor([1.0])]
    masks = top_fraction_masks(scores, keep=0.2)
    assert [m.tolist() for m in masks] == [[0, 0, 0, 0, 0], [[0, 0], [0, 1]], [1]]
    assert all(m.sum() == 0 for m in top_fraction_masks([torch.ones(3), torch.ones(2)], keep=0.2))
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.8, 0.5, 1.0, 0.123):
        assert torch.allclose(quantile(values, q), torch.quantile(values, q))


def test_importance_mask_fusion_weights_by_hand():
    """Task vectors d_in = 1, d_out = 10 on four entries with masks in = (1, 1, 0, 0), out =
    (1, 0, 1, 0): both -> 0.4 * 1 + 0.6 * 10 = 6.4, inner only -> 1, outer only -> 10, neither ->
    0.5 * 1 + 0.5 * 10 = 5.5. Catches: 0.4/0.6 swapped (4.6), the masks swapped, the neither-case
    weights ignored; a non-finite fusion must write nothing."""
    m_in, m_out = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    fused = importance_mask(torch.zeros(4), [torch.ones(4), 10 * torch.ones(4)], [0.5, 0.5], masks=[m_in, m_out])
    assert fused.tolist() == pytest.approx([6.4, 1.0, 10.0, 5.5])
    params = [torch.full((4,), 11.0)]  # theta after the replay: anchor 0, theta_k 1
    assert fuse_masked_in_place(params, [torch.zeros(4)], [torch.ones(4)], [m_in], [m_out])
    assert params[0].tolist() == pytest.approx([6.4, 1.0, 10.0, 5.5])
    bad = [torch.tensor([math.inf, 0.0, 0.0, 0.0])]
    assert not fuse_masked_in_place(bad, [torch.zeros(4)], [torch.ones(4)], [m_in], [m_out])
    assert bad[0][1:].tolist() == [0.0, 0.0, 0.0]


def test_rkif_feeds_inner_and_outer_importance_from_the_optimizer_steps():
    """Q = 2, 3 outer steps, the engine's steps stood in by real SGD steps: the inner EMA sees the
    two task steps, the outer one the three replay steps; after the fusion the inner EMA is emptied
    and the outer one kept (Recurrent-KIF's flags); after the task the hook is gone. Catches: replay
    steps folded into the inner importance, the inner EMA not emptied, a hook left on the optimizer."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0]))
    view = StandInView([p])

    def sgd_step():  # what the engine does for an inner or a replay update
        p.grad = torch.tensor([0.3, 0.1, -0.2, 0.0, 1.0])
        view.optimizer.step()
        view.optimizer.zero_grad()
        view.updates.append(view.step)
        return 1.0

    view.update = lambda examples, optimizer, loss_scale: sgd_step()
    method = RecurrentKIF(RKIFSettings(rkif_inner_steps=2, rkif_outer_steps=3, rkif_keep=0.4))
    method.before_task(view)
    for step in (1, 2):
        sgd_step()
        view.step = step
        extra = method.after_step(view, {})
        if step == 1:
            assert extra is None and method.inner.updates == 1 and method.outer.updates == 0
    assert method.inner.updates == 0 and method.outer.updates == 3
    assert extra[0]["event"] == "fusion" and extra[0]["selected"] == 2 and extra[0]["fallback"] is None
    method.after_task(view)
    sgd_step()
    assert method.inner.updates == 0 and method.outer.updates == 3


# -- end to end through the CLI, and a resume of the last stage -------------------------------------------------
FAST = {"forever": {"forever_interval": 2}, "vbm": {"vbm_interval": 2},
        "rkif": {"rkif_inner_steps": 2, "rkif_outer_steps": 2}}


@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
@pytest.mark.parametrize("method", ["forever", "vbm", "rkif"])
def test_end_to_end_and_resume_of_the_last_stage(tmp_path, data_dir, method, model):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, model=model, method=method, steps=4, **FAST[method])
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    assert results["complete"] is True and len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(matrix[i][j] is not None for i in range(3) for j in range(i + 1))
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    event = "fusion" if method == "rkif" else "replay"
    fired = [r for r in trace if r.get("event") == event]
    assert {r["task_index"] for r in fired} == {1, 2} and all(r["replay_skipped"] == 0 for r in fired)
    want = stage_adapters(out)
    assert all(bool(torch.isfinite(t).all()) for tensors in want.values() for t in tensors.values())

    shutil.rmtree(sorted((out / "stages").glob("02-*"))[0])
    (out / "results.json").unlink()
    assert main(args) == 0  # trains the last stage again from the saved adapter
    got = stage_adapters(out)["02-agnews"]
    assert got.keys() == want["02-agnews"].keys()
    assert all(torch.equal(got[k], want["02-agnews"][k]) for k in got)
    assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == matrix
