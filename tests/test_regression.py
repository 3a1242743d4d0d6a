"""The library redesign (issue 12) must not change what a run computes: every method on both tiny
models gives the accuracy matrix, the trace records and the stage adapters recorded before it,
bit for bit (fixture written by ``python tests/regression.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from regression import FIXTURE, METHODS, MODELS, cpu_capability, run_case

CASES = [(model, method) for model in MODELS for method in METHODS]


@pytest.mark.parametrize("model,method", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_run_matches_recorded_fixture(tmp_path, data_dir, model, method):
    from safetensors.torch import load_file

    stem = FIXTURE / f"{model}--{method}"
    expected = json.loads(stem.with_suffix(".json").read_text())
    if expected["cpu_capability"] != cpu_capability():
        pytest.skip(f"fixture recorded on a {expected['cpu_capability']} CPU kernel set, this one is {cpu_capability()}")
    got = run_case(tmp_path / "run", data_dir, model, method)
    assert got["tasks"] == expected["tasks"]
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got["trace"] == expected["trace"]
    tensors = load_file(str(stem) + ".safetensors")
    assert sorted(got["tensors"]) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(got["tensors"][name], t), name
