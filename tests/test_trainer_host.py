"""Every method in two hosts: aimmerging's own loop (``aimmerging.run``) and a Hugging Face
``Trainer`` (``aimmerging.hf.train_stream(..., method=NAME)``), from one implementation.

Parity conditions (as ``test_hf_callback.test_parity_with_runner``): the Trainer gets the
runner's data order (``train_sampling_strategy="sequential"`` over the runner's shuffled
micro-batches), the same micro-batches and accumulation, seed and optimizer (``adamw_torch``),
LoRA dropout 0, and the engine's loss normalisation (``model_accepts_loss_kwargs = False``: the
mean answer-token loss of each micro-batch over the accumulation steps); the replay memory is the
runner's (``memory_rows``). Under them the final adapters are bit-identical for every method
of every registered method (``mtl``, one stage on all tasks, is refused in one line), with the
same trace events and the same per-step fields (merges, Fisher passes, distillation and
consistency terms, ...). Also: a user's own method inside TRL's ``SFTTrainer``, and the one-line
refusals of what a trainer cannot do.
"""

from __future__ import annotations

import random

import pytest
import torch

from test_hf_callback import SEED, TASKS, peft_tiny, synthetic, trainer_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_fresh_accelerate")]

STEPS, MICRO, ACCUM = 3, 2, 2
OPTIONS = {  # small settings that make every method act within 3 steps per task
    "aimmerging": dict(initial_interval=2, initial_outer_steps=2),
    "merge-fixed": dict(initial_interval=2, initial_outer_steps=2),
    "merge-end": dict(initial_outer_steps=2),
    "forever": dict(forever_window=1),
    "ewc": dict(ewc_fisher_examples=4, ewc_lambda=100.0),
}


def host_methods() -> list[str]:
    from aimmerging.methods import builtin_names

    return [n for n in builtin_names() if n != "mtl"]  # mtl: one stage on all tasks, refused in one line


def both_hosts(name: str, tmp_path, **options):
    """(adapter of the own loop, adapter of the Trainer host, both traces) for ``name``."""
    from transformers import Trainer

    import aimmerging
    from aimmerging.data.memory import ReplayMemory
    from aimmerging.hf import PadCollator, tokenize_examples, train_stream
    from aimmerging.methods import resolve_method
    from aimmerging.models.loading import tiny_model
    from aimmerging.models.lora import lora_parameters
    from aimmerging.training.loop import micro_batch_stream

    data = synthetic(n_train=16, n_test=2)
    stream = {t: {"train": [{"id": e.id, "input": e.input, "output": e.output} for e in train],
                  "test": [{"id": e.id, "input": e.input, "output": e.output} for e in test]}
              for t, (train, test) in data.items()}
    options = {**OPTIONS.get(name, {}), **options}
    ours = aimmerging.run(stream, method=name, model=tiny_model("tiny-causal"), max_steps=STEPS,
                          batch_size=MICRO * ACCUM, micro_batch_size=MICRO, lr=1e-3, warmup_steps=0, lora_dropout=0.0,
                          memory_ratio=25, memory_batch_size=4, seed=SEED, eval_batch_size=2, **options)
    train = {t: aimmerging.TaskStream.from_examples(stream).split(t, "train") for t in TASKS}
    multiplier = resolve_method(name)().adapter_rank_multiplier(len(TASKS))
    model, tok = peft_tiny(rank_multiplier=multiplier)
    tasks, memory = [], []
    for k, task in enumerate(TASKS):
        batches = micro_batch_stream(train[task], MICRO, random.Random(f"data-{SEED}-{k}"))  # the runner's order
        tasks.append((task, tokenize_examples([e for _ in range(STEPS * ACCUM) for e in next(batches)], tok), data[task][1]))
        memory.append(tokenize_examples(ReplayMemory.reference([train[t] for t in TASKS[:k]], 25, SEED).examples, tok))

    def factory(model, train_dataset, callbacks):
        trainer = Trainer(model=model, args=trainer_args(tmp_path / "hf", max_steps=STEPS, per_device_train_batch_size=MICRO,
                                                         gradient_accumulation_steps=ACCUM,
                                                         train_sampling_strategy="sequential"),
                          train_dataset=train_dataset, data_collator=PadCollator(tok.pad_token_id), callbacks=callbacks)
        trainer.model_accepts_loss_kwargs = False  # per-micro-batch mean / accumulation, as the engine
        return trainer

    theirs = train_stream(tasks, factory, model=model, tokenizer=tok, method=name, memory_rows=memory,
                          memory_batch_size=4, seed=SEED, evaluate=lambda *a: 0.0, **options)
    return lora_parameters(ours.model), lora_parameters(theirs.model), ours.trace, theirs.trace


@pytest.mark.parametrize("name", host_methods())
def test_every_method_in_a_trainer_ends_with_the_own_loops_adapter(name, tmp_path):
    """Bit-identical adapters from both hosts, the same trace events in the same order and the same
    fields in every step record."""
    ours, theirs, our_trace, their_trace = both_hosts(name, tmp_path)
    assert [(r["event"], r["task"], r["step"]) for r in our_trace] == [(r["event"], r["task"], r["step"]) for r in their_trace]
    assert [sorted(r) for r in our_trace if r["event"] == "step"] == [sorted(r) for r in their_trace if r["event"] == "step"]
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q), f"{name}: max |difference| {float((p - q).abs().max()):.3g}"
    assert any(not torch.equal(q, torch.zeros_like(q)) for q in theirs)


def test_a_user_method_runs_inside_sft_trainer(tmp_path, monkeypatch):
    """A method registered in a test module (``plugin_methods.PullReplay``: replay mixing plus a
    loss term) inside TRL's ``SFTTrainer`` on chat rows: its rows reach the batches, its term the loss."""
    pytest.importorskip("trl")
    from datasets import Dataset

    import plugin_methods
    from aimmerging.hf import train_stream
    from aimmerging.methods.replay import Replay
    from test_hf_callback import CHAT_TEMPLATE, chat, sft_factory

    mixed = []
    real = Replay.extra_examples

    def counted(self, view, micro_batch):
        rows = real(self, view, micro_batch)
        mixed.append((view.stage.name, len(micro_batch), len(rows), {r.task for r in rows}))
        return rows

    monkeypatch.setattr(Replay, "extra_examples", counted)
    monkeypatch.setattr(plugin_methods.PullReplay, "calls", 0)
    model, tok = peft_tiny()
    tok.chat_template = CHAT_TEMPLATE
    data = synthetic(n_train=16, n_test=2)
    tasks = [(t, Dataset.from_list(chat(train)), chat(test)) for t, (train, test) in data.items()]
    result = train_stream(tasks, sft_factory(tmp_path, tok, max_steps=3), model=model, method="pull-replay",
                          replay_ratio=0.5, pull_weight=2.0, memory_ratio=25, memory_batch_size=4,
                          evaluate=lambda *a: 0.0)
    assert plugin_methods.PullReplay.calls >= 3  # the loss term, on every micro-batch of the second task
    second = [m for m in mixed if m[0] == "codes-b"]
    assert second and all(n_mem == 2 and tasks_ == {"codes-a"} for _, n, n_mem, tasks_ in second if n == 4)
    assert [r["task"] for r in result.trace if r["event"] == "step"] == ["codes-a"] * 3 + ["codes-b"] * 3


def test_what_a_trainer_cannot_do_is_refused_in_one_line(tmp_path):
    from transformers import Trainer

    from aimmerging.errors import ConfigError
    from aimmerging.hf import ContinualCallback, PadCollator, tokenize_examples, train_stream
    from aimmerging.methods.ewc import EWC

    with pytest.raises(ConfigError, match="method 'mtl' trains one stage on all tasks together"):
        ContinualCallback("mtl")
    with pytest.raises(ConfigError, match=r"method 'ewc': unknown option\(s\) ewc_lamda \(options: ewc_lambda"):
        ContinualCallback("ewc", ewc_lamda=1.0)
    with pytest.raises(ConfigError, match="method 'seq': unknown option.*it has no options"):
        ContinualCallback("seq", lr=1.0)
    with pytest.raises(ConfigError, match="set its options on it"):
        ContinualCallback(EWC(), ewc_lambda=1.0)
    with pytest.raises(ConfigError, match="unknown method"):
        ContinualCallback("no-such-method")
    # a method that changes the batches or the loss needs its trainer, said before any step
    model, tok = peft_tiny()
    rows = tokenize_examples(synthetic(n_train=8)["codes-a"][0], tok)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=rows,
                      data_collator=PadCollator(tok.pad_token_id))
    cb = ContinualCallback("replay", rows[:2], task="codes-b", task_index=1)
    trainer.add_callback(cb)
    with pytest.raises(ConfigError, match="attach the callback to its trainer"):
        trainer.train()
    # attached, but the collator would run in worker processes (its draws and batch rows lost there)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1, dataloader_num_workers=1),
                      train_dataset=rows, data_collator=PadCollator(tok.pad_token_id))
    ContinualCallback.for_trainer(trainer, "replay", rows[:2], task="codes-b", task_index=1)
    with pytest.raises(ConfigError, match=r"dataloader_num_workers=0"):
        trainer.train()
    # O-LoRA needs one rank slot per task: an adapter of rank 8 cannot hold three equal ones
    def factory(model, train_dataset, callbacks):
        return Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=train_dataset,
                       data_collator=PadCollator(tok.pad_token_id), callbacks=callbacks)

    with pytest.raises(ConfigError, match="olora: the adapter has rank 8, not lora_r x 3"):
        train_stream([("a", rows, []), ("b", rows, []), ("c", rows, [])], factory, model=peft_tiny()[0], method="olora",
                     evaluate=lambda *a: 0.0)
