"""Sharding the frozen base model over processes with torch's FSDP2 (``fully_shard``).

What is sharded is the base model's weights (what makes a 7B or 13B base too big for one
device); the LoRA tensors are left out of the sharding (``ignored_params``) and stay whole on
every process. So every tensor a method reads or writes (the merges' fusion, the learning
signal's L1 norm, snapshots, saving and loading an adapter) is a plain tensor holding the whole
adapter, as under one process or DDP, and no merge ever needs a gather: the guarantee that
one process and N processes compute the same merges rests on the gradients alone, which the
engine averages over the processes itself, as DDP would (they are a few MB). The LoRA tensors and their AdamW
moments are a small fraction of the memory of a large base (r=8 on q,v of a 7B Llama: 4.2 M
parameters, 50 MB with their moments in fp32).

FSDP2 all-gathers a block's weights in every forward pass: every process must run the same
forward passes (the engine's stand-in examples see to it in training; evaluation runs every
generation batch on every process).
"""

from __future__ import annotations

from ..errors import ConfigError


def shard_base(peft_model, device) -> int:
    """Shard the frozen weights of ``peft_model``'s base model in place over the processes of the
    default process group: one FSDP2 unit per transformer block (the model's ``_no_split_modules``,
    e.g. ``LlamaDecoderLayer``, ``T5Block``) and the rest (embeddings, final norm, output head) in
    the root unit, the transformers model itself. The trainable (LoRA) parameters are ignored by
    FSDP: they stay plain tensors, whole on every process. ``generate`` is registered as a forward
    method of the root, so that generation gathers the root's weights as a forward pass does.
    Returns the number of blocks sharded."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    inner = peft_model.get_base_model()
    block_names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in inner.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError(f"fsdp: model type '{getattr(inner.config, 'model_type', type(inner).__name__)}' names no "
                          "transformer block to shard (no _no_split_modules); run without --fsdp")
    peft_model.to(device)
    trainable = {p for p in peft_model.parameters() if p.requires_grad}
    for block in blocks:
        fully_shard(block, ignored_params=trainable & set(block.parameters()))
    fully_shard(inner, ignored_params=trainable)
    register_fsdp_forward_method(inner, "generate")
    return len(blocks)
