"""Worker of tests/test_hf_callback.py::test_two_processes_bit_identical, started by
``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1``.

Two synthetic tasks through ``transformers.Trainer`` + :class:`AIMMergingCallback` with gradient
accumulation and LoRA dropout on (every rank draws other dropout masks and gets other training
rows); memory batches of an odd size, so the ranks' shares differ. Every rank then writes
``OUT/rank<N>.safetensors`` (its LoRA tensors by name) and ``OUT/rank<N>.json`` (its trace
records)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from aimmerging.data.memory import ReplayMemory
from aimmerging.data.synthetic import generate
from aimmerging.hf import AIMMergingCallback, PadCollator, tokenize_examples
from aimmerging.models.loading import tiny_model
from aimmerging.models.lora import attach_lora
from aimmerging.runs.process import end_process_group


def main(out: Path) -> None:
    torch.set_num_threads(1)
    base, tok = tiny_model("tiny-causal")
    set_seed(42)
    model = attach_lora(base, "causal", 8, 32, 0.1)
    names = ["codes-a", "codes-b"]
    train = {n: generate(n, "train")[:32] for n in names}
    records: list[dict] = []
    for k, name in enumerate(names):
        memory = tokenize_examples(ReplayMemory.reference([train[m] for m in names[:k]], 25, 42).examples, tok)
        args = TrainingArguments(str(out / "run"), max_steps=8, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=0,
                                 report_to="none", use_cpu=True, logging_steps=100, save_strategy="no",
                                 disable_tqdm=True, optim="adamw_torch", seed=42)
        trainer = Trainer(model=model, args=args, train_dataset=tokenize_examples(train[name], tok),
                          data_collator=PadCollator(tok.pad_token_id))
        cb = AIMMergingCallback.for_trainer(trainer, memory, task=name, task_index=k, memory_batch_size=5,
                                            initial_interval=2, initial_outer_steps=2, threshold_factor=1.0,
                                            cold_start=1)
        trainer.train()
        records += cb.records
        world, rank = trainer.args.world_size, trainer.args.process_index
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "records": records}))
    end_process_group()  # gloo's threads left running at the exit can abort the process (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
