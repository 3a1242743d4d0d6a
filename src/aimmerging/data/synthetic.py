"""A small built-in task stream, generated in code (seeded), for the demo and for smoke runs.

Three *synthetic* tasks built to interfere, the situation continual learning is about. Each task
names a word from one of four categories (animal, plant, city, tool) and asks for the colour
code that a *code table* gives to that category. The three tables (A, B, C) use the same four
colours but assign them differently, and the prompt only says which table to use:

    table A: animal=red    plant=green  city=blue   tool=yellow
    table B: animal=green  plant=blue   city=yellow tool=red
    table C: animal=blue   plant=yellow city=red    tool=green

Learning a table takes a few steps (the model already knows the categories; it has to learn the
arbitrary colours). Fine-tuning on table B afterwards pushes the model to answer B's colours for
table-A prompts too; keeping table A needs the model to attend to the table letter, which only a
method that revisits old data (replay, AIMMerging) gives it a reason to do. Nothing is downloaded.
"""

from __future__ import annotations

import random

from .olora import Example

TASKS = ("codes-a", "codes-b", "codes-c")
SIZES = {"train": 240, "dev": 40, "test": 60}
COLOURS = ("red", "green", "blue")
TABLES = {
    "codes-a": {"animal": "red", "plant": "green", "city": "blue"},
    "codes-b": {"animal": "green", "plant": "blue", "city": "red"},
    "codes-c": {"animal": "blue", "plant": "red", "city": "green"},
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
    prompt = (f"Which colour does code table {letter} give to the word? Option: {', '.join(COLOURS)}.\n"
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
