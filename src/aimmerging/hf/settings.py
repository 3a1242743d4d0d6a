"""A method object for the Trainer host from what a user hands ``ContinualCallback`` or
``train_stream``: a registered name, a ``Method`` class, ``module:Class``, or an instance, with
its own options checked as the command line checks them (one line when unknown or bad)."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Mapping, Optional

from ..errors import ConfigError
from ..methods import Method, resolve_method
from ..settings import build, option_fields


def make_method(method: Any, settings: Optional[Mapping[str, Any]] = None, options: Optional[Mapping[str, Any]] = None,
                n_tasks: Optional[int] = None) -> Method:
    """The method object: ``method`` itself when it is an instance (then no options), else the
    class resolved and built with ``settings`` and ``options`` (options win). A method that
    trains all tasks in one stage (``mtl``) cannot run in a per-task trainer and is refused.
    ``n_tasks`` goes to ``adapter_rank_multiplier`` (O-LoRA's one slot per task)."""
    values = {**dict(settings or {}), **dict(options or {})}
    if isinstance(method, Method):
        if values:
            raise ConfigError(f"method '{method.name}' is given as an object: set its options on it "
                              f"(method.settings), not as {', '.join(sorted(values))}")
        obj = method
    else:
        if not (isinstance(method, str) or (isinstance(method, type) and issubclass(method, Method))):
            raise ConfigError(f"method: expected a name, a Method subclass or instance, got {method!r}")
        cls = resolve_method(method)
        known = option_fields(cls.Settings) if cls.Settings is not None else {}
        unknown = sorted(set(values) - set(known))
        if unknown:
            listed = f"options: {', '.join(known)}" if known else "it has no options"
            raise ConfigError(f"method '{cls.name}': unknown option(s) {', '.join(unknown)} ({listed})")
        obj = cls(build(cls.Settings, values, origin=f"{cls.name} settings") if cls.Settings is not None else None)
    if obj.joint:
        raise ConfigError(f"method '{obj.name}' trains one stage on all tasks together, which a trainer per task "
                          f"cannot do; run it with `aimmerging run --method {obj.name}`")
    if n_tasks is not None:
        obj.adapter_rank_multiplier(int(n_tasks))
    return obj


def settings_mapping(config: Any) -> Optional[Mapping[str, Any]]:
    """A method's options from ``config``: None, a mapping, or a settings dataclass (a ControllerConfig)."""
    if config is None or isinstance(config, Mapping):
        return config
    if is_dataclass(config):
        return asdict(config)
    raise ConfigError(f"config: expected a ControllerConfig or a mapping, got {type(config).__name__}")
