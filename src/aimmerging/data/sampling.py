"""Seeded subsampling: class-balanced caps and the reference memory-buffer rule.

Pure Python (no torch): everything here is a function of example lists and a seed.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from .olora import Example


def _classes_in_order(outputs: Sequence[str]) -> dict[str, list[int]]:
    """Indices per distinct output, classes in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, out in enumerate(outputs):
        groups.setdefault(out, []).append(i)
    return groups


def balanced_subsample(examples: Sequence[Example], cap: int | None, seed: int | str) -> list[Example]:
    """At most ``cap`` examples, spread as evenly over classes (distinct outputs) as the data allows.

    Classes are visited round-robin in a seeded random order and each class gives its examples in a
    seeded random order, so the result is balanced and reproducible. For free-text tasks (every
    output distinct) this is a plain seeded random sample. ``cap=None`` keeps everything, in file
    order.
    """
    if cap is None or cap >= len(examples):
        return list(examples)
    rng = random.Random(f"balanced-{seed}")
    groups = [list(idx) for idx in _classes_in_order([e.output for e in examples]).values()]
    for g in groups:
        rng.shuffle(g)
    rng.shuffle(groups)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < cap:
        for g in groups:
            if depth < len(g):
                chosen.append(g[depth])
                if len(chosen) == cap:
                    break
        depth += 1
    rng.shuffle(chosen)
    return [examples[i] for i in chosen]


def reference_memory_indices(outputs: Sequence[str], ratio_percent: float, rng: random.Random) -> list[int]:
    """The reference memory rule for one task's training set (ALGORITHM.md §2.1).

    n = floor(len * ratio / 100); classes are the distinct outputs in order of first appearance;
    per_class = max(1, floor(n / n_classes)); each class gives min(per_class, size) indices drawn
    without replacement; if fewer than n were drawn, the rest is drawn from the indices not yet
    taken. Free-text tasks therefore give one example per distinct output (a reference quirk).
    The reference lists the remaining indices from a Python set; here they are sorted, so the
    draw is reproducible across Python versions.
    """
    n = math.floor(len(outputs) * ratio_percent / 100)
    groups = _classes_in_order(outputs)
    per_class = max(1, n // len(groups)) if groups else 0
    chosen: list[int] = []
    for idx in groups.values():
        chosen.extend(rng.sample(idx, min(per_class, len(idx))))
    if len(chosen) < n:
        remaining = sorted(set(range(len(outputs))) - set(chosen))
        chosen.extend(rng.sample(remaining, n - len(chosen)))
    return chosen


def build_memory(
    previous_tasks: Sequence[Sequence[Example]],
    ratio_percent: float = 2.0,
    seed: int = 42,
    cap_per_task: int | None = None,
) -> list[Example]:
    """The replay memory for the next task: examples from the training sets of all earlier tasks.

    The RNG is seeded once and the tasks are visited in stream order, so the subset chosen for a
    task is the same whenever it is rebuilt (the buffer only grows). ``cap_per_task`` keeps at most
    that many of each task's selection (the reference has no cap; with free-text tasks its rule takes
    almost the whole training set).
    """
    rng = random.Random(seed)
    memory: list[Example] = []
    for examples in previous_tasks:
        idx = reference_memory_indices([e.output for e in examples], ratio_percent, rng)
        if cap_per_task is not None:
            idx = idx[:cap_per_task]
        memory.extend(examples[i] for i in idx)
    return memory
