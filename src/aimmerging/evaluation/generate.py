"""Batched greedy generation for causal and seq2seq models, optionally sharded over processes."""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.formatting import Formatter
from ..data.olora import Example


def length_batches(formatter: Formatter, examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (less padding, same result)."""
    order = sorted(range(len(examples)), key=lambda i: len(formatter.eval_prompt_ids(examples[i].input)))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def half_precision_dtype(device) -> "torch.dtype":
    """The half precision an evaluation runs in: fp16 on CUDA (the reference's), bf16 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


@torch.no_grad()
def generate_predictions(model, formatter: Formatter, examples: Sequence[Example], *, batch_size: int,
                         max_new_tokens: int, accelerator=None, desc: str = "eval",
                         progress: bool = True, autocast_dtype=None) -> list[str]:
    """One greedy prediction per example (stripped text), in the order of ``examples``.

    Under several processes whole batches are dealt out to the ranks and the predictions gathered,
    so every batch is exactly the batch one process would run: the scores do not depend on the
    number of processes. ``autocast_dtype``: generate under ``torch.autocast`` to that dtype (the
    weights keep theirs).
    """
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    batches = length_batches(formatter, examples, batch_size)
    mine = batches[rank::world]
    was_training = model.training
    model.eval()
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                      eos_token_id=formatter.eos_id, pad_token_id=formatter.pad_id,
                      temperature=None, top_p=None, top_k=None)
    results: list[tuple[int, str]] = []
    bar = tqdm(mine, desc=desc, unit="batch", leave=False, disable=not progress or rank != 0)
    for batch in bar:
        inputs = formatter.collate_prompts([examples[i] for i in batch])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with _autocast(device, autocast_dtype):
            out = model.generate(**inputs, generation_config=gen_config)
        if formatter.kind == "causal":
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = formatter.tokenizer.batch_decode(out, skip_special_tokens=True)
        results.extend((i, t.strip()) for i, t in zip(batch, texts))
    if was_training:
        model.train()
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    predictions = [""] * len(examples)
    for i, text in results:
        predictions[i] = text
    return predictions
