"""The bf16-base speed lever (issue 28): the base weights held in bf16, the LoRA tensors and their
AdamW state in fp32, under bf16 autocast (the QLoRA-style split), against today's path (an fp32
base under bf16 autocast). On a tiny random model greedy answers say nothing about quality, so
these tests check the mechanics: what is held in which dtype, that a step trains the fp32 LoRA
tensors, that the throughput study times both paths in the same rounds, and that a run on the
bf16 base resumes bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

from aimmerging.bench.throughput import bf16_base_engine, cpu_description, precision_study
from aimmerging.cli.main import main
from aimmerging.config import build_config
from aimmerging.models.lora import snapshot
from aimmerging.runs.runner import Runner, build_engine

from helpers import DATA_DIR, stage_adapters, tiny_args
from test_hostile_runtime import NanAfterTask  # seq that writes a NaN at stage 2 while `broken`

RUN = {"tasks": ["dbpedia", "amazon"], "data_dir": str(DATA_DIR), "model": "tiny-causal", "train_cap": 12,
       "eval_cap": 4, "max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "memory_batch_size": 4,
       "max_input_tokens": 48, "method": "seq", "progress": False, "threads": 1}
BF16_BASE = dict(dtype="bfloat16", mixed_precision="bf16")  # the new path, as run options


def _engines():
    """Today's engine (fp32 base) and the candidate's (bf16 base, the same adapter values)."""
    runner = Runner(build_config(RUN))
    engine = build_engine(runner.cfg, runner.accelerator).engine
    return runner, engine, bf16_base_engine(runner.cfg, runner.accelerator, like=engine)


def test_the_bf16_base_holds_the_base_in_bf16_and_trains_fp32_lora_tensors():
    runner, today, new = _engines()
    base = [p for n, p in new.peft_model.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert new.params and all(p.dtype == torch.float32 and p.requires_grad for p in new.params)
    assert all(p.dtype == torch.float32 for p in today.peft_model.parameters())
    # both paths start from the same adapter
    assert all(torch.equal(a, b) for a, b in zip(snapshot(today.params), snapshot(new.params)))

    examples = runner.data[runner.tasks[0]].train[:4]
    before = snapshot(new.params)
    optimizer = torch.optim.AdamW(new.params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new.inner_step([examples[:2], examples[2:]], optimizer, sched)
    assert any(not torch.equal(a, b) for a, b in zip(before, new.params))  # the LoRA tensors trained
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in new.params)
    state = [s for p in new.params for s in optimizer.state[p].values() if torch.is_tensor(s) and s.dim() > 0]
    assert state and all(s.dtype == torch.float32 for s in state)  # AdamW's moments in fp32
    assert all(p.dtype == torch.bfloat16 for p in base)  # the base untouched


def test_the_precision_study_times_the_bf16_base_in_the_same_rounds():
    runner, today, new = _engines()
    examples = runner.data[runner.tasks[0]].train
    study = precision_study(today, runner.cfg, examples, steps=1, rounds=1, generate_batch=4, new_tokens=2,
                            bf16_base=new)
    assert set(study["rows"]) == {"fp32", "bf16", "bf16 base"}
    row = study["rows"]["bf16 base"]
    assert row["peak_of"] == "bf16" and row["tokens_per_s"] > 0 and row["generated_tokens_per_s"] > 0
    assert set(study["bf16_base_speedup"]) == {"step_s", "probe_s", "generate_s"}
    assert all(v > 0 for v in study["bf16_base_speedup"].values())
    cpu = cpu_description()
    assert cpu["model"] and isinstance(cpu["amx"], bool) and isinstance(cpu["avx512_bf16"], bool)


@pytest.fixture
def fresh_accelerate():
    """accelerate's process-wide state reset before and after: it fixes the mixed precision of the
    first Accelerator of the process, and this test's runs ask for bf16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_bf16_base_run_resumes_bit_identically(tmp_path, data_dir, monkeypatch, fresh_accelerate):
    ref, out = tmp_path / "reference", tmp_path / "resumed"
    method = "test_hostile_runtime:NanAfterTask"
    monkeypatch.setattr(NanAfterTask, "broken", False)
    assert main(tiny_args(ref, data_dir, method=method, **BF16_BASE)) == 0
    monkeypatch.setattr(NanAfterTask, "broken", True)
    assert main(tiny_args(out, data_dir, method=method, **BF16_BASE)) != 0
    assert (out / "stages" / "00-dbpedia").is_dir() and not (out / "stages" / "01-amazon").exists()
    monkeypatch.setattr(NanAfterTask, "broken", False)
    assert main(tiny_args(out, data_dir, method=method, **BF16_BASE)) == 0
    got, want = json.loads((out / "results.json").read_text()), json.loads((ref / "results.json").read_text())
    assert got["complete"] is True and got["accuracy_matrix"] == want["accuracy_matrix"]
    a, b = stage_adapters(out), stage_adapters(ref)
    assert a.keys() == b.keys() and len(a) == 3
    for stage in a:
        assert all(t.dtype == torch.float32 for t in a[stage].values())
        assert all(torch.equal(a[stage][k], b[stage][k]) for k in b[stage]), stage
