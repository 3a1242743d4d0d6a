"""Fusion: every merge rule, registered by name (``FUSION_RULES``) when this package is imported,
each declaring its parameters, and the one function that writes a fusion into an adapter.

A rule takes, for one parameter tensor, the ``base`` (e.g. the anchor of the last merge), a list
of ``deltas`` (updates relative to it, e.g. AIMMerging's Delta_in and Delta_out) and one weight
per delta, and returns the fused tensor (:mod:`aimmerging.fusion.rules`). :func:`fuse_in_place`
applies a rule to every LoRA parameter of a model: the one place where fused values are written
into an adapter in training, and only when every fused value is finite.
:func:`~aimmerging.fusion.lora.merge_adapters` merges whole adapters (the merging methods), in the
space of the weight updates ``B @ A`` (re-factored into rank r) or of the A and B tensors.

Registered (``aimmerging run --help`` lists each with its parameters and defaults):

* ``weighted-sum``: base + sum_i w_i delta_i (the reference's fusion; task arithmetic);
* ``ties``, ``dare``, ``magmax`` (:mod:`aimmerging.fusion.task_vectors`): TIES-Merging (``density``,
  ``majority_sign``), DARE (``rate``, ``seed``), MagMax;
* ``importance-mask`` (:mod:`aimmerging.fusion.importance`): Recurrent-KIF's importance-masked
  merge (``keep``, ``beta1``, ``beta2``), a rule with state (the importance EMAs of |w * grad|,
  gathered after every optimizer step by the method that uses it).

Adding a rule is one function (here or in the user's code) plus :func:`fusion_rule` (or
``FUSION_RULES.register``; keyword-only arguments with defaults are then its parameters).
"""

from __future__ import annotations

from .rules import (FUSION_RULES, FusionRule, Param, RuleState, call_kwargs, derive_seed, describe, fuse_in_place,
                    fusion_rule, given_params, optimizer_hook, resolve_params, rule_function, rule_name, rule_params,
                    rule_state, weighted_sum, write_if_finite)
from . import task_vectors  # noqa: E402  registers ties, dare, magmax
from . import importance  # noqa: E402  registers importance-mask
from .lora import SPACES, merge_adapters, refactor  # noqa: E402


def params_help() -> str:
    """Every registered rule with its parameters and defaults, for ``--help``."""
    return "; ".join(describe(name) for name in FUSION_RULES if rule_params(name))


__all__ = ["FUSION_RULES", "FusionRule", "Param", "RuleState", "SPACES", "call_kwargs", "derive_seed", "describe",
           "fuse_in_place", "fusion_rule", "given_params", "importance", "merge_adapters", "optimizer_hook",
           "params_help", "refactor", "resolve_params", "rule_function", "rule_name", "rule_params", "rule_state",
           "task_vectors", "weighted_sum", "write_if_finite"]
