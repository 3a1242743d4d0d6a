"""Any aimmerging method inside TRL's SFTTrainer, on SmolLM2-135M-Instruct (CPU, a few minutes).

Two tasks of the built-in synthetic stream (code tables A and B), in chat form; one fresh
SFTTrainer per task on the same PEFT model, the method chosen on the command line running as a
callback (``aimmerging.hf.ContinualCallback``), the replay memory built with the reference rule,
every seen task evaluated after each task.

    pip install -e ".[hf]" && python examples/sft_trainer_smollm2.py runs/sft-smollm2
    python examples/sft_trainer_smollm2.py runs/sft-ewc --method ewc --set ewc_lambda=1000
    python examples/sft_trainer_smollm2.py runs/sft-s1 --seed 1 --eval-split dev
    python examples/sft_trainer_smollm2.py runs/sft-own-s1 --seed 1 --eval-split dev --own-rows

``--set NAME=VALUE`` gives the method its options (those of ``aimmerging run --help``, with
underscores). AIMMerging and its ablations default to S0 = 4 and 8 replay steps per merge (the
demo's settings).
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from aimmerging.data.synthetic import generate
from aimmerging.hf import train_stream
from aimmerging.models.loading import load_base_model

MERGING = {"aimmerging": dict(initial_interval=4, initial_outer_steps=8),
           "merge-fixed": dict(initial_interval=4, initial_outer_steps=8)}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("output_dir", nargs="?", default="runs/sft-smollm2")
parser.add_argument("--method", default="aimmerging", help="any registered method but mtl (default: aimmerging)")
parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="an option of the method")
parser.add_argument("--seed", type=int, default=42, help="seed of the trainer, the adapter and the memory draws")
parser.add_argument("--steps", type=int, default=32, help="optimizer steps per task (batch 4)")
parser.add_argument("--eval-split", choices=("test", "dev"), default="test")
parser.add_argument("--own-rows", action="store_true",
                    help="train on aimmerging's own chat tokenisation (input_ids + labels, target "
                         "'answer<|im_end|>' without TRL's trailing newline): the README's gap experiment")
parser.add_argument("--fp32", action="store_true",
                    help="train in fp32 (TRL's SFTConfig trains under bf16 where the CPU has it; aimmerging run's "
                         "default is fp32): the README's gap experiment")
args = parser.parse_args()
options = dict(MERGING.get(args.method, {}))
for pair in args.set:
    name, _, value = pair.partition("=")
    options[name.strip()] = value.strip()


def chat(examples, with_answer=True):
    """Prompt/completion rows: SFTTrainer puts the loss on the completion only."""
    rows = []
    for e in examples:
        row = {"prompt": [{"role": "user", "content": e.input}]}
        if with_answer:
            row["completion"] = [{"role": "assistant", "content": e.output}]
        rows.append(row)
    return rows


def own_rows(examples, name):
    """aimmerging's chat rows as processed SFTTrainer rows with their ``labels`` (-100 outside the
    answer), which TRL keeps as they are. (A ``completion_mask`` column instead would be dropped:
    TRL applies it only to prompt/completion datasets and puts the loss on every token otherwise.)"""
    from aimmerging.hf import tokenize_examples

    return [{"input_ids": r["input_ids"], "labels": r["labels"]}
            for r in tokenize_examples(examples, tok, prompt_format="chat", task=name)]


def eval_rows(examples):
    return [{"messages": [{"role": "user", "content": e.input}, {"role": "assistant", "content": e.output}]}
            for e in examples]


def factory(model, train_dataset, callbacks):
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=4,
                       learning_rate=4e-3, warmup_steps=2, lr_scheduler_type="linear", report_to="none", use_cpu=True,
                       logging_steps=8, save_strategy="no", disable_tqdm=True, max_length=128, seed=args.seed,
                       **({"bf16": False} if args.fp32 else {}))
    return SFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tok, callbacks=callbacks)


if __name__ == "__main__":
    from transformers import set_seed

    model, tok, _ = load_base_model("smollm2-135m")
    set_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"))
    train = (lambda name: own_rows(generate(name, "train"), name)) if args.own_rows else (lambda name: chat(generate(name, "train")))
    tasks = [(name, Dataset.from_list(train(name)), eval_rows(generate(name, args.eval_split))) for name in ("codes-a", "codes-b")]
    result = train_stream(tasks, factory, model=model, tokenizer=tok, method=args.method, memory_ratio=10.0,
                          memory_batch_size=8, seed=args.seed, output_dir=args.output_dir, **options)
    print(f"method {args.method}, seed {args.seed}, {args.eval_split} split")
    print("accuracy matrix (row: after task i; column: task j):")
    for name, row in zip(result.tasks, result.accuracy_matrix):
        print(f"  {name}: " + "  ".join("-" if x is None else f"{x:.3f}" for x in row))
    print(f"OP {result.metrics['op']:.4f}  BWT {result.metrics['bwt']:+.4f}  merges per task {result.merges}")
    print(f"trace: {args.output_dir}/trace.jsonl  (aimmerging plot {args.output_dir})")
