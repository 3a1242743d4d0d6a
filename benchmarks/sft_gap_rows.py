"""Where the SFTTrainer example's gap to the own loop comes from (README, "With your own Trainer"):
the example (examples/sft_trainer_smollm2.py, AIMMerging, dev split) with aimmerging's own chat rows
given to SFTTrainer as processed rows (input_ids + completion_mask: target 'answer<|im_end|>', without
TRL's trailing '\\n'), everything else unchanged. Close to the own loop -> the rows make the gap;
close to the example -> TRL's loop does.

    python benchmarks/sft_gap_rows.py runs/sft-gap-s1 1      # OUTPUT_DIR SEED (several minutes on CPU)
"""
import sys
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from aimmerging.data.synthetic import generate
from aimmerging.hf import tokenize_examples, train_stream
from aimmerging.models.loading import load_base_model

out, seed = sys.argv[1], int(sys.argv[2])
model, tok, _ = load_base_model("smollm2-135m")
set_seed(seed)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"))

def factory(model, train_dataset, callbacks):
    config = SFTConfig(output_dir=out, max_steps=32, per_device_train_batch_size=4,
                       learning_rate=4e-3, warmup_steps=2, lr_scheduler_type="linear", report_to="none", use_cpu=True,
                       logging_steps=8, save_strategy="no", disable_tqdm=True, max_length=128, seed=seed)
    return SFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tok, callbacks=callbacks)

def rows(name):
    return Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(l != -100) for l in r["labels"]]}
                              for r in tokenize_examples(generate(name, "train"), tok, prompt_format="chat", task=name)])

def eval_rows(name):
    return [{"messages": [{"role": "user", "content": e.input}, {"role": "assistant", "content": e.output}]}
            for e in generate(name, "dev")]

tasks = [(n, rows(n), eval_rows(n)) for n in ("codes-a", "codes-b")]
r = train_stream(tasks, factory, model=model, tokenizer=tok, method="aimmerging", memory_ratio=10.0,
                 memory_batch_size=8, seed=seed, output_dir=out, initial_interval=4, initial_outer_steps=8)
for name, row in zip(r.tasks, r.accuracy_matrix):
    print(f"  {name}: " + "  ".join("-" if x is None else f"{x:.3f}" for x in row))
print(f"OP {r.metrics['op']:.4f}  BWT {r.metrics['bwt']:+.4f}  merges per task {r.merges}")
