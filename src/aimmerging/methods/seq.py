from __future__ import annotations

from . import register_method
from .base import Method


@register_method
class Sequential(Method):
    """``seq``: one LoRA adapter trained through the stream, nothing against forgetting (lower bound)."""

    name = "seq"
    paper = "sequential fine-tuning (SeqFT)"
    summary = "one LoRA adapter trained through the stream; nothing against forgetting (lower bound)"
