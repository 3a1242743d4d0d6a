"""The fusion-rule registry (``FUSION_RULES``), how a rule declares its parameters, and the
reference's rule, ``weighted-sum``.

A rule is a function on one tensor, ``rule(base, deltas, weights, **params) -> tensor``: ``base``
is what the merged update is added to, ``deltas`` the updates (task vectors) relative to it and
``weights`` one number per delta. :func:`fusion_rule` registers one with its parameters, each a
:class:`Param` (name, type, default, help, the values it allows); :func:`resolve_params` checks
what a user gives (``--fusion-params rate=0.3,seed=1``, ``fusion_params={"rate": 0.3}``) against
them and fills in the defaults, so an unknown name or a bad value is one line before anything runs.
A function registered with plain ``FUSION_RULES.register(name, fn)`` (a user's rule) declares its
keyword-only arguments with defaults as its parameters (type: that of the default).

A rule may need state gathered during training (``importance-mask``: the importance of every
entry, from every optimizer step): it declares ``state``, a factory ``state(**params)`` of a
:class:`RuleState`. A method that offers the rule creates the state when the rule is chosen, calls
``observe`` after every optimizer step (with ``phase`` set to ``"inner"`` for task steps and
``"outer"`` for replay steps), and hands it to :func:`aimmerging.fusion.fuse_in_place`, which
calls the rule on each tensor with the keyword arguments ``tensor_kwargs`` gives (the rule's own
parameters configure the state, not the per-tensor call) and then ``merged``.

A parameter declared with ``seed=True`` is the seed of a random rule (DARE): ``fuse_in_place``
gives each tensor and each merge its own seed, derived by :func:`derive_seed` from the user's
seed, the caller's ``salt`` (one per merge) and the tensor's index, so no two tensors and no two
merges share a drop mask.
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch

from ..errors import ConfigError
from ..registry import Registry

FusionRule = Callable[..., torch.Tensor]  # (base, deltas, weights, **params) -> tensor
FUSION_RULES: Registry[FusionRule] = Registry("fusion rule")
PARAM_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One parameter of a fusion rule. ``check`` (a predicate on the converted value) with
    ``must`` (what it requires, for the message: ``"be in [0, 1)"``), or ``choices``."""

    name: str
    type: type
    default: Any
    help: str = ""
    check: Optional[Callable[[Any], bool]] = None
    must: str = ""
    choices: tuple = ()
    seed: bool = False  # a random seed: derived per tensor and per merge by fuse_in_place

    def convert(self, value: Any, rule: str) -> Any:
        """``value`` (a string from the command line, or a typed value) as this parameter's type;
        a value that does not fit is a one-line ConfigError naming the rule and the parameter."""
        where = f"fusion_params: {self.name} of fusion rule '{rule}'"
        try:
            if self.type is bool:
                if isinstance(value, bool):
                    out: Any = value
                elif isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                    out = value.lower() in ("true", "yes", "1")
                else:
                    raise ValueError
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
                if not math.isfinite(out):
                    raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            else:
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise ValueError
                out = str(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {self.type.__name__}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"{where}: '{out}' is not one of {', '.join(map(str, self.choices))}")
        if self.check is not None and not self.check(out):
            raise ConfigError(f"{where}: must {self.must or 'be valid'}, got {out!r}")
        return out


class RuleState(Protocol):
    """What a rule with state keeps between merges (module docstring)."""

    phase: str  # "inner" (task steps) or "outer" (replay steps): which optimizer steps observe() sees

    def observe(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> None: ...

    def tensor_kwargs(self, params: Sequence[torch.Tensor]) -> list[dict]: ...

    def merged(self) -> None: ...


def fusion_rule(name: str, *params: Param, state: Optional[Callable[..., RuleState]] = None):
    """Decorator: register ``fn`` as fusion rule ``name`` with its declared ``params`` (and the
    factory of its ``state``, for a rule that needs one)."""

    def add(fn: FusionRule) -> FusionRule:
        fn.fusion_params = tuple(params)  # type: ignore[attr-defined]
        fn.fusion_state = state  # type: ignore[attr-defined]
        return FUSION_RULES.register(name, fn)

    return add


def rule_function(rule: str | FusionRule) -> FusionRule:
    return FUSION_RULES.get(rule) if isinstance(rule, str) else rule


def rule_name(rule: str | FusionRule) -> str:
    return rule if isinstance(rule, str) else getattr(rule, "__name__", repr(rule))


def rule_params(rule: str | FusionRule) -> tuple[Param, ...]:
    """The declared parameters of ``rule``; for an undeclared function, its keyword-only
    arguments with a default of a plain type (bool, int, float, str)."""
    fn = rule_function(rule)
    declared = getattr(fn, "fusion_params", None)
    if declared is not None:
        return tuple(declared)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()
    return tuple(Param(p.name, type(p.default), p.default) for p in sig.parameters.values()
                 if p.kind is p.KEYWORD_ONLY and type(p.default) in PARAM_TYPES)


def rule_state(rule: str | FusionRule) -> Optional[Callable[..., RuleState]]:
    """The factory of the rule's state, or None for a stateless rule."""
    return getattr(rule_function(rule), "fusion_state", None)


def resolve_params(rule: str | FusionRule, given: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Every parameter of ``rule``: its default, or the converted and checked value in ``given``.
    An unknown name or a bad value is a one-line ConfigError."""
    name = rule_name(rule)
    declared = {p.name: p for p in rule_params(rule)}
    if given is not None and not isinstance(given, Mapping):
        raise ConfigError(f"fusion_params: expected NAME=VALUE pairs (a mapping), got {given!r}")
    given = dict(given or {})
    unknown = sorted(str(k) for k in given if k not in declared)
    if unknown:
        known = f"its parameters: {', '.join(declared)}" if declared else "it has no parameters"
        raise ConfigError(f"fusion_params: unknown parameter {', '.join(unknown)} of fusion rule '{name}' ({known})")
    return {p: (spec.convert(given[p], name) if p in given else spec.default) for p, spec in declared.items()}


def given_params(rule: str | FusionRule, given: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The parameters a user set (converted and checked), without the defaults; None if none:
    what a config records."""
    if not given:
        return None
    values = resolve_params(rule, given)
    return {k: values[k] for k in given}


def describe(rule: str | FusionRule) -> str:
    """``name(p=default, ...)`` for ``--help``."""
    params = rule_params(rule)
    inner = ", ".join(f"{p.name}={p.default}" for p in params)
    return f"{rule_name(rule)}({inner})" if params else rule_name(rule)


def derive_seed(seed: int, salt: Any, index: int) -> int:
    """The seed tensor ``index`` of a merge gets from the user's ``seed`` and the merge's ``salt``
    (the same on every process and platform: ``random.Random`` of a string hashes it with SHA-512)."""
    return random.Random(f"{seed}-{salt}-{index}").getrandbits(63)


def call_kwargs(rule: str | FusionRule, values: Mapping[str, Any], salt: Any, index: int) -> dict[str, Any]:
    """The keyword arguments of the rule's call on tensor ``index``: ``values`` with every seed
    parameter derived (:func:`derive_seed`)."""
    seeds = {p.name for p in rule_params(rule) if p.seed}
    return {k: (derive_seed(v, salt, index) if k in seeds else v) for k, v in values.items()}


@fusion_rule("weighted-sum")
def weighted_sum(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence) -> torch.Tensor:
    """base + w_1 delta_1 + w_2 delta_2 + ..., summed left to right (the reference's order; PEFT's
    ``task_arithmetic`` sums the weighted deltas first, which differs in the last bits)."""
    out = base
    for w, d in zip(weights, deltas, strict=True):
        out = out + w * d
    return out


@torch.no_grad()
def write_if_finite(params: Sequence[torch.Tensor], fused: Sequence[torch.Tensor]) -> bool:
    """Copy ``fused`` into ``params`` when every value is finite and return True; else write
    nothing and return False."""
    if not all(bool(torch.isfinite(t).all()) for t in fused):
        return False
    for p, t in zip(params, fused, strict=True):
        p.copy_(t)
    return True


@torch.no_grad()
def fuse_in_place(params, anchor, theta_k, w_in: float, w_out: float, rule: str | FusionRule = "weighted-sum",
                  rule_params: Optional[Mapping[str, Any]] = None, *, state: Optional[RuleState] = None,
                  salt: Any = 0) -> bool:
    """AIMMerging fusion, in place, with ``rule`` (default the reference's):
    theta <- anchor + w_in * (theta_k - anchor) + w_out * (theta - theta_k), per tensor.

    ``theta_k`` is the adapter before the replay steps (so theta_k - anchor is the new-task update
    Delta_in) and the current ``params`` are the adapter after them (theta - theta_k = Delta_out).
    ``rule_params`` are the rule's parameters (checked; defaults for the rest); ``state`` the
    rule's state, for a rule that has one (module docstring), told ``merged()`` after the
    fusion, written or not; ``salt`` makes the seeds of a random rule differ from merge to merge.

    Returns True when the fused values were written. When any fused value is not finite (NaN,
    +-inf) nothing is written and it returns False: ``params`` keep their values and the caller
    chooses the fall-back (AIMMerging: theta_k).
    """
    fn = rule_function(rule)
    if rule_state(rule) is not None:
        if state is None:
            raise ConfigError(f"fusion rule '{rule_name(rule)}' needs state gathered during training (every optimizer "
                              "step), which this caller does not gather")
        kwargs = state.tensor_kwargs(params)
    else:
        values = resolve_params(rule, rule_params)
        kwargs = [call_kwargs(rule, values, salt, i) for i in range(len(params))]
    fused = [fn(a, [k - a, p - k], [w_in, w_out], **kw) for p, a, k, kw in zip(params, anchor, theta_k, kwargs)]
    if state is not None:
        state.merged()
    return write_if_finite(params, fused)


def optimizer_hook(state: RuleState, params: Sequence[torch.Tensor]):
    """An ``optimizer.register_step_post_hook`` function that feeds ``state`` the parameters after
    each optimizer step and that step's gradients (after clipping, before ``zero_grad``); a step
    the engine skips (non-finite loss or gradient) never reaches ``optimizer.step`` and is not seen."""

    def hook(optimizer, args, kwargs) -> None:
        state.observe(params, [p.grad for p in params])

    return hook


__all__ = ["FUSION_RULES", "FusionRule", "Param", "RuleState", "call_kwargs", "derive_seed", "describe",
           "fuse_in_place", "fusion_rule", "given_params", "optimizer_hook", "resolve_params", "rule_function",
           "rule_name", "rule_params", "rule_state", "weighted_sum", "write_if_finite"]
