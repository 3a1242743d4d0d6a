"""LoRA adapters through PEFT, and the few tensor operations the methods need on them.

The trainable parameters of a run are exactly the LoRA matrices (every parameter whose name
contains ``lora_``); the base model is frozen. Methods read and write them as a list of tensors
in a fixed order (``lora_parameters``), which is also the order of every snapshot.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError, UserError


ALL_LINEAR = "all-linear"


def attach_lora(model, kind: str, r: int = 8, alpha: int = 32, dropout: float = 0.05,
                target_modules: list[str] | None = None):
    """Wrap ``model`` in a PEFT LoRA model. ``target_modules=None`` uses PEFT's per-architecture
    default (``q``/``v`` for T5, ``q_proj``/``v_proj`` for Llama-like models, ...); ``["all-linear"]``
    is PEFT's ``all-linear``: every linear layer except the output head."""
    from peft import LoraConfig, TaskType, get_peft_model

    if target_modules is not None and [t.lower() for t in target_modules] == [ALL_LINEAR]:
        target_modules = ALL_LINEAR  # PEFT's: every linear layer but the output head
    elif target_modules is not None:
        check_targets(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=target_modules,
                        task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"cannot attach LoRA to model type '{model.config.model_type}': {msg}; "
                        "pass --lora-targets with the names of its attention projections") from None


def adaptable_modules(model) -> list[str]:
    """The distinct names (last component) of the modules LoRA can adapt: leaf modules with a 2-D
    weight (linear and GPT-2 ``Conv1D`` projections, embeddings)."""
    names = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and not any(True for _ in module.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, targets: Sequence[str]) -> None:
    """Every requested LoRA target names at least one module of ``model`` (PEFT's rule: the full
    module name, or its ending after a dot); PEFT itself only fails when none matches."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        available = adaptable_modules(model)
        shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
        raise ConfigError(f"lora_targets: no module named {', '.join(repr(t) for t in missing)} in model type "
                          f"'{getattr(model.config, 'model_type', type(model).__name__)}' "
                          f"(modules LoRA can adapt: {shown or 'none'})")


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


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(peft_model, directory: str | os.PathLike) -> None:
    """``peft_model.save_pretrained(directory)``, with two fixes to what safetensors does:

    * an operating-system error while it writes the weights (a full disk: ``SafetensorError: Error
      while serializing: I/O error: No space left on device (os error 28)``) is an ``OSError``
      with that errno naming the file, as every other write gives (the CLI's "free some space and
      rerun the same command");
    * the weights file gets the mode the other files get (0666 less the umask): safetensors writes
      it to an owner-only temporary file that it renames, so it would stay 0600 whatever the umask."""
    from safetensors import SafetensorError

    from ..io import current_umask

    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        peft_model.save_pretrained(str(directory))
    except SafetensorError as e:
        error = safetensors_os_error(e, path)
        if error is e:
            raise
        raise error from e
    except OSError as e:  # PEFT's own files (adapter_config.json, README.md): name the folder at least
        if e.filename is None:
            e.filename = str(directory)
        raise
    if path.is_file():
        os.chmod(path, 0o666 & ~current_umask())


_OS_ERROR_CODE = re.compile(r"(?:os error |Os \{ code: )(\d+)")


def safetensors_os_error(e: Exception, path: str | os.PathLike) -> Exception:
    """The ``OSError`` a ``SafetensorError`` stands for (safetensors reports I/O errors as text:
    ``... (os error 28)``, or ``IoError(Os { code: 28, kind: StorageFull, ... })`` in older
    versions), naming ``path``; ``e`` itself when its text names no OS error."""
    m = _OS_ERROR_CODE.search(str(e))
    if not m:
        return e
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


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


@contextlib.contextmanager
def adapter_values(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]):
    """Give ``params`` the ``values`` for the block, then put the previous values back bit for bit.
    Written through ``p.data`` under no_grad: the version counters autograd checks for the tensors a
    pending backward saved are not bumped, and that backward sees the restored values."""
    with torch.no_grad():
        saved = [p.data.clone() for p in params]
        for p, v in zip(params, values):
            p.data.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
