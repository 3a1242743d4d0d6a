"""Merge rules on task vectors: TIES, DARE and MagMax, as stateless fusion rules.

Each rule has the fusion-rule signature of :mod:`aimmerging.fusion`, ``(base, deltas, weights) ->
tensor``, for one tensor: ``base`` is what the merged update is added to, ``deltas`` are the task
vectors (all of one shape) and ``weights`` one number per task vector. Importing this module
registers them in ``FUSION_RULES`` (``ties``, ``dare``, ``magmax``; task arithmetic is
``weighted-sum``); ``aimmerging.fusion`` imports it, so every user of the package (``--fusion`` of
AIMMerging, ``aimmerging.hf``, the merging methods) sees them. Rule-specific parameters are
keyword-only arguments with defaults, so the plain three-argument call works, and each is declared
(:class:`~aimmerging.fusion.rules.Param`) so that ``--fusion-params`` reaches it, checked.

The rules are elementwise on whatever tensors they are given: they know nothing of LoRA. The
merging methods (:mod:`aimmerging.methods.task_merging`) decide the space (the weight update
``B @ A`` of each adapted layer, or the ``A`` and ``B`` matrices themselves) and call them per
tensor. Every rule is positively homogeneous in the deltas (trimming, sign election and
maximum-magnitude selection do not change when all deltas are scaled by c > 0; the means and sums
scale by c), so a constant factor common to all deltas, such as PEFT's LoRA scaling alpha / r,
can be left out and applied afterwards.

* ``ties`` (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
  Models"): trim every delta to its ``density`` fraction of largest magnitudes (PEFT's
  ``magnitude_based_pruning``: k = floor(density x numel) entries kept, per tensor), elect the sign
  of every entry by the sign of the sum of the trimmed deltas (``majority_sign="total"``, the
  paper's "mass"; ``"frequency"`` counts signs instead), and average, per entry, only the trimmed
  deltas that agree with the elected sign (disjoint mean; an entry nobody keeps stays 0). Built
  from ``peft.utils.merge_utils`` (``magnitude_based_pruning``, ``calculate_majority_sign_mask``,
  ``disjoint_merge``): the same computation as ``merge_utils.ties``, minus its warning at
  density 1. The weights multiply each trimmed delta before the disjoint mean, as in PEFT (the
  sign election uses the unweighted trimmed deltas); equal weights lambda give the paper's
  ``theta_init + lambda * tau_m``. An entry whose summed sign mass is exactly 0 elects +, as in
  PEFT (the TIES reference code uses the sign of the total mass of the whole vector there).
  Trimming is per tensor, as in PEFT; the paper trims the flattened task vector of the whole model.
* ``dare`` (Yu et al., ICML 2024, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch"): drop every entry of every delta with probability ``rate``
  and rescale the kept ones by 1 / (1 - rate), then add the weighted sum (task arithmetic). The
  Bernoulli masks come from a CPU ``torch.Generator`` seeded with ``seed`` (the deltas in order,
  one generator for the call), not from torch's global RNG as ``merge_utils.dare_linear`` does:
  the result is the same on every device and process and the training RNG is left alone. The
  weighted sum is ``merge_utils.task_arithmetic``.
* ``magmax`` (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual
  Learning"): for every entry, the delta of largest magnitude, times its weight (equal weights
  lambda give the paper's ``theta_0 + lambda * tau_MagMax``). Selection is on the unweighted
  magnitudes; on a tie the later delta wins (``>=``, as the MagMax reference code's
  ``merge_max_abs``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .rules import Param, fusion_rule

SIGN_METHODS = ("total", "frequency")


def _check(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not deltas:
        raise ValueError("at least one delta is needed")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    shape = deltas[0].shape
    if any(d.shape != shape for d in deltas):
        raise ValueError("all deltas must have the same shape")


def _weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(w) for w in weights], dtype=like.dtype, device=like.device)


@fusion_rule("ties",
             Param("density", float, 0.2, "fraction of each delta's entries kept (largest magnitudes)",
                   lambda v: 0 <= v <= 1, "be in [0, 1]"),
             Param("majority_sign", str, "total", "sign election by the summed mass or by counting signs",
                   choices=SIGN_METHODS))
def ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, density: float = 0.2,
         majority_sign: str = "total") -> torch.Tensor:
    """base + disjoint mean of the weighted trimmed deltas that agree with the elected sign."""
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, magnitude_based_pruning

    _check(deltas, weights)
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if majority_sign not in SIGN_METHODS:
        raise ValueError(f"majority_sign must be one of {SIGN_METHODS}, got {majority_sign!r}")
    trimmed = torch.stack([d if density >= 1 else magnitude_based_pruning(d, density) for d in deltas])
    agree = calculate_majority_sign_mask(trimmed, method=majority_sign)
    w = _weights(weights, trimmed).view((-1,) + (1,) * (trimmed.dim() - 1))
    return base + disjoint_merge(trimmed * w, agree)


def dare_masks(shape: torch.Size, n: int, rate: float, seed: int) -> list[torch.Tensor]:
    """The ``n`` keep-masks (float 0/1, CPU) ``dare`` draws for deltas of ``shape``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    keep = torch.full(tuple(shape), 1.0 - rate, dtype=torch.float32)
    return [torch.bernoulli(keep, generator=g) for _ in range(n)]


@fusion_rule("dare",
             Param("rate", float, 0.5, "probability of dropping each entry (the rest rescaled by 1/(1-rate))",
                   lambda v: 0 <= v < 1, "be in [0, 1)"),
             Param("seed", int, 0, "seed of the drop masks", lambda v: 0 <= v < 2**63, "be in [0, 2**63)", seed=True))
def dare(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, rate: float = 0.5,
         seed: int = 0) -> torch.Tensor:
    """base + sum_i w_i * (m_i * delta_i) / (1 - rate), m_i ~ Bernoulli(1 - rate) entrywise (seeded)."""
    from peft.utils.merge_utils import task_arithmetic

    _check(deltas, weights)
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if rate == 0:
        dropped = list(deltas)
    else:
        masks = dare_masks(deltas[0].shape, len(deltas), rate, seed)
        dropped = [d * m.to(device=d.device, dtype=d.dtype) / (1.0 - rate) for d, m in zip(deltas, masks)]
    return base + task_arithmetic(dropped, _weights(weights, dropped[0]))


@fusion_rule("magmax")
def magmax(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """base + w_k * delta_k entrywise, k = argmax_i |delta_i| (the later delta on a tie)."""
    _check(deltas, weights)
    best = deltas[0]
    out = float(weights[0]) * deltas[0]
    for d, w in zip(deltas[1:], weights[1:]):
        take = d.abs() >= best.abs()
        best = torch.where(take, d, best)
        out = torch.where(take, float(w) * d, out)
    return base + out


__all__ = ["SIGN_METHODS", "dare", "dare_masks", "magmax", "ties"]
