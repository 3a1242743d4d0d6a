"""Flags from option declarations: one flag per dataclass field declared with
``aimmerging.settings.option`` (``lora_r`` -> ``--lora-r``), grouped for ``--help``."""

from __future__ import annotations

import argparse
from dataclasses import MISSING

from ..settings import INT_LIMIT, base_type, choices_of, option_fields


def add_option_flags(parser: argparse.ArgumentParser, cls, *, group: str | None = None, skip=frozenset(),
                     seen: set[str] | None = None, groups: dict | None = None) -> None:
    """Add a flag per option of dataclass ``cls`` (values are left as strings: the config
    builder coerces them); options already in ``seen`` are skipped."""
    groups = groups if groups is not None else {}
    for name, f in option_fields(cls).items():
        if name in skip or (seen is not None and name in seen):
            continue
        if seen is not None:
            seen.add(name)
        title = f.metadata.get("group") or group or "options"
        if title not in groups:
            groups[title] = parser.add_argument_group(f"{title} options")
        g = groups[title]
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        maximum = f.metadata.get("maximum")  # stated only where tighter than settings.INT_LIMIT
        limit = f"; at most {maximum}" if maximum is not None and maximum <= INT_LIMIT else ""
        help_text = f"{f.metadata['help']} (default: {default}{limit})"
        if base_type(cls, name) is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            allowed = choices_of(f)
            metavar = "{" + ",".join(allowed) + "}" if allowed else name.split("_")[-1].upper()
            g.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
