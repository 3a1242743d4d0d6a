"""Helper script of test_distributed.py (not a test module): sharded generation under N processes.

``accelerate launch ... tests/dist_generate.py OUT_DIR`` runs ``generate_predictions`` with a
stub model whose "generation" is a checksum of each prompt, so every example has its own
prediction and any mix-up in dealing batches to ranks or gathering them back shows. Every rank
writes ``OUT_DIR/rank<N>.json``; ``predictions()`` gives the same lists in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SIZES = (11, 2)  # 11 examples in batches of 3: batches dealt to both ranks; 2: one batch, rank 1 idle
BATCH_SIZE = 3


class ChecksumModel(torch.nn.Module):
    """``generate`` appends the digits of a checksum of each prompt's real (unpadded) tokens."""

    def __init__(self, tokenizer):
        from transformers import GenerationConfig

        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig()
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, generation_config):
        position = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        sums = ((input_ids * attention_mask) * (position + 1)).sum(-1)
        rows = [self.tokenizer(f" {int(s) % 1000003}", add_special_tokens=False)["input_ids"] for s in sums]
        width = max(len(r) for r in rows)
        tail = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=input_ids.dtype)
        for i, r in enumerate(rows):
            tail[i, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)


def examples(n: int):
    from aimmerging.data.olora import Example

    # lengths that do not follow the order of the list, so length-sorting reorders them
    return [Example(id=f"e{i}", input=f"Question {i}: {'word ' * ((7 * i) % 5)}?\nAnswer:", output="", task="t")
            for i in range(n)]


def predictions(accelerator=None) -> dict[str, list[str]]:
    from aimmerging.data.formatting import Formatter
    from aimmerging.evaluation.generate import generate_predictions
    from aimmerging.models.loading import byte_tokenizer

    tok = byte_tokenizer()
    formatter = Formatter(tok, "causal", 64, 16)
    model = ChecksumModel(tok)
    return {str(n): generate_predictions(model, formatter, examples(n), batch_size=BATCH_SIZE, max_new_tokens=8,
                                         accelerator=accelerator, progress=False)
            for n in SIZES}


def main(out: str) -> None:
    from accelerate import Accelerator

    acc = Accelerator()
    result = {"rank": acc.process_index, "num_processes": acc.num_processes, "predictions": predictions(acc)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group: gloo's threads left running abort the exit


if __name__ == "__main__":
    main(sys.argv[1])
