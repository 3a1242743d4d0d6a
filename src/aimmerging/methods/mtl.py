from __future__ import annotations

from . import register_method
from .base import Method


@register_method
class MultiTask(Method):
    """``mtl``: one adapter trained on the union of all tasks' training sets (upper bound). Only
    the last row of the accuracy matrix exists; BWT and FWT are undefined."""

    name = "mtl"
    paper = "multi-task learning (MTL)"
    summary = "one adapter trained on all tasks' data together (upper bound); only the last matrix row exists"
    joint = True
