"""AIMMerging and its ablations on a tiny model: merges happen, the trace records them, the
controller replay reproduces them, and non-finite values never corrupt the adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from aimmerging.cli.main import main
from aimmerging.io import read_jsonl

from helpers import stage_adapters, tiny_args

STEPS = 16


def _trace(out):
    return read_jsonl(out / "trace.jsonl")


@pytest.fixture(scope="module")
def aim_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("aim") / "run"
    # threshold factor 1.0: the forgetting signal fires on tiny models too, so merges of every kind occur
    assert main(tiny_args(out, data_dir, method="aimmerging", steps=STEPS, threshold_factor=1.0, cold_start=1)) == 0
    return out


def test_aimmerging_merges_several_times_per_task_and_traces_every_step(aim_run):
    trace = _trace(aim_run)
    steps = [r for r in trace if r["event"] == "step"]
    merges = [r for r in trace if r["event"] == "merge"]
    assert len(steps) == 3 * STEPS
    for r in steps:
        assert {"task", "step", "history_loss", "delta_in_l1", "train_loss", "lr"} <= set(r)
    first = [r for r in steps if r["task_index"] == 0]
    assert all(r["history_loss"] is None for r in first)  # no memory yet: plain training, no merges
    for task in ("amazon", "agnews"):
        task_steps = [r for r in steps if r["task"] == task]
        assert all(isinstance(r["history_loss"], float) and r["delta_in_l1"] >= 0 for r in task_steps)
        task_merges = [m for m in merges if m["task"] == task]
        assert len(task_merges) >= 3
        for m in task_merges:
            assert {"forgetting_count", "w_in", "w_out", "outer_steps", "learning_signal", "next_interval",
                    "next_outer_steps", "reason"} <= set(m)
            assert m["w_in"] + m["w_out"] == pytest.approx(1.0)
            assert m["fallback"] is None and m["replay_skipped"] == 0
    results = json.loads((aim_run / "results.json").read_text())
    assert [s["merges"] for s in results["stages"]] == [0] + [len([m for m in merges if m["task"] == t])
                                                           for t in ("amazon", "agnews")]
    timing = results["timing"]
    assert timing["probe"] > 0 and timing["replay"] > 0 and timing["bookkeeping"] > 0


def test_delta_in_l1_restarts_after_each_merge(aim_run):
    trace = [r for r in _trace(aim_run) if r["task"] == "amazon"]
    for i, r in enumerate(trace):
        if r["event"] == "merge":
            after = next(x for x in trace[i + 1:] if x["event"] == "step")
            before = trace[i - 1]
            assert after["delta_in_l1"] < before["delta_in_l1"]  # measured from the new anchor


def test_replaying_the_trace_reproduces_the_recorded_merges(aim_run, capsys):
    capsys.readouterr()
    assert main(["controller", "replay", str(aim_run / "trace.jsonl")]) == 0
    replayed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    recorded = [r for r in _trace(aim_run) if r["event"] == "merge"]
    keys = ["task", "step", "forgetting_count", "w_in", "w_out", "outer_steps", "learning_signal",
            "next_interval", "next_outer_steps", "reason", "interval", "threshold"]
    assert [{k: r[k] for k in keys} for r in replayed] == [{k: r[k] for k in keys} for r in recorded]


def test_replay_with_another_schedule_and_task_filter(aim_run, capsys):
    capsys.readouterr()
    assert main(["controller", "replay", str(aim_run / "trace.jsonl"), "--task", "agnews",
                 "--schedule", "fixed", "--initial-interval", "4"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["step"] for d in out] == [4, 8, 12, 16] and {d["task"] for d in out} == {"agnews"}
    assert main(["controller", "replay", str(aim_run / "trace.jsonl"), "--task", "nope"]) == 2


@pytest.mark.parametrize("method", ["merge-fixed", "merge-end"])
def test_ablations_merge_without_probing(tmp_path, data_dir, method, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method=method, steps=8)) == 0
    trace = _trace(out)
    merges = [r for r in trace if r["event"] == "merge"]
    assert all(r["history_loss"] is None for r in trace if r["event"] == "step")
    if method == "merge-fixed":  # every S0 = 2 steps on tasks 2 and 3
        assert [(m["task"], m["step"]) for m in merges] == [(t, s) for t in ("amazon", "agnews") for s in (2, 4, 6, 8)]
        assert all(m["reason"] == "fixed" and m["outer_steps"] == 1 for m in merges)
    else:  # once at the end, with floor(8 / S0) * O0 = 4 replay steps
        assert [(m["task"], m["step"], m["reason"], m["outer_steps"]) for m in merges] == \
            [("amazon", 8, "end", 4), ("agnews", 8, "end", 4)]
    capsys.readouterr()
    assert main(["controller", "replay", str(out / "trace.jsonl")]) == 0
    replayed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["task"], d["step"]) for d in replayed] == [(m["task"], m["step"]) for m in merges]


def test_merge_end_replay_phase_learns(tmp_path, data_dir):
    """merge-end's replay phase runs at the task end, where the task's linear schedule has reached
    LR 0: on the task's optimizer (``--outer-optimizer inner``) it changes nothing, so merge-end's
    default is the separate replay optimizer, whose phase does move the adapter."""
    from aimmerging.config import build_config

    assert build_config(overrides={"method": "merge-end"}).settings.outer_optimizer == "separate"
    assert build_config(overrides={"method": "aimmerging"}).settings.outer_optimizer == "inner"
    adapters = {}
    for optimizer in ("separate", "inner"):
        out = tmp_path / optimizer
        assert main(tiny_args(out, data_dir, method="merge-end", steps=8, outer_optimizer=optimizer)) == 0
        adapters[optimizer] = stage_adapters(out)["01-amazon"]
    assert any(not torch.equal(adapters["separate"][k], adapters["inner"][k]) for k in adapters["inner"])


def test_non_finite_values_never_corrupt_the_adapter(tmp_path, data_dir, monkeypatch):
    """A NaN probe is recorded and skipped; a NaN adapter falls back to the anchor; NaN replay
    steps are skipped; the run finishes with a finite adapter."""
    from aimmerging.methods.aimmerging import Merging
    from aimmerging.training import engine as engine_mod

    calls = {"probe": 0, "replay": 0}
    real_probe = Merging.probe
    real_replay = engine_mod.Engine.replay_step

    def probe(self, view):
        calls["probe"] += 1
        return math.nan if calls["probe"] in (3, 4) else real_probe(self, view)

    def replay_step(self, examples, optimizer, loss_scale):
        calls["replay"] += 1
        if calls["replay"] == 2:  # poison the adapter through a replay step
            with torch.no_grad():
                self.params[0].fill_(math.nan)
        return real_replay(self, examples, optimizer, loss_scale)

    monkeypatch.setattr(Merging, "probe", probe)
    monkeypatch.setattr(engine_mod.Engine, "replay_step", replay_step)
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method="aimmerging", steps=12, threshold_factor=1.0)) == 0
    trace = _trace(out)
    amazon = [r for r in trace if r["task"] == "amazon" and r["event"] == "step"]
    assert amazon[2]["history_loss"] is None and amazon[3]["history_loss"] is None
    merges = [r for r in trace if r["event"] == "merge"]
    assert any(m["fallback"] for m in merges) or any(m["replay_skipped"] for m in merges)
    for stage in (out / "stages").iterdir():
        weights = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values()), stage.name
