"""Fusion rules: stateless functions on adapter tensors, registered by name (``FUSION_RULES``).

A rule takes, for one parameter tensor, the ``base`` (e.g. the anchor of the last merge), a list
of ``deltas`` (updates relative to it, e.g. AIMMerging's Delta_in and Delta_out) and one weight
per delta, and returns the fused tensor. :func:`fuse_in_place` applies a rule to every LoRA
parameter of a model: the one place where fused values are written into an adapter, and only when
every fused value is finite.

Registered: ``weighted-sum`` (the reference's fusion: base + sum_i w_i delta_i). The merging
baselines of later work (TIES, DARE) fit the same signature and can use ``peft.utils.merge_utils``.
Adding a rule is one function here (or in the user's code) plus ``FUSION_RULES.register``.
Recurrent-KIF's importance-masked fusion (:mod:`aimmerging.fusion.importance`) is not a registered
rule: it needs every entry's importance and a threshold over all tensors, not two scalar weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..registry import Registry

FusionRule = Callable[[torch.Tensor, Sequence[torch.Tensor], Sequence[float]], torch.Tensor]
FUSION_RULES: Registry[FusionRule] = Registry("fusion rule")


@FUSION_RULES.register("weighted-sum")
def weighted_sum(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """base + w_1 delta_1 + w_2 delta_2 + ..., summed left to right."""
    out = base
    for w, d in zip(weights, deltas, strict=True):
        out = out + w * d
    return out


@torch.no_grad()
def fuse_in_place(params, anchor, theta_k, w_in: float, w_out: float, rule: str | FusionRule = "weighted-sum") -> bool:
    """AIMMerging fusion, in place, with ``rule`` (default the reference's):
    theta <- anchor + w_in * (theta_k - anchor) + w_out * (theta - theta_k).

    ``theta_k`` is the adapter before the replay steps (so theta_k - anchor is the new-task update
    Delta_in) and the current ``params`` are the adapter after them (theta - theta_k = Delta_out).

    Returns True when the fused values were written. When any fused value is not finite (NaN,
    +-inf) nothing is written and it returns False: ``params`` keep their values and the caller
    chooses the fall-back (AIMMerging: theta_k).
    """
    fn = FUSION_RULES.get(rule) if isinstance(rule, str) else rule
    fused = [fn(a, [k - a, p - k], [w_in, w_out]) for p, a, k in zip(params, anchor, theta_k)]
    if not all(bool(torch.isfinite(t).all()) for t in fused):
        return False
    for p, t in zip(params, fused):
        p.copy_(t)
    return True
