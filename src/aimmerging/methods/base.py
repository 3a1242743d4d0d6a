"""The hooks a continual-learning method can use. A method is a small class: flags that tell
the runner how to build the stream, and hooks the training loop calls (see training/loop.py)."""

from __future__ import annotations

from ..config import RunConfig
from ..data.olora import Example


class Method:
    name = "base"
    uses_memory = False  # give the stage a replay memory built from earlier tasks' training sets
    fresh_adapter_per_task = False  # start every task from the initial adapter (``single``)
    joint = False  # one stage on all tasks together (``mtl``)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def before_task(self, session) -> None:
        """Called once before the first step of a stage."""

    def extra_examples(self, session, micro_batch: list[Example]) -> list[Example]:
        """Examples to add to a training micro-batch (replay mixing)."""
        return []

    def after_step(self, session, record: dict) -> list[dict] | None:
        """Called after every inner optimizer step; may fill ``record`` and return extra trace records."""
        return None

    def after_task(self, session) -> list[dict] | None:
        """Called once after the last step of a stage."""
        return None
