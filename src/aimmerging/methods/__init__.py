"""Continual-learning methods by name."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .baselines import MultiTask, Replay, Sequential, SingleTask
from .merging import MergeEnd, MergeFixed, Merging

METHODS: dict[str, type[Method]] = {m.name: m for m in (Sequential, Replay, MultiTask, SingleTask, Merging, MergeFixed, MergeEnd)}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(METHODS)})") from None
