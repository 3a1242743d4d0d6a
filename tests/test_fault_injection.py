"""Fault injection: a non-finite loss, gradient, optimizer update, history loss or fusion at a
chosen (seeded, random) step of a tiny 3-task run never reaches a saved adapter, for every method.
The run still exits 0, the trace (strict JSON) says what was skipped, and the summary counts the
skipped steps. The engine's hook is ``aimmerging.training.engine.FAULTS`` (a ``FaultInjector``);
the probe and the fusion are faulted by patching ``Merging.probe`` / ``aimmerging.fusion.fuse_in_place``."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from aimmerging.cli.main import main
from aimmerging.methods.base import Method
from aimmerging.training import engine as engine_mod
from aimmerging.training.engine import SKIP_GRADIENT, SKIP_LOSS, SKIP_UPDATE, FaultInjector

from helpers import stage_adapters, tiny_args

STEPS = 6  # per task: 18 inner steps in all (mtl: one stage of 18)
METHODS = ["seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end"]
MERGING = ["aimmerging", "merge-fixed", "merge-end"]
REASONS = {"loss": SKIP_LOSS, "gradient": SKIP_GRADIENT, "update": SKIP_UPDATE}


def _strict_records(out) -> list[dict]:
    """trace.jsonl read with a strict JSON parser (NaN, Infinity and -Infinity are errors)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name} in trace.jsonl")

    lines = (out / "trace.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]


def _adapters(out) -> dict[str, dict[str, torch.Tensor]]:
    found = stage_adapters(out)
    assert found
    return found


def _assert_finite_adapters(out) -> None:
    for stage, tensors in _adapters(out).items():
        for name, t in tensors.items():
            assert bool(t.isfinite().all()), f"{stage}: {name} is not finite"


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _run(out, data_dir, method, **extra) -> None:
    assert main(tiny_args(out, data_dir, method=method, steps=STEPS, **extra)) == 0
    assert _results(out)["complete"] is True


@pytest.mark.parametrize("kind", ["loss", "gradient", "update"])
@pytest.mark.parametrize("method", METHODS)
def test_engine_fault_at_a_random_step_is_skipped_and_reported(tmp_path, data_dir, monkeypatch, method, kind):
    call = random.Random(f"{method}-{kind}").randint(1, 3 * STEPS)
    faults = FaultInjector(**{kind: {call}})
    monkeypatch.setattr(engine_mod, "FAULTS", faults)
    out = tmp_path / "run"
    _run(out, data_dir, method)
    assert faults.calls >= 3 * STEPS
    assert [(c, k) for c, k, _ in faults.fired] == [(call, kind)]
    where = faults.fired[0][2]
    _assert_finite_adapters(out)
    records = _strict_records(out)
    steps = [r for r in records if r["event"] == "step"]
    merges = [r for r in records if r["event"] == "merge"]
    stages = _results(out)["stages"]
    summary = (out / "summary.md").read_text()
    if where == "inner":
        skipped = [r for r in steps if "skipped" in r]
        assert len(skipped) == 1 and skipped[0]["skipped"] == REASONS[kind]
        assert (skipped[0]["train_loss"] is None) == (kind == "loss")
        assert sum(s["skipped_steps"] for s in stages) == 1
        assert f"Skipped: 1 of {3 * STEPS} inner steps" in summary
    else:  # a merging method's replay step
        assert method in MERGING and not any("skipped" in r for r in steps)
        assert sum(m["replay_skipped"] for m in merges) == 1
        assert sum(s["skipped_replay_steps"] for s in stages) == 1
        assert "Skipped: 1 replay step " in summary
    assert all(m["fallback"] is None for m in merges)  # the engine's guard left nothing to fall back from


def test_fault_kinds_reach_the_replay_steps_too(tmp_path, data_dir, monkeypatch):
    """Every step after the first task faulted: merge-end's replay steps (3 per merge, at the end
    of tasks 2 and 3) are skipped and counted like the inner steps."""
    faults = FaultInjector(gradient=set(range(1, 100)) - {1, 2, 3, 4, 5, 6})  # not the first task's steps
    monkeypatch.setattr(engine_mod, "FAULTS", faults)
    out = tmp_path / "run"
    _run(out, data_dir, "merge-end")
    inner = {c for c, _, w in faults.fired if w == "inner"}
    replay = {c for c, _, w in faults.fired if w == "replay"}
    assert replay and len(inner) == 2 * STEPS
    records = _strict_records(out)
    merges = [r for r in records if r["event"] == "merge"]
    assert sum(m["replay_skipped"] for m in merges) == len(replay)
    assert all(m["replay_loss"] is None for m in merges)
    _assert_finite_adapters(out)
    summary = (out / "summary.md").read_text()
    assert f"Skipped: {2 * STEPS} of {3 * STEPS} inner steps and {len(replay)} replay steps" in summary


@pytest.mark.parametrize("method", MERGING)
def test_non_finite_fusion_falls_back_to_theta_k(tmp_path, data_dir, monkeypatch, method):
    import aimmerging.fusion as fusion

    target = random.Random(f"fusion-{method}").randint(1, 2)  # every method merges at least twice
    real = fusion.fuse_in_place
    calls = {"n": 0}

    def faulty(params, anchor, theta_k, w_in, w_out, rule="weighted-sum"):
        calls["n"] += 1
        if calls["n"] == target:  # a NaN weight: every fused value is NaN
            before = [p.detach().clone() for p in params]
            written = real(params, anchor, theta_k, w_in, math.nan, rule)
            assert written is False and all(torch.equal(p, b) for p, b in zip(params, before))
            return written
        return real(params, anchor, theta_k, w_in, w_out, rule)

    monkeypatch.setattr(fusion, "fuse_in_place", faulty)
    out = tmp_path / "run"
    _run(out, data_dir, method)
    merges = [r for r in _strict_records(out) if r["event"] == "merge"]
    assert calls["n"] == len(merges) >= 2
    assert [i for i, m in enumerate(merges, 1) if m["fallback"]] == [target]
    assert merges[target - 1]["fallback"].startswith("theta_k")
    _assert_finite_adapters(out)
    assert "Skipped" not in (out / "summary.md").read_text()  # no optimizer step was skipped


def test_non_finite_history_loss_is_recorded_and_not_fed_to_the_controller(tmp_path, data_dir, monkeypatch):
    from aimmerging.methods.aimmerging import Merging

    target = random.Random("probe").randint(1, 2 * STEPS)  # aimmerging probes on tasks 2 and 3
    real = Merging.probe
    calls = {"n": 0}

    def probe(self, view):
        calls["n"] += 1
        return math.inf if calls["n"] == target else real(self, view)

    monkeypatch.setattr(Merging, "probe", probe)
    out = tmp_path / "run"
    _run(out, data_dir, "aimmerging")
    steps = [r for r in _strict_records(out) if r["event"] == "step"]
    flagged = [r for r in steps if "probe_skipped" in r]
    assert calls["n"] == 2 * STEPS and len(flagged) == 1
    assert flagged[0]["probe_skipped"] == "non-finite history loss" and flagged[0]["history_loss"] is None
    assert flagged[0] is [r for r in steps if r["task_index"] > 0][target - 1]
    assert all(r["history_loss"] is not None for r in steps if r["task_index"] > 0 and r is not flagged[0])
    _assert_finite_adapters(out)


def _capture_initial_adapter(monkeypatch) -> dict:
    """Patch the runner's build_engine to keep a copy of the initial adapter, by saved tensor name."""
    from peft import get_peft_model_state_dict

    from aimmerging.runs import runner

    real, initial = runner.build_engine, {}

    def build(*args, **kwargs):
        built = real(*args, **kwargs)
        state = get_peft_model_state_dict(built.engine.peft_model)
        initial.update({k: v.detach().clone() for k, v in state.items()})
        return built

    monkeypatch.setattr(runner, "build_engine", build)
    return initial


@pytest.mark.parametrize("how", ["adam-eps-0", "update-fault-aimmerging"])
def test_a_fault_on_every_step_leaves_the_initial_adapter(tmp_path, data_dir, monkeypatch, how):
    """adam eps 0 (rejected by the config, forced here) makes every lora_A NaN at the first step
    (0/0 in Adam, since lora_B starts at zero), and so at every step after it; an update fault on
    every call does the same to the merging method's inner and replay steps. Every step is skipped:
    every stage's adapter is the initial one and the summary says so."""
    from aimmerging.training import loop

    initial = _capture_initial_adapter(monkeypatch)
    if how == "adam-eps-0":
        method = "seq"
        real = loop.TrainSettings.from_config.__func__
        monkeypatch.setattr(loop.TrainSettings, "from_config",
                            classmethod(lambda cls, cfg: dataclasses.replace(real(cls, cfg), adam_eps=0.0)))
        reason = SKIP_UPDATE
    else:
        method = "aimmerging"
        monkeypatch.setattr(engine_mod, "FAULTS", FaultInjector(update=True))
        reason = SKIP_UPDATE
    out = tmp_path / "run"
    _run(out, data_dir, method, warmup_steps=0)
    assert initial
    for stage, tensors in _adapters(out).items():
        assert sorted(tensors) == sorted(initial)
        for name, t in tensors.items():
            assert torch.equal(t, initial[name]), f"{stage}: {name} moved"
    records = _strict_records(out)
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 3 * STEPS and all(r["skipped"] == reason for r in steps)
    stages = _results(out)["stages"]
    assert [s["skipped_steps"] for s in stages] == [STEPS] * 3
    summary = (out / "summary.md").read_text()
    assert f"Skipped: all {3 * STEPS} inner steps" in summary
    if method == "aimmerging":
        merges = [r for r in records if r["event"] == "merge"]
        assert merges and all(m["replay_skipped"] == m["outer_steps"] for m in merges)
        assert sum(s["skipped_replay_steps"] for s in stages) == sum(m["outer_steps"] for m in merges)


@pytest.mark.parametrize("kind", ["loss", "gradient", "update"])
def test_a_skipped_step_leaves_adapter_and_optimizer_state_unchanged(data_dir, monkeypatch, kind):
    """Engine level: a step skipped for any reason changes neither the adapter nor the optimizer's
    state (moments and step count), and the LR schedule still advances."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    from aimmerging.data.formatting import Formatter
    from aimmerging.data.olora import read_task
    from aimmerging.models.loading import load_base_model
    from aimmerging.models.lora import attach_lora
    from aimmerging.training.engine import Engine

    torch.manual_seed(0)
    base, tok, model_kind = load_base_model("tiny-causal")
    model = attach_lora(base, model_kind)
    engine = Engine(model, Formatter(tok, model_kind, max_input_tokens=64), Accelerator(cpu=True),
                    micro_batch_size=2, max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(engine.params, lr=1e-2)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10)
    batches = [read_task(data_dir, "train", "agnews")[k:k + 2] for k in (0, 2)]
    monkeypatch.setattr(engine_mod, "FAULTS", FaultInjector(**{kind: {2}}))
    assert engine.inner_step(batches, optimizer, scheduler)["skipped"] is None
    params = [p.detach().clone() for p in engine.params]
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in engine.params}
    lr = optimizer.param_groups[0]["lr"]
    stats = engine.inner_step(batches, optimizer, scheduler)
    assert stats["skipped"] == REASONS[kind]
    assert all(torch.equal(p, q) for p, q in zip(engine.params, params))
    for p in engine.params:
        assert set(optimizer.state[p]) == set(state[id(p)])
        assert all(torch.equal(v, state[id(p)][k]) for k, v in optimizer.state[p].items())
        assert p.grad is None
    assert optimizer.param_groups[0]["lr"] < lr  # the scheduler stepped
    assert engine.inner_step(batches, optimizer, scheduler)["skipped"] is None  # and training goes on
    assert not all(torch.equal(p, q) for p, q in zip(engine.params, params))


def test_fuse_in_place_never_writes_a_non_finite_value():
    from aimmerging.fusion import fuse_in_place

    p, a, k = [torch.tensor([3.0, 1.0])], [torch.tensor([1.0, 1.0])], [torch.tensor([2.0, 1.0])]
    assert fuse_in_place(p, a, k, 0.5, math.inf) is False
    assert p[0].tolist() == [3.0, 1.0]
    assert fuse_in_place(p, a, k, 0.5, 0.5) is True
    assert p[0].tolist() == [2.0, 1.0]


def test_fault_injector_is_off_by_default_and_counts_calls():
    assert engine_mod.FAULTS is None
    f = FaultInjector(loss={2}, update=True)
    assert [sorted(f.next_call("inner")) for _ in range(3)] == [["update"], ["loss", "update"], ["update"]]
    assert f.calls == 3 and f.fired[:2] == [(1, "update", "inner"), (2, "loss", "inner")]


class NanAtTheEnd(Method):
    """Trains like seq, then hands back an all-NaN adapter at every task's end (unregistered)."""

    name = "nan-at-the-end"

    def task_end_adapter(self, view):
        return [torch.full_like(p, math.nan) for p in view.params]


def test_a_non_finite_task_end_adapter_is_not_applied():
    """A method's ``task_end_adapter`` values are the last way into the adapter after training:
    non-finite ones are dropped (the trained adapter is kept) and the trace says so."""
    import aimmerging

    rows = [{"input": f"Which code does the table give to {w}?", "output": c}
            for w, c in {"cat": "red", "fir": "green", "oslo": "blue"}.items()]
    result = aimmerging.run({"colours": {"train": rows * 3, "test": rows}}, method=NanAtTheEnd, model="tiny-causal",
                            max_steps=2, batch_size=2, micro_batch_size=2, max_input_tokens=48, eval_batch_size=8,
                            threads=1)
    assert [r["fallback"] for r in result.trace if r["event"] == "task_end_adapter"] == [
        "trained adapter (non-finite task_end_adapter values dropped)"]
    assert all(bool(p.isfinite().all()) for n, p in result.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("case", ["overflow", "gradient", "disagree", "fine"])
def test_guarded_step_by_hand(case):
    """The one guarded step of both hosts on two tensors: each skip reason, and nothing changed."""
    from aimmerging.training.engine import SKIP_GRADIENT, SKIP_OVERFLOW, SKIP_UPDATE, guarded_step

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW(params, lr=1e38 if case == "overflow" else 0.1)
    for p in params:
        p.grad = torch.full_like(p, math.nan if case == "gradient" else 0.5)
    before = [p.detach().clone() for p in params]
    norm = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)
    got = guarded_step(params, opt, norm, (lambda bad: True) if case == "disagree" else bool)
    want = {"overflow": SKIP_OVERFLOW, "gradient": SKIP_GRADIENT, "disagree": SKIP_UPDATE, "fine": None}[case]
    assert got == want and all(p.grad is None for p in params)
    unchanged = all(torch.equal(p, b) for p, b in zip(params, before))
    assert unchanged == (case != "fine")
    assert (opt.state == {} or all(not s for s in opt.state.values())) == (case != "fine")
