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
from aimmerging.methods.forever import Forever, ForeverSettings, ModelClock, intensity_factor
from aimmerging.methods.rkif import RecurrentKIF, RKIFSettings
from aimmerging.methods.vbm import VBM, EbbinghausSchedule, VBMSettings, ebbinghaus_day

from helpers import stage_adapters, tiny_args


class StandInView:
    """The training loop's view, reduced to what these methods touch: a LoRA-like parameter, one
    memory example, and ``update`` recorded instead of run (with the value of its penalty, then a
    move of every entry by ``replay_move``, so that a clock counting replay updates would show it)."""

    def __init__(self, params, replay_move: float = 100.0):
        self.params, self.step, self.grad_accum, self.memory_batch_size = params, 0, 1, 1
        self.memory = ReplayMemory([Example(task="old", id="0", input="x", output="y")])
        self.optimizer = torch.optim.SGD(params, lr=0.1)
        self.replay_move, self.updates = replay_move, []

    def rng(self, name):
        return random.Random(name)

    def timed(self, category):
        return contextlib.nullcontext()

    def update(self, examples, optimizer, loss_scale, penalty=None):
        value = None if penalty is None else float(penalty().detach())
        self.updates.append((self.step, optimizer.param_groups[0]["lr"], value))
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
def test_model_clock_sums_update_norms_and_takes_the_window_sum_as_one_day():
    """Window 3, update norms 0, 2, 4 (the first a learning-rate-0 warm-up step), then 1, 6, 3: model
    time 0, 2, 6, 7, 13, 16; one day = tau after step 3 = 6; baseline intensity mu_0 = 6 / 3 = 2 (the
    zero step counts: the paper's mean is over the S window steps). Catches: a mean over the steps
    that moved (mu_0 = 3), an off-by-one in the window (a day of 2), a day taken as the mean (2)."""
    clock = ModelClock(window=3)
    times = [clock.tick(u) for u in (0.0, 2.0, 4.0, 1.0, 6.0, 3.0)]
    assert times == pytest.approx([0, 2, 6, 7, 13, 16], abs=1e-12)
    assert clock.day == 6.0 and clock.baseline == 2.0
    stuck = ModelClock(window=2)  # nothing moved in the window: it goes on until something does
    assert [stuck.tick(u) for u in (0.0, 0.0, 0.0, 5.0, 5.0)] == [0, 0, 0, 5, 10]
    assert stuck.day == 5.0 and stuck.baseline == 5.0 / 4


def test_ebbinghaus_schedule_replays_after_1_2_4_7_15_30_days_then_doubling():
    """A day of 1 on a clock going 1, 2, ..., 70: replays at 1, 2, 4, 7, 15, 30, 60 (days doubling
    after 30); a clock jumping from 0 to 5 in one step replays once and next at 7. Catches: uniform
    spacing (replays at every day), '>' for '>=' (no replay at 1), a replay per day passed."""
    schedule = EbbinghausSchedule()
    fired = []
    for clock in range(1, 71):
        if schedule.due(float(clock), 1.0):
            fired.append((clock, schedule.replayed(float(clock), 1.0)))
    assert fired == [(1, 1), (2, 2), (4, 4), (7, 7), (15, 15), (30, 30), (60, 60)]
    assert ebbinghaus_day(7) == 120
    burst = EbbinghausSchedule()
    assert burst.due(5.0, 1.0) and burst.replayed(5.0, 1.0) == 4 and not burst.due(6.9, 1.0) and burst.due(7.0, 1.0)
    assert not EbbinghausSchedule().due(1e9, None)  # no day yet (FOREVER's window not over): never due


def test_forever_replays_in_model_days_with_an_intensity_weighted_l2_anchor():
    """S = 2, lambda = 0.25, beta_base = 1e-3, one replay update per replay; the first entry of the
    parameter moves by 0, 2, 4, 1, 20 in steps 1-5 (each replay moves both entries by 100 more). By
    hand: model time 0, 2, 6, 7, 27 (replays not counted); a day = 2, mu_0 = 2 / 2 = 1; thresholds 2,
    4, 8, 14, 30 -> replays after step 2 (day 1), step 3 (day 2), step 5 (days 4 and 7 at once). The
    EMA: 1 (step 2), 0.75 + 0.25 * 4 = 1.75, 0.75 * 1.75 + 0.25 = 1.5625, 0.75 * 1.5625 + 0.25 * 20 =
    6.171875 -> clipped to 3. Anchor weights 1e-3, 1.75e-3, 3e-3 on the squared distance to the
    task's starting adapter (0, 0): 2^2 = 4, 106^2 + 100^2 = 21236, 227^2 + 200^2 = 91529; the
    replay learning rate stays 1e-3. Catches: beta used as a learning rate, the EMA's coefficients
    swapped (3.25 at step 3), mu_0 over the steps that moved (2), no clip, the anchor at the last
    replay or step instead of the task start, replay updates counted as model time."""
    method = Forever(ForeverSettings(forever_window=2, forever_lambda=0.25, forever_beta_base=1e-3,
                                     forever_replay_steps=1))
    view = StandInView([torch.nn.Parameter(torch.zeros(2))])
    records = _run_steps(method, view, [0.0, 2.0, 4.0, 1.0, 20.0])
    assert [r["model_time"] for r, _ in records] == pytest.approx([0, 2, 6, 7, 27])
    assert [r["model_days"] for r, _ in records] == [None, 1, 3, 3.5, 13.5]
    intensity = [r["intensity"] for r, _ in records]
    assert intensity[0] is None and intensity[1:] == pytest.approx([1, 1.75, 1.5625, 6.171875])
    assert [r["update_norm"] for r, _ in records] == pytest.approx([0, 2, 4, 1, 20])
    replays = [extra[0] for _, extra in records if extra]
    assert [(r["step"], r["day"]) for r in replays] == [(2, 1), (3, 2), (5, 7)]
    assert [r["anchor_weight"] for r in replays] == pytest.approx([1e-3, 1.75e-3, 3e-3])
    assert [(step, lr) for step, lr, _ in view.updates] == [(2, 1e-3), (3, 1e-3), (5, 1e-3)]
    assert [value for _, _, value in view.updates] == pytest.approx([4e-3, 1.75e-3 * 21236, 3e-3 * 91529])
    assert intensity_factor(0.1) == 0.5 and intensity_factor(1.7) == 1.7 and intensity_factor(9) == 3.0
    assert intensity_factor(2.0, gamma=0.5) == 1.5


def test_vbm_replays_after_1_2_4_ebbinghaus_days_of_s_steps_whatever_the_updates():
    """S = 3 over 13 steps with very uneven updates: replays after steps 3, 6 and 12 (days 1, 2, 4;
    not 9), each of 2 updates at the fixed replay LR and with no anchor. Catches: uniform spacing (a
    replay at 9), an off-by-one (replays after 4, 7, 13), the clock following the update sizes."""
    method = VBM(VBMSettings(vbm_interval=3, vbm_replay_steps=2, vbm_lr=5e-4))
    view = StandInView([torch.nn.Parameter(torch.zeros(2))])
    records = _run_steps(method, view, [0.0, 50.0, 0.1, 0.0, 9.0, 0.2, 1.0, 30.0, 0.0, 2.0, 0.0, 7.0, 1.0])
    replays = [extra[0] for _, extra in records if extra]
    assert [(r["step"], r["day"], r["anchor_weight"]) for r in replays] == [(3, 1, 0), (6, 2, 0), (12, 4, 0)]
    assert view.updates == [(3, 5e-4, None)] * 2 + [(6, 5e-4, None)] * 2 + [(12, 5e-4, None)] * 2


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
FAST = {"forever": {"forever_window": 2}, "vbm": {"vbm_interval": 2},
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
