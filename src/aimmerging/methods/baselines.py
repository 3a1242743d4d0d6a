"""Baselines: sequential fine-tuning, experience replay, multi-task learning, single-task models."""

from __future__ import annotations

import math

from ..data.olora import Example
from .base import Method


class Sequential(Method):
    """``seq``: one LoRA adapter trained through the stream, nothing against forgetting (lower bound)."""

    name = "seq"


class Replay(Method):
    """``replay``: like ``seq``, with ceil(replay_ratio x n) random memory examples added to every
    micro-batch of n current-task examples (from the second task on)."""

    name = "replay"
    uses_memory = True

    def extra_examples(self, session, micro_batch: list[Example]) -> list[Example]:
        if not session.memory or self.cfg.replay_ratio <= 0:
            return []
        k = math.ceil(self.cfg.replay_ratio * len(micro_batch))
        return session.memory_batch(session.mix_rng, k)


class MultiTask(Method):
    """``mtl``: one adapter trained on the union of all tasks' training sets (upper bound). Only
    the last row of the accuracy matrix exists; BWT and FWT are undefined."""

    name = "mtl"
    joint = True


class SingleTask(Method):
    """``single``: a fresh adapter per task, trained from the base model on that task alone. Its
    diagonal gives the reference scores FWT needs (``--fwt-reference``)."""

    name = "single"
    fresh_adapter_per_task = True
