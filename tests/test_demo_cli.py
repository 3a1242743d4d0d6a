"""``aimmerging demo --seed S --eval-split dev`` reaches both runs' settings (the README's demo over
seeds is made with it); the defaults stay seed 42 on test, the README's output."""

from __future__ import annotations

import types

import aimmerging.demo as demo
from aimmerging.cli.main import main


def _configs(monkeypatch, tmp_path, argv):
    seen = []

    def fake_run_config(cfg):  # records the config instead of training
        seen.append(cfg)
        return types.SimpleNamespace(results={"stages": [], "metrics": {"op": 0.0, "bwt": 0.0}})

    import aimmerging.reporting.plots as plots
    import aimmerging.runs.runner as runner
    monkeypatch.setattr(runner, "run_config", fake_run_config)
    monkeypatch.setattr(plots, "plot_run", lambda run_dir: [])
    monkeypatch.setattr(demo, "demo_report", lambda results, out: "report")
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--model", "tiny-causal", "--no-progress", *argv]) == 0
    return {cfg.method: cfg for cfg in seen}


def test_demo_passes_seed_and_split_to_both_runs(monkeypatch, tmp_path):
    cfgs = _configs(monkeypatch, tmp_path, ["--seed", "3", "--eval-split", "dev"])
    assert sorted(cfgs) == ["aimmerging", "seq"]
    assert {(c.seed, c.eval_split, c.eval_seed) for c in cfgs.values()} == {(3, "dev", 42)}
    assert cfgs["aimmerging"].settings.initial_outer_steps == 6  # chosen on dev over seeds (README)
    assert cfgs["aimmerging"].settings.initial_interval == 4


def test_demo_defaults_are_the_readme_output(monkeypatch, tmp_path):
    cfgs = _configs(monkeypatch, tmp_path, [])
    assert {(c.seed, c.eval_split) for c in cfgs.values()} == {(42, "test")}
