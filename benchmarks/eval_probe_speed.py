"""Side by side, alternating, on SmolLM2-135M: (1) generation at the reference protocol's 128 new
tokens in one pass against two passes (rows without EOS after the longest training answer go on
alone); (2) the forgetting probe over a memory batch larger than the micro-batch in two passes
(the micro-batch size, as before) against one pass.

    python benchmarks/eval_probe_speed.py RUN_DIR/stages/NN-task/adapter [ROUNDS]
    python benchmarks/eval_probe_speed.py base [ROUNDS]

The adapter is a trained stage's (a model that has learnt the answers stops at EOS, as in a
run), or ``base``: the untrained adapter, whose answers ramble on (the worst case); the prompts are the dev examples of amazon and agnews (40 each), as in the quick bench.
Prints the timings and whether the two arms give the same predictions / losses.
"""

from __future__ import annotations

import sys
import time

import torch


def main(adapter: str, rounds: int = 2, probe_only: bool = False) -> None:
    from aimmerging.config import build_config
    from aimmerging.data.olora import read_task
    from aimmerging.data.sampling import balanced_subsample
    from aimmerging.models.lora import load_adapter_weights
    from aimmerging.runs.process import make_accelerator
    from aimmerging.runs.runner import build_engine

    data = "../shared/data/long_sequence"
    cfg = build_config({"protocol": "reference", "model": "smollm2-135m", "micro_batch_size": 8,
                        "memory_batch_size": 14})
    engine = build_engine(cfg, make_accelerator("no")).engine
    if adapter != "base":
        load_adapter_weights(engine.peft_model, adapter)
    tasks = ("amazon", "agnews")
    prompts = [e for t in tasks for e in balanced_subsample(read_task(data, "dev", t), 40, f"42-test-{t}")]
    needed = max(engine.formatter.max_new_tokens({e.output for e in read_task(data, "train", t)}) for t in tasks)
    memory = [e for t in tasks for e in balanced_subsample(read_task(data, "train", t), 7, f"memory-{t}")]

    if not probe_only:
        generation(engine, prompts, needed, rounds)
    probe(engine, memory, rounds)


def generation(engine, prompts, needed, rounds):
    from aimmerging.evaluation.generate import generate_predictions

    def gen(first):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference protocol's evaluation precision on CPU
            return generate_predictions(engine.peft_model, engine.formatter, prompts, batch_size=20, max_new_tokens=128,
                                        progress=False, first_pass_tokens=first)

    arms = {"one pass to 128 tokens": None, f"two passes ({needed}, then the rest)": needed}
    times = {k: [] for k in arms}
    preds = {}
    for _ in range(rounds):
        for name, first in arms.items():
            start = time.perf_counter()
            preds[name] = gen(first)
            times[name].append(time.perf_counter() - start)
    a, b = preds.values()
    unfinished = sum(len(engine.formatter.tokenizer(p, add_special_tokens=False)["input_ids"]) >= needed for p in a)
    print(f"generation of {len(prompts)} prompts (batch 20, bf16 autocast), best of {rounds} alternating rounds:")
    for name, t in times.items():
        print(f"  {name}: {min(t):.1f} s  (all: {', '.join(f'{x:.1f}' for x in t)})")
    print(f"  same predictions: {sum(x == y for x, y in zip(a, b))}/{len(a)}; answers of >= {needed} tokens: {unfinished}")



def probe(engine, memory, rounds):
    by_length = sorted(memory, key=engine.formatter.length)
    arms = {"probe in 2 passes (8 + 6), random order": (memory, 8), "probe in 1 pass (14)": (memory, 14),
            "probe in 2 passes (7 + 7), sorted by length": (by_length, 7)}
    ptimes = {k: [] for k in arms}
    losses = {}
    for _ in range(3 * rounds):
        for name, (examples, chunk) in arms.items():
            start = time.perf_counter()
            engine.mean_loss(examples, train_mode=True, chunk=chunk)  # as the probe runs: train mode
            ptimes[name].append(time.perf_counter() - start)
            losses[name] = engine.mean_loss(examples, train_mode=False, chunk=chunk)
    print(f"probe over {len(memory)} memory examples (train mode, no gradients, fp32), best of {3 * rounds}:")
    for name, t in ptimes.items():
        print(f"  {name}: {min(t):.2f} s  (eval-mode loss {losses[name]:.6f})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2, "--probe-only" in sys.argv)
