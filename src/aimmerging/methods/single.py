from __future__ import annotations

from . import register_method
from .base import Method


@register_method
class SingleTask(Method):
    """``single``: a fresh adapter per task, trained from the base model on that task alone. Its
    diagonal gives the reference scores FWT needs (``--fwt-reference``)."""

    name = "single"
    paper = "single-task fine-tuning (FWT reference)"
    summary = "a fresh adapter per task from the base model; its diagonal is the FWT reference"
    fresh_adapter_per_task = True
    in_bench = False  # the bench runs it once, as every method's FWT reference
