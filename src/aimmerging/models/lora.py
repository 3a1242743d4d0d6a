"""LoRA adapters through PEFT, and the few tensor operations the methods need on them.

The trainable parameters of a run are exactly the LoRA matrices (every parameter whose name
contains ``lora_``); the base model is frozen. Methods read and write them as a list of tensors
in a fixed order (``lora_parameters``), which is also the order of every snapshot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError


def attach_lora(model, kind: str, r: int = 8, alpha: int = 32, dropout: float = 0.05,
                target_modules: list[str] | None = None):
    """Wrap ``model`` in a PEFT LoRA model. ``target_modules=None`` uses PEFT's per-architecture
    default (``q``/``v`` for T5, ``q_proj``/``v_proj`` for Llama-like models, ...)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=target_modules,
                        task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"cannot attach LoRA to model type '{model.config.model_type}': {msg}; "
                        "pass --lora-targets with the names of its attention projections") from None


def lora_parameters(model) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable LoRA parameters")
    return params


@torch.no_grad()
def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params, values) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


@torch.no_grad()
def l1_distance(params, reference) -> float:
    """Sum over all entries of |params - reference| (the learning signal's numerator)."""
    return float(sum((p - r).abs().sum(dtype=torch.float64) for p, r in zip(params, reference)))


@torch.no_grad()
def all_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def load_adapter_weights(model, directory: str | os.PathLike) -> None:
    """Load adapter weights saved with ``save_pretrained`` into an already wrapped model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{directory}: no adapter_model.safetensors (not a finished adapter)")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise UserError(f"{directory}: adapter does not match the model ({unexpected[0]} ...)")


@dataclass(frozen=True)
class LoraLayers:
    """How the trainable LoRA tensors (``view.params``, in order) form layers: ``pairs`` of indices
    (lora_A, lora_B) of one adapted layer, and ``others``, tensors that are not in such a pair."""

    pairs: tuple[tuple[int, int], ...]
    others: tuple[int, ...]


def lora_layers(model, params: Sequence[torch.Tensor]) -> LoraLayers:
    """Pair every ``...lora_A.<adapter>.weight`` (r x d_in) with its ``...lora_B.<adapter>.weight``
    (d_out x r) by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    index: dict[str, int] = {}
    for i, p in enumerate(params):
        if id(p) not in names:
            raise RuntimeError("a trainable LoRA tensor is not a parameter of the model")
        index[names[id(p)]] = i
    pairs, used = [], set()
    for name, i in index.items():
        if ".lora_A." not in name:
            continue
        j = index.get(name.replace(".lora_A.", ".lora_B."))
        a = params[i]
        if j is not None and a.dim() == 2 and params[j].dim() == 2 and params[j].shape[1] == a.shape[0]:
            pairs.append((i, j))
            used.update((i, j))
    return LoraLayers(tuple(pairs), tuple(i for i in range(len(params)) if i not in used))
