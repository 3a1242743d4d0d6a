"""Merging LoRA adapters with a fusion rule, in the space of the weight updates ``B @ A`` or of the
A and B tensors (the ``--merge-space`` of the merging methods, ``aimmerging.methods.task_merging``,
whose docstring explains the choice), and the re-factoring of a merged update into rank r.

* :func:`merge_adapters`: ``base + rule(task vectors)`` for a whole adapter. In ``delta`` space,
  per adapted layer (a ``(lora_A, lora_B)`` index pair of ``layers.pairs``), the rule runs on the
  weight updates ``B @ A`` (float64, PEFT's constant scaling alpha / r left out: every rule is
  positively homogeneous in the deltas) and the result is re-factored by :func:`refactor`; the
  tensors of ``layers.others`` and, in ``params`` space, every tensor are merged entrywise.
* :func:`refactor`: the best rank-r factorisation ``B @ A`` of an update by truncated SVD
  (``A = V_r^T`` with orthonormal rows, ``B = U_r S_r``) and its relative residual.

``layers`` is anything with ``pairs`` and ``others`` (``aimmerging.models.lora.LoraLayers``);
the fusion package does not import the model layer.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Sequence

import torch

from .rules import rule_function

SPACES = ("delta", "params")
Adapter = Sequence[torch.Tensor]


class LayerPairs(Protocol):
    pairs: Sequence[tuple[int, int]]  # (index of lora_A, index of lora_B) of each adapted layer
    others: Sequence[int]  # the indices of every other LoRA tensor


@torch.no_grad()
def refactor(update: torch.Tensor, rank: int, fallback_a: Optional[torch.Tensor] = None):
    """``(A, B, residual)`` with ``B @ A`` the best rank-``rank`` approximation of ``update``
    (d_out x d_in): ``A = V_r^T`` (orthonormal rows), ``B = U_r S_r``; ``residual`` is
    ||update - B A||_F / ||update||_F (0 for a zero update). When ``rank`` exceeds min(d_out, d_in),
    the extra rows of A are those of ``fallback_a`` (zeros without it) and the extra columns of B
    are 0, so B @ A is still exact."""
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    k = min(rank, S.numel())
    if k < rank and fallback_a is not None:
        A = fallback_a.to(update.dtype).clone()
    else:
        A = update.new_zeros((rank, update.shape[1]))
    B = update.new_zeros((update.shape[0], rank))
    A[:k] = Vh[:k]
    B[:, :k] = U[:, :k] * S[:k]
    total = float(S.square().sum())
    residual = math.sqrt(max(0.0, float(S[k:].square().sum())) / total) if total > 0 else 0.0
    return A, B, residual


def _weight_update(adapter: Adapter, ia: int, ib: int) -> torch.Tensor:
    return adapter[ib].double() @ adapter[ia].double()


@torch.no_grad()
def merge_adapters(rule: str | Callable, base: Adapter, vectors: Sequence[tuple[Adapter, Adapter]],
                   weights: Sequence[float], layers: LayerPairs, space: str = "delta",
                   kwargs: Callable[[int], dict] = lambda call: {}) -> tuple[list[torch.Tensor], Optional[float]]:
    """The merged adapter ``base + rule(task vectors)``, each task vector given as ``(end, start)``
    (tau = end - start), in ``space`` (module docstring), and the largest relative SVD residual
    (``delta``; None in ``params``). ``kwargs(call)`` gives the rule's keyword arguments for its
    call-th call (layers in order, then the unpaired tensors)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    fn = rule_function(rule)
    out: list[Optional[torch.Tensor]] = [None] * len(base)
    call = 0
    residual: Optional[float] = None
    if space == "delta":
        residual = 0.0
        for ia, ib in layers.pairs:
            merged = fn(_weight_update(base, ia, ib),
                        [_weight_update(e, ia, ib) - _weight_update(s, ia, ib) for e, s in vectors], weights,
                        **kwargs(call))
            call += 1
            if not bool(torch.isfinite(merged).all()):  # the loop then keeps the trained adapter
                out[ia], out[ib] = torch.full_like(base[ia], math.nan), torch.full_like(base[ib], math.nan)
                residual = math.nan
                continue
            A, B, res = refactor(merged, base[ia].shape[0], fallback_a=base[ia])
            out[ia], out[ib] = A.to(base[ia].dtype), B.to(base[ib].dtype)
            residual = max(residual, res)
        elementwise = layers.others
    else:
        elementwise = tuple(range(len(base)))
    for i in elementwise:
        out[i] = fn(base[i], [e[i] - s[i] for e, s in vectors], weights, **kwargs(call)).to(base[i].dtype)
        call += 1
    return out, residual  # type: ignore[return-value]


__all__ = ["Adapter", "LayerPairs", "SPACES", "merge_adapters", "refactor"]
