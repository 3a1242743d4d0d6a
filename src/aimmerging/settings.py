"""Declaring options once: a dataclass field with its help text (and choices) in the metadata.

``RunConfig``, the merge controller's ``ControllerConfig`` and every method's ``Settings``
declare their options with :func:`option`; the CLI turns each into a flag (``lora_r`` ->
``--lora-r``), YAML files use the same names, and :func:`coerce` converts a flag or YAML value
to the field's type. An option may also declare the range its value must lie in (``ge=0``,
``gt=0, le=1``, ``finite=True``): a dataclass deriving from :class:`Bounded` checks every such
range after ``__init__`` (a ValueError such as ``lwf_alpha: must be >= 0``), and ``--help``
states it. Pure Python (the controller imports it).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Callable, Union

from .errors import ConfigError


# The largest magnitude an integer option may have unless it states its own ``maximum``: every
# count, step number and size in aimmerging is far below it, and a larger value (``2**63``, a YAML
# ``9e99``) would only overflow a C integer or an allocation deep inside torch.
INT_LIMIT = 10**9


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range an option's value must lie in: a lower end (``gt``, or ``ge`` inclusive), an upper
    end (``lt``, or ``le`` inclusive) and, for a float open at one end or both, ``finite``. Its text
    is the rule in a message: ``must be >= 0``, ``must be in (0, 1]``, ``must be a finite number``."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = False

    def __post_init__(self) -> None:
        if (self.gt is not None and self.ge is not None) or (self.lt is not None and self.le is not None):
            raise TypeError("an option's bounds: give gt or ge, lt or le, not both")

    def admits(self, value) -> bool:
        """Whether ``value`` lies in the range (NaN never does: every comparison with it is False)."""
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)
                and (not self.finite or math.isfinite(value)))

    def __str__(self) -> str:
        low = self.gt if self.gt is not None else self.ge
        high = self.lt if self.lt is not None else self.le
        if low is not None and high is not None:
            rule = f"in {'(' if self.gt is not None else '['}{low}, {high}{')' if self.lt is not None else ']'}"
        else:
            ends = [f"> {self.gt}" if self.gt is not None else f">= {self.ge}" if self.ge is not None else None,
                    f"< {self.lt}" if self.lt is not None else f"<= {self.le}" if self.le is not None else None]
            rule = " ".join(x for x in ["a finite number" if self.finite else None, *ends] if x)
        return f"must be {rule}"


def option(default: Any, help: str, choices: tuple | Callable[[], tuple] | None = None, group: str | None = None,
           maximum: int | None = None, pairs: str | None = None, *, gt: float | None = None,
           ge: float | None = None, lt: float | None = None, le: float | None = None, finite: bool = False):
    """A dataclass field carrying ``help``, ``choices`` (a tuple, or a callable returning one, for
    names read from a registry), an optional ``group`` for ``--help``, for an integer option, its
    ``maximum`` (default :data:`INT_LIMIT`; :func:`coerce` refuses a larger value), for a dict
    option, how its pairs are spelled in a message (default ``TASK=VALUE``) and the range its value
    must lie in (:class:`Bounds`, checked by :class:`Bounded`, added to the help text)."""
    bounds = Bounds(gt=gt, ge=ge, lt=lt, le=le, finite=finite)
    if bounds == Bounds():
        bounds = None
    else:
        help = f"{help}; {bounds}"
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "maximum": maximum,
                                            "pairs": pairs, "bounds": bounds})


def check_bounds(obj) -> None:
    """Every option of dataclass ``obj`` that declares bounds holds a value within them (a value of
    None, an unset optional option, is not checked); a ValueError ``name: must be ...`` otherwise."""
    for f in fields(obj):
        bounds = f.metadata.get("bounds")
        value = getattr(obj, f.name)
        if bounds is not None and value is not None and not bounds.admits(value):
            raise ValueError(f"{f.name}: {bounds}")


class Bounded:
    """Base of an options dataclass whose options declare bounds: its ``__post_init__`` checks
    them (:func:`check_bounds`). A subclass with rules across fields checks them after calling
    ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        check_bounds(self)


def int_limit(cls, name: str) -> int:
    """The largest value integer option ``name`` of dataclass ``cls`` accepts (its magnitude, for
    the rare option that may be negative)."""
    f = next((f for f in fields(cls) if f.name == name), None)
    limit = f.metadata.get("maximum") if f is not None else None
    return INT_LIMIT if limit is None else limit


def choices_of(f: dataclasses.Field) -> tuple | None:
    c = f.metadata.get("choices")
    return c() if callable(c) else c


def option_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls) if f.metadata.get("help") is not None}


def base_type(cls, name: str):
    """The field's type without ``Optional``."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def is_optional(cls, name: str) -> bool:
    hint = typing.get_type_hints(cls)[name]
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def coerce(cls, name: str, value: Any) -> Any:
    """Convert a YAML or flag value to the type of field ``name`` of dataclass ``cls``; a value
    that does not fit (or a non-finite float) is a ConfigError naming the option."""
    base = base_type(cls, name)
    if value is None:
        if is_optional(cls, name):
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
            limit = int_limit(cls, name)
            if not -limit <= number <= limit:
                bound = f"<= {limit}" if number > 0 else f">= -{limit}"
                raise ConfigError(f"{name}: must be {bound}, got {value if isinstance(value, str) else repr(value)}")
            return number
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{name}: must be a finite number, got {value!r}")
            return number
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError
            items = [x.strip() for x in items if x.strip()]
            return items or None
        if base is dict:
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()} or None
    except (TypeError, ValueError, OverflowError):
        pass
    f = option_fields(cls).get(name)
    pairs = (f.metadata.get("pairs") if f is not None else None) or "TASK=VALUE"
    kind = {list: "a comma-separated list", dict: f"{pairs} pairs"}.get(origin or base,
                                                                      getattr(base, "__name__", str(base)))
    raise ConfigError(f"{name}: expected {kind}, got {value!r}")


def check_choices(obj) -> None:
    """Every field with choices holds one of them (ConfigError otherwise)."""
    for f in fields(obj):
        allowed = choices_of(f)
        value = getattr(obj, f.name)
        if allowed and value not in allowed:
            raise ConfigError(f"{f.name}: '{value}' is not one of {', '.join(allowed)}")


def build(cls, values: dict[str, Any], origin: str = "settings"):
    """An instance of ``cls`` from ``values`` (coerced); a ValueError of its ``__post_init__``
    becomes a ConfigError."""
    kwargs = {k: coerce(cls, k, v) for k, v in values.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{origin}: {e}") from None
    check_choices(obj)
    return obj


def defaults(cls) -> dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out

