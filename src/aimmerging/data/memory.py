"""The replay memory: a small object holding examples of earlier tasks, with seeded sampling.

Built with the reference rule (:func:`~aimmerging.data.sampling.build_memory`: ``ratio`` percent of
each earlier task's training set, per class, at least one example per class, optionally capped per
task). Methods draw batches from it with their own random stream (``sample(rng, k)``), so the
probe, the replay steps and replay mixing never disturb each other's draws.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

from .olora import Example
from .sampling import build_memory


class ReplayMemory:
    def __init__(self, examples: Sequence[Example] = ()):
        self.examples = list(examples)

    @classmethod
    def reference(cls, previous_tasks: Sequence[Sequence[Example]], ratio_percent: float = 2.0, seed: int = 42,
                  cap_per_task: int | None = None) -> "ReplayMemory":
        """The memory for the next task, from the training sets of all earlier tasks (stream order)."""
        return cls(build_memory(previous_tasks, ratio_percent, seed, cap_per_task))

    def sample(self, rng: random.Random, size: int) -> list[Example]:
        """A random batch drawn without replacement (the whole memory, shuffled, when it is small)."""
        return rng.sample(self.examples, min(size, len(self.examples)))

    def __len__(self) -> int:
        return len(self.examples)

    def __bool__(self) -> bool:
        return bool(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"ReplayMemory({len(self.examples)} examples)"
