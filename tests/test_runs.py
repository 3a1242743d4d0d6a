"""End-to-end runs of every method on both tiny model kinds (seconds each)."""

from __future__ import annotations

import json

import pytest
import torch

from aimmerging.cli.main import main
from aimmerging.io import read_jsonl

from helpers import TASKS, tiny_args

METHODS = ["seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end"]


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("model", ["tiny-causal", "tiny-seq2seq"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_a_3x3_matrix(tmp_path, data_dir, model, method, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, model=model, method=method)) == 0
    r = _results(out)
    tasks = TASKS.split(",")
    assert r["complete"] is True and r["tasks"] == tasks and r["method"] == method
    a = r["accuracy_matrix"]
    assert len(a) == 3 and all(len(row) == 3 for row in a)
    assert all(x is None or 0.0 <= x <= 1.0 for row in a for x in row)
    assert isinstance(r["metrics"]["op"], float)
    if method == "mtl":  # one joint stage: only the last row exists, BWT/FWT undefined
        assert a[0] == [None] * 3 and a[1] == [None] * 3 and r["metrics"]["bwt"] is None
        stage_dirs = ["00-all"]
    else:
        assert all(a[i][j] is not None for i in range(3) for j in range(i + 1))  # lower triangle
        assert isinstance(r["metrics"]["bwt"], float)
        stage_dirs = [f"{i:02d}-{t}" for i, t in enumerate(tasks)]
    if method == "single":  # its diagonal is the FWT reference, so its own FWT is 0
        assert r["reference_scores"] == {t: a[i][i] for i, t in enumerate(tasks)}
        assert r["metrics"]["fwt"] == 0.0
    for d in stage_dirs:
        stage = out / "stages" / d
        assert (stage / "adapter" / "adapter_model.safetensors").is_file()
        assert (stage / "adapter" / "adapter_config.json").is_file()
        scores = json.loads((stage / "scores.json").read_text())
        for task in scores["scores"]:
            preds = read_jsonl(stage / "predictions" / f"{task}.jsonl")
            assert len(preds) == 8 and {"id", "gold", "prediction", "score"} <= set(preds[0])
    steps = [rec for rec in read_jsonl(out / "trace.jsonl") if rec["event"] == "step"]
    assert len(steps) == 3 * 3  # 3 steps per task: every method, mtl included, trains 9 steps in all
    assert all(rec["train_loss"] is not None and rec["lr"] is not None for rec in steps)
    printed = capsys.readouterr().out
    assert "| after \\ on |" in printed and "OP " in printed


def test_adapter_loads_with_peft_and_matches_the_run(tmp_path, data_dir):
    from peft import PeftModel

    from aimmerging.models.loading import load_base_model

    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, steps=4, lr=0.01, warmup_steps=0)) == 0
    base, _, _ = load_base_model("tiny-causal")
    model = PeftModel.from_pretrained(base, str(out / "stages" / "02-agnews" / "adapter"))
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # trained: B is no longer zero


def test_training_lowers_the_loss_on_a_tiny_model(tmp_path, data_dir):
    out = tmp_path / "run"
    # A random 2-layer model barely moves with LoRA on q/v alone: adapt every linear layer here.
    args = tiny_args(out, data_dir, steps=30, lr=0.01, warmup_steps=0, tasks="agnews", train_cap=16, lora_r=16,
                     lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    assert main(args) == 0
    losses = [rec["train_loss"] for rec in read_jsonl(out / "trace.jsonl") if rec["event"] == "step"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5


def test_causal_loss_only_covers_answer_tokens(data_dir):
    """The engine's loss equals a plain full-logits cross-entropy over the answer tokens only."""
    from accelerate import Accelerator

    from aimmerging.data.formatting import Formatter
    from aimmerging.data.olora import read_task
    from aimmerging.models.lora import attach_lora
    from aimmerging.models.loading import load_base_model
    from aimmerging.training.engine import Engine

    base, tok, kind = load_base_model("tiny-causal")
    model = attach_lora(base, kind)
    fmt = Formatter(tok, kind, max_input_tokens=64)
    engine = Engine(model, fmt, Accelerator(cpu=True), micro_batch_size=4, max_grad_norm=1.0)
    examples = read_task(data_dir, "train", "agnews")[:3]
    got = engine.mean_loss(examples, train_mode=False)
    total, count = 0.0, 0
    with torch.no_grad():
        model.eval()
        for ex in examples:
            enc = fmt.encode(ex)
            ids = torch.tensor([enc.input_ids])
            logits = model(input_ids=ids).logits[0]
            n = enc.answer_len
            targets = ids[0, -n:]
            total += torch.nn.functional.cross_entropy(logits[-n - 1:-1], targets, reduction="sum").item()
            count += n
    assert got == pytest.approx(total / count, rel=1e-4)
