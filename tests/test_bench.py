"""Smoke test of ``aimmerging bench`` on a tiny model (in-process, seconds)."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from aimmerging.bench import run_bench
from aimmerging.config import build_config
from aimmerging.errors import ConfigError
from aimmerging.runs.runner import run_config as run

from helpers import DATA_DIR

RUN = {"tasks": ["dbpedia", "amazon"], "data_dir": str(DATA_DIR), "model": "tiny-causal", "train_cap": 24,
       "eval_cap": 6, "max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "memory_ratio": 50.0,
       "memory_batch_size": 4, "initial_interval": 2, "initial_outer_steps": 2, "eval_scope": "needed",
       "max_input_tokens": 48, "lr": 5e-3, "warmup_steps": 1, "progress": False}


def _config(tmp_path, **extra):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "run": RUN, "throughput_steps": 1,
                                    "quick": {"max_steps": 2}, **extra}))
    return path


def test_bench_reports_every_method_with_quality_and_cost(tmp_path):
    out = tmp_path / "out"
    report = run_bench(_config(tmp_path), out, progress=False, isolate=False)
    from aimmerging.bench import comparable_methods

    expected = {"single", *comparable_methods()}  # no method list: every registered method the bench compares
    assert {"seq", "replay", "merge-end", "merge-fixed", "aimmerging", "mtl", "ewc", "olora"} <= expected
    assert set(report["methods"]) == expected
    for name, m in report["methods"].items():
        assert len(m["accuracy_matrix"]) == 2
        # single fills only the diagonal (no OP/BWT), mtl only the last row (no BWT/FWT)
        assert (m["metrics"]["op"] is None) == (name == "single"), name
        assert (m["metrics"]["bwt"] is None) == (name in ("single", "mtl")), name
        assert (m["metrics"]["fwt"] is None) == (name == "mtl"), name
        assert m["wall_s"] > 0 and m["timing_s"]["inner"] > 0 and m["timing_s"]["eval"] > 0
        assert m["train_tokens_per_s"] > 0 and 0 < m["train_fraction_of_peak"]
    assert report["methods"]["single"]["metrics"]["fwt"] == 0
    assert report["methods"]["aimmerging"]["merges"] >= 1 and report["methods"]["aimmerging"]["timing_s"]["probe"] > 0
    assert report["methods"]["seq"]["timing_s"]["probe"] == 0
    assert report["ratios"]["aimmerging/seq"] > 0 and report["ratios"]["aimmerging/replay"] > 0
    tp = report["throughput"]
    assert tp["peak_gflops"] > 0 and tp["flops_per_token"] > 0 and len(tp["rows"]) == 8
    assert all(r["gflops"] > 0 for r in tp["rows"])
    # the time breakdown of the runs' step: shares of the wall time, and the matmuls' own rate
    b = tp["breakdown"]
    assert set(b["shares"]) == {"matmul", "attention", "dropout masks", "other"}
    assert all(v >= 0 for v in b["shares"].values()) and 0.999 <= sum(b["shares"].values()) < 1.25
    assert b["shares"]["matmul"] > 0 and b["matmul_gflops"] > 0 and b["peak_gflops"] == tp["peak_gflops"]
    # the LM head on every position costs more FLOPs than on the answer positions only
    assert tp["rows"][1]["gflop_per_step"] > tp["rows"][2]["gflop_per_step"]
    md = (out / "report.md").read_text()
    assert "aimmerging / seq" in md and "| mtl |" in md and "% of peak" in md and "The matmuls alone run at" in md
    assert (out / "report.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["methods"]["seq"]["metrics"] == report["methods"]["seq"]["metrics"]
    # the first stage is trained once (by seq) and shared
    first = json.loads((out / "seq" / "stages" / "00-dbpedia" / "scores.json").read_text())
    for m in ("replay", "aimmerging", "single"):
        assert json.loads((out / m / "stages" / "00-dbpedia" / "scores.json").read_text()) == first
    # a second call resumes: nothing is retrained and the report is the same
    again = run_bench(_config(tmp_path), out, progress=False, isolate=False)
    assert again["methods"]["aimmerging"]["accuracy_matrix"] == report["methods"]["aimmerging"]["accuracy_matrix"]


def test_sharing_the_first_stage_is_exact(tmp_path):
    """Why the bench may share stage 0: every sequential method trains it identically."""
    adapters = []
    for method in ("seq", "aimmerging", "replay"):
        out = tmp_path / method
        run(build_config({**RUN, "tasks": ["dbpedia", "amazon"], "method": method, "output_dir": str(out)}))
        adapters.append(load_file(str(out / "stages" / "00-dbpedia" / "adapter" / "adapter_model.safetensors")))
    for other in adapters[1:]:
        assert adapters[0].keys() == other.keys()
        assert all((adapters[0][k] == other[k]).all() for k in adapters[0])


def test_bench_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        run_bench(_config(tmp_path, methods=["seq", "nope"]), tmp_path / "o", isolate=False)
    with pytest.raises(ConfigError, match="'single' is not compared by the bench"):
        run_bench(_config(tmp_path, methods=["seq", "single"]), tmp_path / "o", isolate=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"run": {**RUN, "lr": "fast"}}))
    with pytest.raises(ConfigError):
        run_bench(bad, tmp_path / "o2", isolate=False)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_flops_are_counted_on_cpu(causal):
    """torch's FlopCounterMode knows only the CUDA attention kernels; on CPU attention would count
    as zero. Forward QK^T and AV: 2 * 2*b*h*s*s*d; backward: 2.5x that (torch's formula); causal: half."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from aimmerging.bench.throughput import _cpu_attention_flops

    b, h, s, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    forward = 2 * (2 * b * h * s * s * d) * (0.5 if causal else 1.0)
    assert counter.get_total_flops() == pytest.approx(forward * 3.5)


def test_timers_are_exclusive_and_a_methods_own_cost_has_its_column():
    import time

    from aimmerging.bench.report import method_summary
    from aimmerging.training.engine import Timers

    t = Timers()
    with t.section("inner"):
        time.sleep(0.02)
        with t.section("distillation"):  # a method's teacher pass inside the inner step
            time.sleep(0.05)
    d = t.as_dict()
    assert d["distillation"] >= 0.05 and 0.02 <= d["inner"] < 0.05  # counted once, in its own category
    results = {"accuracy_matrix": [[0.5]], "timing": {"inner": 10.0, "eval": 2.0, "fisher": 3.0},
               "stages": [{"wall_s": 16.0, "tokens": 100, "steps": 4}], "peak_rss_mb": 1.0}
    s = method_summary(results, [0.5], flops_per_token=1.0, peak_gflops=1.0)
    assert s["method_timing_s"] == {"fisher": 3.0} and s["timing_s"]["other"] == 1.0


# -- the study: several orders, shards of methods, the report with intervals --------------------------------------
# no `progress` in the config: as from the CLI, --no-progress reaches each run as a worker flag, so a
# finished run's config.yaml and the next cell's method config differ in it (stages are still shared)
STUDY_RUN = {**{k: v for k, v in RUN.items() if k not in ("tasks", "progress")}, "benchmark": "standard-cl",
             "train_cap": 12, "eval_cap": 4, "max_steps": 2}


def test_study_runs_orders_in_shards_shares_prefixes_and_reports_intervals(tmp_path):
    from aimmerging.bench.study import run_study
    from aimmerging.cli.main import main

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny study", "run": STUDY_RUN, "methods": ["seq", "aimmerging", "replay"]}))
    out = tmp_path / "study"
    report = run_study(config, out, orders=[1, 2], methods=["seq", "aimmerging"], isolate=False, progress=False)
    assert (out / "single-s42" / "results.json").is_file()  # one FWT reference for both orders
    assert not (out / "o1-s42" / "single").exists()
    assert set(report["methods"]) >= {"seq", "aimmerging"} and report["methods"]["seq"]["op"]["cells"] == 2
    assert set(report["traces"]["o1-s42"]) >= {"seq", "aimmerging"}  # what the controller did and selection kept
    d = report["differences"]["seq"]["op"]
    assert d["ci"][0] <= d["point"] <= d["ci"][1] and d["verdict"] in ("win", "loss", "equivalent", "undecided")
    assert any(m["method"] == "replay" for m in report["missing"])  # listed in the config, not run yet
    # orders 1 and 2 both start dbpedia -> amazon: order 2 copied those stages from order 1 ...
    for stage in ("00-dbpedia", "01-amazon"):
        a = (out / "o1-s42" / "seq" / "stages" / stage / "scores.json").read_text()
        assert (out / "o2-s42" / "seq" / "stages" / stage / "scores.json").read_text() == a
    # ... and that is exact: order 2 trained from scratch gives the same adapter
    fresh = tmp_path / "fresh"
    run(build_config({**STUDY_RUN, "order": 2, "method": "seq", "output_dir": str(fresh)}))
    for stage in ("01-amazon", "02-agnews"):
        shared = load_file(str(out / "o2-s42" / "seq" / "stages" / stage / "adapter" / "adapter_model.safetensors"))
        own = load_file(str(fresh / "stages" / stage / "adapter" / "adapter_model.safetensors"))
        assert all((shared[k] == own[k]).all() for k in own), stage
    # a second shard adds a method; the report is rebuilt from what is finished
    report = run_study(config, out, orders=[1, 2], methods=["replay"], isolate=False, progress=False)
    assert report["methods"]["replay"]["op"]["cells"] == 2 and not report["missing"]
    assert main(["bench", "report", "--output-dir", str(out)]) == 0
    assert {"report.json", "report.md", "report.png"} <= {p.name for p in out.iterdir()}
    # another config in the same directory is refused with one line
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "tiny study", "run": {**STUDY_RUN, "lr": 1e-3}}))
    with pytest.raises(ConfigError, match="different"):
        run_study(other, out, orders=[1], isolate=False, progress=False)


def test_reference_protocol_bench_gives_single_twice_the_batch(tmp_path):
    from aimmerging.bench.runner import _method_config, load_bench_config, shares_first_stage

    config = _config(tmp_path)
    bench = load_bench_config(config, False, {"protocol": "reference"})
    single = _method_config(bench, "single", tmp_path)
    assert (single["batch_size"], single["micro_batch_size"], single["max_steps"]) == (8, 4, 2)
    assert single["validation"] == "train-holdout" and single["select_best_every"] == 40
    assert not shares_first_stage("single", bench["run"]) and shares_first_stage("aimmerging", bench["run"])


@pytest.mark.parametrize("name", ["standard-cl", "standard-cl-study", "long-sequence-small"])
def test_shipped_benchmark_configs_resolve_under_the_reference_protocol(name):
    from pathlib import Path

    from aimmerging.bench.runner import load_bench_config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.yaml"
    for quick in (False, True):
        bench = load_bench_config(path, quick, {})
        cfg = build_config({**bench["run"], "method": "aimmerging"})
        assert cfg.protocol == "reference" and cfg.select_best_every == 40 and cfg.max_new_tokens == 128


def test_study_cli_errors_are_one_line(tmp_path, capsys):
    from aimmerging.cli.main import main

    assert main(["bench", "report", "--output-dir", str(tmp_path)]) == 2
    assert main(["bench", "--orders", "1,x", "--output-dir", str(tmp_path)]) == 2
    assert main(["bench", "--seeds", "1", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("aimmerging: error: ") for line in err)
    assert "no finished run yet" in err[0] and "--orders" in err[1] and "--seeds" in err[2]
