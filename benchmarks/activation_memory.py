"""Activation memory per token of one LoRA training step on SmolLM2-135M (fp32, CPU), with and
without gradient checkpointing: the figures behind BENCHMARKS.md, "Bigger bases".

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/activation_memory.py [OUT.json]

Each row is one forward + backward pass (LM head on the last position, as the engine computes it
for answers only) on random tokens; its memory is the peak resident memory of the process during
the pass (Linux: the kernel's high-water mark, reset just before) less the resident memory before
it. The first row warms up (the weights' pages are touched then). The fixed mmap threshold makes
glibc return freed blocks, so that each pass starts from the same resident memory. The slope
between two token counts is the activation memory per token.
"""

import ctypes
import json
import re
import sys
import time

import torch

from aimmerging.models.loading import enable_gradient_checkpointing, load_base_model
from aimmerging.models.lora import attach_lora

SHAPES = [(1, 32), (2, 256), (6, 256)]  # (batch, tokens per example); the first one warms up


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(out: str | None) -> None:
    torch.set_num_threads(1)
    rows = []
    for checkpointing in (False, True):
        model, _, kind = load_base_model("smollm2-135m")
        model.config.use_cache = False
        if checkpointing:
            enable_gradient_checkpointing(model)
        peft = attach_lora(model, kind)
        peft.train()
        for batch, length in SHAPES:
            ids = torch.randint(10, 40000, (batch, length))
            _reset()
            base = _status_kb("VmRSS")
            _reset()
            start = time.perf_counter()
            peft(input_ids=ids, logits_to_keep=1).logits.float().sum().backward()
            row = {"checkpointing": checkpointing, "batch": batch, "length": length, "tokens": batch * length,
                   "step_mb": round((_status_kb("VmHWM") - base) / 1024, 1),
                   "wall_s": round(time.perf_counter() - start, 2)}
            peft.zero_grad(set_to_none=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del peft, model
    for checkpointing in (False, True):
        (a, b) = [r for r in rows if r["checkpointing"] == checkpointing][1:]
        print(f"checkpointing={checkpointing}: {(b['step_mb'] - a['step_mb']) / (b['tokens'] - a['tokens']):.3f} MB per token")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
