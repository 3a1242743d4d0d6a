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
    order = sorted(range(len(examples)), key=lambda i: len(formatter.eval_prompt_ids(examples[i])))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def half_precision_dtype(device) -> "torch.dtype":
    """The half precision an evaluation runs in: fp16 on CUDA (the reference's), bf16 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


@torch.no_grad()
def generate_predictions(model, formatter: Formatter, examples: Sequence[Example], *, batch_size: int,
                         max_new_tokens: int, accelerator=None, desc: str = "eval",
                         progress: bool = True, autocast_dtype=None, first_pass_tokens: int | None = None,
                         deal_batches: bool = True) -> list[str]:
    """One greedy prediction per example (stripped text), in the order of ``examples``.

    Under several processes whole batches are dealt out to the ranks and the predictions gathered,
    so every batch is exactly the batch one process would run: the scores do not depend on the
    number of processes. ``deal_batches=False``: every process generates every batch instead (a
    base sharded with FSDP needs every process in every forward pass); the predictions are the
    same. ``autocast_dtype``: generate under ``torch.autocast`` to that dtype (the weights keep
    theirs).

    ``first_pass_tokens`` (< ``max_new_tokens``): each batch first generates that many tokens;
    only its rows without EOS by then go on, as a smaller batch, from where they stopped, up to
    ``max_new_tokens``. Greedy decoding makes that the same text as one long pass, and a batch no
    longer runs every row to ``max_new_tokens`` for one answer that does not stop (the reference
    protocol's 128 new tokens against answers of a few tokens).
    """
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator and deal_batches else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    batches = length_batches(formatter, examples, batch_size)
    mine = batches[rank::world] if world > 1 else batches
    was_training = model.training
    model.eval()
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.update(do_sample=False, num_beams=1, use_cache=True, eos_token_id=formatter.eos_id,
                      pad_token_id=formatter.pad_id, temperature=None, top_p=None, top_k=None)
    first = first_pass_tokens if first_pass_tokens and first_pass_tokens < max_new_tokens else max_new_tokens
    results: list[tuple[int, str]] = []
    bar = tqdm(mine, desc=desc, unit="batch", leave=False, disable=not progress or rank != 0)
    for batch in bar:
        prompts = [formatter.eval_prompt_ids(examples[i]) for i in batch]
        with _autocast(device, autocast_dtype):
            new = _generate(model, formatter, prompts, None, gen_config, first, device)
            late = [r for r, ids in enumerate(new) if len(ids) == first and formatter.eos_id not in ids]
            if late and first < max_new_tokens:
                more = _generate(model, formatter, [prompts[r] for r in late], [new[r] for r in late], gen_config,
                                 max_new_tokens - first, device)
                for r, ids in zip(late, more):
                    new[r] = new[r] + ids
        texts = formatter.tokenizer.batch_decode(new, skip_special_tokens=True)
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


def _generate(model, formatter: Formatter, prompts: list[list[int]], prefixes: list[list[int]] | None,
              gen_config, max_new_tokens: int, device) -> list[list[int]]:
    """The new token ids of each row (up to ``max_new_tokens``; rows that stopped end with EOS and
    padding), going on after ``prefixes`` (tokens already generated, all of one length) if given."""
    config = copy.copy(gen_config)
    config.max_new_tokens = max_new_tokens
    if formatter.kind == "causal":
        batch = formatter.collate_prompt_ids([p + (prefixes[r] if prefixes else []) for r, p in enumerate(prompts)])
        width = batch["input_ids"].shape[1]
        out = model.generate(**{k: v.to(device) for k, v in batch.items()}, generation_config=config)
        return [row.tolist() for row in out[:, width:]]
    batch = {k: v.to(device) for k, v in formatter.collate_prompt_ids(prompts).items()}
    start = model.generation_config.decoder_start_token_id
    start = formatter.pad_id if start is None else start
    decoder = [[start] + (prefixes[r] if prefixes else []) for r in range(len(prompts))]
    out = model.generate(**batch, decoder_input_ids=torch.tensor(decoder, dtype=torch.long, device=device),
                         generation_config=config)
    return [row.tolist() for row in out[:, len(decoder[0]):]]
