"""A small built-in task stream, generated in code (seeded), for the demo and for smoke runs.

Three *synthetic* tasks. Each names a word from one of three categories (animal, plant, city)
and asks for the code that a *code table* (A, B or C) gives to that category; each table uses
its own set of codes:

    table A: animal=red    plant=green  city=blue       (colours)
    table B: animal=north  plant=south  city=east       (directions)
    table C: animal=circle plant=square city=triangle   (shapes)

Learning a table takes a few dozen steps (the model knows the categories; it has to learn the
arbitrary codes). Fine-tuning on table B afterwards pulls the model towards B's codes for every
prompt, table-A prompts included: the forgetting continual learning is about, as in the
Standard CL benchmark where each task has its own label set. Nothing is downloaded.
"""

from __future__ import annotations

import random

from .olora import Example

TASKS = ("codes-a", "codes-b", "codes-c")
SIZES = {"train": 240, "dev": 40, "test": 60}
TABLES = {
    "codes-a": {"animal": "red", "plant": "green", "city": "blue"},
    "codes-b": {"animal": "north", "plant": "south", "city": "east"},
    "codes-c": {"animal": "circle", "plant": "square", "city": "triangle"},
}
WORDS = {
    "animal": ["tiger", "rabbit", "eagle", "salmon", "horse", "wolf", "dolphin", "sparrow", "camel", "frog", "bear", "goat"],
    "plant": ["oak", "tulip", "fern", "cactus", "maple", "rose", "bamboo", "ivy", "daisy", "pine", "moss", "lily"],
    "city": ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Sydney", "Berlin", "Nairobi", "Toronto", "Madrid"],
}


def _example(task: str, rng: random.Random) -> tuple[str, str]:
    category = rng.choice(sorted(WORDS))
    word = rng.choice(WORDS[category])
    letter = task[-1].upper()
    prompt = (f"Which code does code table {letter} give to the word?\n"
              f"Word: {word}\nAnswer:")
    return prompt, TABLES[task][category]


def generate(task: str, split: str, seed: int = 42) -> list[Example]:
    """The ``split`` of synthetic ``task``; the same seed always gives the same examples (the
    splits share the small vocabulary, so prompts repeat across them, as in any word-level task)."""
    if task not in TABLES:
        from ..errors import DataError

        raise DataError(f"unknown synthetic task '{task}' (tasks: {', '.join(TASKS)})")
    rng = random.Random(f"synthetic-{task}-{seed}")
    out: dict[str, list[Example]] = {s: [] for s in SIZES}
    n = 0
    for s, size in SIZES.items():
        for _ in range(size):
            prompt, label = _example(task, rng)
            out[s].append(Example(id=f"{task}_{n}", input=prompt, output=label, task=task))
            n += 1
    return out[split]
