"""AIMMerging inside TRL's SFTTrainer, on SmolLM2-135M-Instruct (CPU, a few minutes).

Two tasks of the built-in synthetic stream (code tables A and B), in chat form; one fresh
SFTTrainer per task on the same PEFT model, AIMMerging as a callback, the replay memory built
with the reference rule, every seen task evaluated after each task.

    pip install -e ".[hf]" && python examples/sft_trainer_smollm2.py
"""

from __future__ import annotations

import sys

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from aimmerging.data.synthetic import generate
from aimmerging.hf import train_stream
from aimmerging.models.loading import load_base_model

OUT = sys.argv[1] if len(sys.argv) > 1 else "runs/sft-smollm2"
STEPS = 32


def chat(examples, with_answer=True):
    """Prompt/completion rows: SFTTrainer puts the loss on the completion only."""
    rows = []
    for e in examples:
        row = {"prompt": [{"role": "user", "content": e.input}]}
        if with_answer:
            row["completion"] = [{"role": "assistant", "content": e.output}]
        rows.append(row)
    return rows


def eval_rows(examples):
    return [{"messages": [{"role": "user", "content": e.input}, {"role": "assistant", "content": e.output}]}
            for e in examples]


model, tok, _ = load_base_model("smollm2-135m")
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"))


def factory(model, train_dataset, callbacks):
    args = SFTConfig(output_dir=OUT, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=4e-3,
                     warmup_steps=2, lr_scheduler_type="linear", report_to="none", use_cpu=True,
                     logging_steps=8, save_strategy="no", disable_tqdm=True, max_length=128, seed=42)
    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tok, callbacks=callbacks)


tasks = [(name, Dataset.from_list(chat(generate(name, "train"))), eval_rows(generate(name, "test")))
         for name in ("codes-a", "codes-b")]
result = train_stream(tasks, factory, model=model, tokenizer=tok, memory_ratio=10.0, memory_batch_size=8,
                      initial_interval=4, initial_outer_steps=4, output_dir=OUT)
print("accuracy matrix (row: after task i; column: task j):")
for name, row in zip(result.tasks, result.accuracy_matrix):
    print(f"  {name}: " + "  ".join("-" if x is None else f"{x:.3f}" for x in row))
print(f"OP {result.metrics['op']:.4f}  BWT {result.metrics['bwt']:+.4f}  merges per task {result.merges}")
print(f"trace: {OUT}/trace.jsonl  (aimmerging controller replay {OUT}/trace.jsonl; aimmerging plot {OUT})")
