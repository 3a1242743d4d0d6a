"""AIMMerging inside the Hugging Face training stack (``aimmerging.hf``): the callback with
``transformers.Trainer`` and TRL's ``SFTTrainer``, ``train_stream``, parity with aimmerging's own
runner, and two processes under ``accelerate launch``.

Parity (``test_parity_with_runner``): with the same data order, batches, seed and settings, the
callback in a ``Trainer`` and ``aimmerging.run(method="aimmerging")`` end with **bit-identical
adapters and identical merge decisions**, gradient accumulation included, under three conditions:

* the Trainer normalises the loss as aimmerging's engine does: the mean answer-token loss of each
  micro-batch divided by the accumulation steps. ``transformers`` 5 instead divides the summed
  token loss by the answer tokens of the whole accumulated batch (``num_items_in_batch``) for
  models that accept loss kwargs; ``trainer.model_accepts_loss_kwargs = False`` switches that
  off. With the default the two differ as soon as micro-batches hold different numbers of answer
  tokens (gradient accumulation): the merge steps stayed the same here, the adapters differed by
  up to 5e-3;
* the same data order: the Trainer gets the runner's shuffled order with
  ``train_sampling_strategy="sequential"`` (its RandomSampler draws another order);
* no dropout (``lora_dropout=0``): the two loops consume the torch RNG differently (the runner
  reseeds at every stage, the Trainer at its creation), so with dropout the masks differ.

What still differs, by float rounding only: the history loss (the runner's engine computes the
LM head only on the answer positions, the callback on all positions; relative differences ~1e-7),
the replay loss and the recorded training loss (float32 in the Trainer, float64 sums in the
runner). Also by design: the Trainer's optimizer is ``optim="adamw_torch"`` here (transformers 5
defaults to the fused AdamW, whose rounding differs from ``torch.optim.AdamW``'s).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_fresh_accelerate")]

HERE = Path(__file__).resolve().parent
SEED = 42
TASKS = ("codes-a", "codes-b")
DECISION_KEYS = ("step", "reason", "forgetting_count", "w_in", "w_out", "outer_steps", "interval", "elapsed",
                 "next_interval", "next_outer_steps")
CONTROLLER = dict(initial_interval=2, initial_outer_steps=2)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}"
                 "{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def peft_tiny(dropout: float = 0.0, rank_multiplier: int = 1):
    """The tiny causal model with LoRA attached exactly as the runner attaches it (rank 8, alpha 32,
    both times ``rank_multiplier``: ``Method.adapter_rank_multiplier``)."""
    from accelerate.utils import set_seed

    from aimmerging.models.loading import tiny_model
    from aimmerging.models.lora import attach_lora

    base, tok = tiny_model("tiny-causal")
    set_seed(SEED)
    return attach_lora(base, "causal", 8 * rank_multiplier, 32 * rank_multiplier, dropout), tok


def synthetic(n_train: int = 32, n_test: int = 6):
    from aimmerging.data.synthetic import generate

    return {t: (generate(t, "train")[:n_train], generate(t, "test")[:n_test]) for t in TASKS}


def chat(examples):
    """Chat rows (``messages``) of examples."""
    return [{"messages": [{"role": "user", "content": e.input}, {"role": "assistant", "content": e.output}]}
            for e in examples]


def sft_factory(tmp_path, tok, max_steps: int):
    """A ``train_stream`` factory of TRL ``SFTTrainer`` on chat rows (loss on the assistant turn only)."""
    from trl import SFTConfig, SFTTrainer

    def factory(model, train_dataset, callbacks):
        args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=max_steps, per_device_train_batch_size=4,
                         learning_rate=1e-3, report_to="none", use_cpu=True, logging_steps=100, save_strategy="no",
                         disable_tqdm=True, assistant_only_loss=True, max_length=256, bf16=False)
        return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tok, callbacks=callbacks)

    return factory


def trainer_args(out, **kw):
    from transformers import TrainingArguments

    values = dict(max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=0, report_to="none",
                  use_cpu=True, logging_steps=100, save_strategy="no", disable_tqdm=True, optim="adamw_torch",
                  seed=SEED)
    values.update(kw)
    return TrainingArguments(str(out), **values)


def second_task_callback(model, tok, data, out, max_steps: int):
    """A Trainer on codes-b with an AIMMergingCallback whose memory is 6 codes-a rows, trained."""
    from transformers import Trainer

    from aimmerging.hf import AIMMergingCallback, PadCollator, tokenize_examples

    trainer = Trainer(model=model, args=trainer_args(out, max_steps=max_steps),
                      train_dataset=tokenize_examples(data["codes-b"][0], tok),
                      data_collator=PadCollator(tok.pad_token_id))
    cb = AIMMergingCallback.for_trainer(trainer, tokenize_examples(data["codes-a"][0][:6], tok), task="codes-b",
                                        task_index=1, memory_batch_size=3, **CONTROLLER)
    trainer.train()
    return cb


def merge_decisions(records, task):
    return [{k: r[k] for k in DECISION_KEYS} for r in records if r["event"] == "merge" and r["task"] == task]


def replayed(trace: Path, task: str, capsys) -> list[dict]:
    from aimmerging.cli.main import main

    capsys.readouterr()
    assert main(["controller", "replay", str(trace), "--task", task]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    return [{k: d[k] for k in DECISION_KEYS} for d in lines]


# -- transformers.Trainer through train_stream ------------------------------------------------------------

def test_trainer_stream_merges_replay_and_plots(tmp_path, capsys):
    from transformers import Trainer

    from aimmerging.hf import PadCollator, tokenize_examples, train_stream
    from aimmerging.reporting.plots import plot_run
    from aimmerging.trace import read_trace

    model, tok = peft_tiny()
    data = synthetic()
    run = tmp_path / "run"

    def factory(model, train_dataset, callbacks):
        return Trainer(model=model, args=trainer_args(tmp_path / "hf"), train_dataset=train_dataset,
                       data_collator=PadCollator(tok.pad_token_id), callbacks=callbacks)

    tasks = [(t, tokenize_examples(train, tok), test) for t, (train, test) in data.items()]
    result = train_stream(tasks, factory, model=model, tokenizer=tok, memory_ratio=25, memory_batch_size=4,
                          output_dir=str(run), **CONTROLLER)

    assert result.tasks == list(TASKS)
    assert result.merges[0] == 0 and result.merges[1] >= 1
    a = result.accuracy_matrix
    assert a[0][1] is None and all(isinstance(x, float) for x in (a[0][0], a[1][0], a[1][1]))
    assert result.metrics["op"] is not None and result.metrics["bwt"] is not None
    trace = read_trace(run / "trace.jsonl")
    assert trace == result.trace
    # the first task (no memory) has step records only, as in aimmerging's own loop, without probes
    first = [r for r in trace if r["task"] == "codes-a"]
    assert {r["event"] for r in first} == {"step"} and all(r["history_loss"] is None for r in first)
    start = next(r for r in trace if r["task"] == "codes-b")
    assert start["event"] == "task_start" and start["memory_size"] == 8 and start["controller"]["initial_interval"] == 2
    steps = [r for r in trace if r["event"] == "step" and r["task"] == "codes-b"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["history_loss"] is not None and r["train_loss"] is not None and r["lr"] > 0 for r in steps)
    # the controller replayed on the trace reproduces the callback's merges
    assert replayed(run / "trace.jsonl", "codes-b", capsys) == merge_decisions(trace, "codes-b")
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] is True and results["tasks"] == list(TASKS) and results["accuracy_matrix"] == a
    written = {p.name for p in plot_run(run)}
    assert {"accuracy_matrix.png", "01-codes-b_history_loss.png", "01-codes-b_interval.png",
            "01-codes-b_learning_signal.png", "01-codes-b_train_loss.png"} <= written


# -- TRL's SFTTrainer on chat data ----------------------------------------------------------------------------

def test_sft_trainer_on_chat_data(tmp_path, capsys):
    pytest.importorskip("trl")
    from datasets import Dataset

    from aimmerging.hf import as_examples, train_stream

    model, tok = peft_tiny()
    tok.chat_template = CHAT_TEMPLATE
    data = synthetic()
    tasks = [(t, Dataset.from_list(chat(train)), chat(test)) for t, (train, test) in data.items()]
    result = train_stream(tasks, sft_factory(tmp_path, tok, max_steps=8), memory_ratio=25, memory_batch_size=4,
                          model=model, **CONTROLLER)

    trace = [r for r in result.trace if r["task"] == "codes-b"]
    assert result.merges[1] >= 1 and trace[0]["memory_size"] == 8
    assert all(r["history_loss"] is not None for r in trace if r["event"] == "step")
    assert replayed(result.output_dir / "trace.jsonl", "codes-b", capsys) == merge_decisions(trace, "codes-b")
    assert all(x is not None for x in (result.accuracy_matrix[1][0], result.accuracy_matrix[1][1]))
    # evaluation prompts are the chat template's rendering, ending in the generation prompt
    example = as_examples(chat(data["codes-a"][1][:1]), "codes-a", tok)[0]
    assert example.input.startswith("user: Which code") and example.input.endswith("assistant: ")
    assert example.output == data["codes-a"][1][0].output


# -- parity with aimmerging's own runner ---------------------------------------------------------------------------

def test_parity_with_runner(tmp_path, capsys):
    """Same data order, batches (micro-batches of 2, accumulation 2), seed and settings: bit-identical
    adapters and merge decisions (see the module docstring for the conditions and what differs)."""
    from transformers import Trainer

    import aimmerging
    from aimmerging.data.memory import ReplayMemory
    from aimmerging.hf import AIMMergingCallback, PadCollator, tokenize_examples
    from aimmerging.models.loading import tiny_model
    from aimmerging.models.lora import lora_parameters
    from aimmerging.reporting.plots import plot_run
    from aimmerging.training.loop import micro_batch_stream

    steps, micro, accum = 8, 2, 2
    data = synthetic()
    stream = {t: {"train": [{"id": e.id, "input": e.input, "output": e.output} for e in train],
                  "test": [{"id": e.id, "input": e.input, "output": e.output} for e in test]}
              for t, (train, test) in data.items()}
    settings = dict(max_steps=steps, batch_size=micro * accum, micro_batch_size=micro, lr=1e-3, warmup_steps=0,
                    lora_dropout=0.0, memory_ratio=25, memory_batch_size=4, seed=SEED, eval_batch_size=6, **CONTROLLER)
    ours = aimmerging.run(stream, method="aimmerging", model=tiny_model("tiny-causal"), **settings)
    train = {t: aimmerging.TaskStream.from_examples(stream).split(t, "train") for t in TASKS}

    model, tok = peft_tiny(dropout=0.0)
    run = tmp_path / "hf"
    for k, task in enumerate(TASKS):
        batches = micro_batch_stream(train[task], micro, random.Random(f"data-{SEED}-{k}"))  # the runner's order
        rows = tokenize_examples([e for _ in range(steps * accum) for e in next(batches)], tok)
        memory = tokenize_examples(ReplayMemory.reference([train[t] for t in TASKS[:k]], 25, SEED).examples, tok)
        trainer = Trainer(model=model, args=trainer_args(run, max_steps=steps, per_device_train_batch_size=micro,
                                                         gradient_accumulation_steps=accum,
                                                         train_sampling_strategy="sequential"),
                          train_dataset=rows, data_collator=PadCollator(tok.pad_token_id))
        trainer.model_accepts_loss_kwargs = False  # per-micro-batch mean / accumulation, as our engine
        AIMMergingCallback.for_trainer(trainer, memory, task=task, task_index=k, memory_batch_size=4, seed=SEED,
                                       **CONTROLLER)
        trainer.train()

    theirs = [json.loads(x) for x in (run / "trace.jsonl").read_text().splitlines()]
    mine = ours.trace  # both tasks: the same records in the same order
    assert merge_decisions(theirs, "codes-b") == merge_decisions(mine, "codes-b") != []
    for a, b in zip(mine, theirs, strict=True):
        assert a["event"] == b["event"] and a["step"] == b["step"]
        if a["event"] == "step":
            assert set(a) == set(b) and a["lr"] == b["lr"] and a.get("interval") == b.get("interval")
            for key, rel in (("delta_in_l1", 1e-12), ("history_loss", 1e-6), ("train_loss", 1e-6)):
                assert (a[key] is None) == (b[key] is None), (key, a, b)
                assert a[key] is None or math.isclose(a[key], b[key], rel_tol=rel), (key, a, b)
        elif a["event"] == "merge":
            assert math.isclose(a["learning_signal"], b["learning_signal"], rel_tol=1e-12)
            assert math.isclose(a["replay_loss"], b["replay_loss"], rel_tol=1e-6)
    for p, q in zip(lora_parameters(ours.model), lora_parameters(model), strict=True):
        assert torch.equal(p, q)
    # the standalone callbacks kept a results.json for `aimmerging plot`
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == list(TASKS) and results["accuracy_matrix"] == [[None, None], [None, None]]
    assert "01-codes-b_history_loss.png" in {p.name for p in plot_run(run)}
    assert replayed(run / "trace.jsonl", "codes-b", capsys) == merge_decisions(theirs, "codes-b")


# -- edge cases ---------------------------------------------------------------------------------------------------

def test_non_finite_probe_is_null_and_not_fed(tmp_path, monkeypatch, capsys):
    from aimmerging.methods.aimmerging import Merging

    model, tok = peft_tiny()
    data = synthetic(n_train=24)
    real = Merging.probe
    calls = {"n": 0}

    def flaky(self, view):
        calls["n"] += 1
        return math.nan if calls["n"] == 2 else real(self, view)

    monkeypatch.setattr(Merging, "probe", flaky)
    cb = second_task_callback(model, tok, data, tmp_path, max_steps=6)
    steps = [r for r in cb.records if r["event"] == "step"]
    assert steps[1]["history_loss"] is None and steps[1]["probe_skipped"] == "non-finite history loss"
    assert all(r["history_loss"] is not None for i, r in enumerate(steps) if i != 1)
    assert replayed(tmp_path / "trace.jsonl", "codes-b", capsys) == merge_decisions(cb.records, "codes-b")
    text = (tmp_path / "trace.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_first_task_and_bad_settings(tmp_path):
    from transformers import Trainer

    from aimmerging.errors import ConfigError
    from aimmerging.hf import AIMMergingCallback, PadCollator, tokenize_examples

    for bad in (dict(initial_intervall=2), dict(min_interval=0), dict(probe_mode="both"), dict(fusion="no-such-rule"),
                dict(memory_batch_size=0), dict(config=3)):
        with pytest.raises(ConfigError):
            AIMMergingCallback([], **bad)
    model, tok = peft_tiny()
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2),
                      train_dataset=tokenize_examples(synthetic(n_train=8)["codes-a"][0], tok),
                      data_collator=PadCollator(tok.pad_token_id))
    cb = AIMMergingCallback.for_trainer(trainer, [], task="codes-a", task_index=0)
    trainer.train()
    # no memory: no probe, no merge; step records only, as in aimmerging's own loop
    assert [(r["event"], r["history_loss"]) for r in cb.records] == [("step", None), ("step", None)]
    assert len((tmp_path / "trace.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "results.json").read_text())["tasks"] == ["codes-a"]


# -- two processes: bit-identical adapters ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_two_processes_bit_identical(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo), gradient accumulation,
    LoRA dropout on, odd memory batches: the same records and bit-identical adapters on both ranks."""
    from safetensors.torch import load_file

    out = tmp_path / "dump"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for _ in range(3):  # another port when the chosen one was taken meanwhile
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(HERE / "hf_dist_worker.py"), str(out)]
        with open(tmp_path / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
            end = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(0.1)
            if proc.poll() is None:
                _kill_tree(proc)
                pytest.fail("the 2-process launch did not finish in 240 s:\n" + (tmp_path / "log.txt").read_text()[-3000:])
        text = (tmp_path / "log.txt").read_text()
        if proc.returncode == 0 or "EADDRINUSE" not in text:
            break
    assert proc.returncode == 0, text[-3000:]
    dumps = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in dumps] == [2, 2]
    assert dumps[0]["records"] == dumps[1]["records"]
    assert sum(r["event"] == "merge" for r in dumps[0]["records"]) >= 1
    a, b = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (out / "run" / "trace.jsonl").read_text().splitlines()
    assert len(lines) == len(dumps[0]["records"])  # written once, by the main process


def test_an_overflowing_replay_step_is_skipped_as_in_the_engine(tmp_path):
    """The callback's replay steps go through the engine's guarded step (``guarded_step``): a
    learning rate so large that torch refuses the update as overflowing skips the step and leaves
    the adapter as it was (the callback used to raise there)."""
    from aimmerging.models.lora import lora_parameters, snapshot

    model, tok = peft_tiny()
    cb = second_task_callback(model, tok, synthetic(n_train=8), tmp_path, max_steps=1)
    before = snapshot(lora_parameters(model))
    view = cb.last_view  # the Trainer host of the finished task
    for group in view.optimizer.param_groups:
        group["lr"] = 1e38
    model.train()
    assert view.update(view.memory.sample(view.rng("replay"), 3), view.optimizer, 1.0) is None
    assert all(torch.equal(p, b) for p, b in zip(lora_parameters(model), before))
