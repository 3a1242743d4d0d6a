"""A name -> object registry, one per kind of plug-in (methods, merge schedules, fusion rules).

Every name lives in exactly one registry; the CLI's choices, ``--help``, YAML validation, the
bench's method list and the README tables read them. Unknown names are a one-line
:class:`~aimmerging.errors.ConfigError` with close matches suggested.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False):
        """``registry.register(name, obj)``, or ``@registry.register(name)`` as a decorator."""

        def add(item: T) -> T:
            if not name or not isinstance(name, str):
                raise ValueError(f"a {self.kind} needs a non-empty name")
            if name in self._items and self._items[name] is not item and not replace:
                raise ValueError(f"{self.kind} '{name}' is already registered ({self._items[name]!r})")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and interactive sessions; unknown names are ignored)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._items, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown {self.kind} '{name}' (known: {', '.join(self._items)}){hint}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def choices(self) -> Callable[[], tuple[str, ...]]:
        """A callable giving the current names (for dataclass ``choices`` metadata that must see
        entries registered later)."""
        return lambda: tuple(self._items)
