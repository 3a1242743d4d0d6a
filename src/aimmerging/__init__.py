"""aimmerging: continual LoRA fine-tuning with Adaptive Iterative Model Merging (AIMMerging).

The public API (see the README's "Python API")::

    import aimmerging
    result = aimmerging.run(stream, method="aimmerging", model="tiny-causal", max_steps=8)

Importing ``aimmerging`` is cheap: the names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": ("aimmerging.api", "run"),
    "RunResult": ("aimmerging.runs.results", "RunResult"),
    "TaskStream": ("aimmerging.data.stream", "TaskStream"),
    "Example": ("aimmerging.data.olora", "Example"),
    "ReplayMemory": ("aimmerging.data.memory", "ReplayMemory"),
    "Method": ("aimmerging.methods.base", "Method"),
    "TrainingView": ("aimmerging.methods.base", "TrainingView"),
    "LossInputs": ("aimmerging.methods.base", "LossInputs"),
    "register_method": ("aimmerging.methods", "register_method"),
    "METHODS": ("aimmerging.methods", "METHODS"),
    "SCHEDULES": ("aimmerging.controller", "SCHEDULES"),
    "FUSION_RULES": ("aimmerging.fusion", "FUSION_RULES"),
    "ControllerConfig": ("aimmerging.controller", "ControllerConfig"),
    "MergeController": ("aimmerging.controller", "MergeController"),
    "option": ("aimmerging.settings", "option"),
    "UserError": ("aimmerging.errors", "UserError"),
    "ConfigError": ("aimmerging.errors", "ConfigError"),
    "DataError": ("aimmerging.errors", "DataError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        if name == "METHODS":
            from .methods import load_builtin_methods

            load_builtin_methods()
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aimmerging' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .api import run
    from .controller import SCHEDULES, ControllerConfig, MergeController
    from .data.memory import ReplayMemory
    from .data.olora import Example
    from .data.stream import TaskStream
    from .errors import ConfigError, DataError, UserError
    from .fusion import FUSION_RULES
    from .methods import METHODS, register_method
    from .methods.base import LossInputs, Method, TrainingView
    from .runs.results import RunResult
    from .settings import option
