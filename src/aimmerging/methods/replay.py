from __future__ import annotations

import math
from dataclasses import dataclass

from ..settings import Bounded, option
from . import register_method
from .base import Method


@dataclass
class ReplaySettings(Bounded):
    replay_ratio: float = option(0.25, "replay method: memory examples added per current-task example in each micro-batch",
                                 ge=0)


@register_method
class Replay(Method):
    """``replay`` (MixReplay): like ``seq``, with ceil(replay_ratio x n) random memory examples
    added to every micro-batch of n current-task examples (from the second task on)."""

    name = "replay"
    paper = "MixReplay (experience replay mixed into every batch)"
    summary = "seq plus memory examples mixed into every micro-batch (--replay-ratio per current-task example)"
    Settings = ReplaySettings
    uses_memory = True

    def extra_examples(self, view, micro_batch):
        if not view.memory or self.settings.replay_ratio <= 0:
            return []
        k = math.ceil(self.settings.replay_ratio * len(micro_batch))
        return view.memory.sample(view.rng("mix"), k)
