"""Continual-learning methods, by name: the ``METHODS`` registry.

Built-in methods are the modules of this package, one file each, registered with
:func:`register_method` as they are imported (every module here is imported on first use, so a
new built-in method is one new file). A user's method registers the same way from its own module,
or is named by import path (``my_pkg.my_module:MyMethod``) on the command line and in YAML.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from ..errors import ConfigError
from ..registry import Registry
from .base import LossInputs, Method, StageInfo, TrainingView

METHODS: Registry[type[Method]] = Registry("method")
_NOT_METHODS = {"base"}
_loaded = False


def register_method(cls: type[Method] | None = None, *, name: str | None = None, replace: bool = False):
    """Class decorator: ``@register_method`` (under ``cls.name``) or ``@register_method(name="x")``."""

    def add(c: type[Method]) -> type[Method]:
        if not (isinstance(c, type) and issubclass(c, Method)):
            raise TypeError(f"{c!r} is not a subclass of aimmerging.methods.Method")
        key = name or c.name
        if not key:
            raise ValueError(f"{c.__name__}: set the class attribute `name` (the method's registry name)")
        if c.name != key:
            c.name = key
        METHODS.register(key, c, replace=replace)
        return c

    return add(cls) if cls is not None else add


def load_builtin_methods() -> None:
    """Import every module of this package once (each registers its methods)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{info.name}")


def builtin_names() -> list[str]:
    """The names of the methods that ship with aimmerging (not those a user registered)."""
    load_builtin_methods()
    return sorted(n for n, cls in METHODS.items() if cls.__module__.startswith(f"{__name__}."))


def import_user_module(name: str):
    """``importlib.import_module(name)``, also finding a module in the current directory as
    ``python -m`` and ``python script.py`` do (the ``aimmerging`` command does not put it on
    ``sys.path``): when ``name`` is not found elsewhere, the current directory is added to the end
    of ``sys.path`` (an installed package of the same name still wins) and the import retried."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = name.split(".")[0]
        cwd = os.getcwd()
        if e.name not in (top, name) or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(name)


def resolve_method(spec: str | type[Method] | Method) -> type[Method]:
    """The method class for a registered name, an import path ``module:Class`` (or
    ``module.Class``), a Method subclass or a Method instance."""
    if isinstance(spec, Method):
        return type(spec)
    if isinstance(spec, type):
        if not issubclass(spec, Method):
            raise ConfigError(f"method: {spec.__name__} is not a subclass of aimmerging.methods.Method")
        return spec
    load_builtin_methods()
    if spec in METHODS:
        return METHODS.get(spec)
    if ":" in spec or "." in spec:
        module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
        try:
            module = import_user_module(module_name)
        except ImportError as e:
            raise ConfigError(f"method '{spec}': cannot import module '{module_name}' ({e})") from None
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method '{spec}': '{attr}' in {module_name} is not a subclass of aimmerging.methods.Method")
        return cls
    return METHODS.get(spec)  # the one-line "unknown method" error with close matches


__all__ = ["METHODS", "LossInputs", "Method", "StageInfo", "TrainingView", "builtin_names", "load_builtin_methods",
           "register_method", "resolve_method"]
