"""Named task streams with their task orders, exactly as in the AIMMerging reference
(ALGORITHM.md §1.1; the long-sequence and standard-CL orders are O-LoRA's)."""

from __future__ import annotations

from ..errors import ConfigError

BENCHMARKS: dict[str, dict[int, list[str]]] = {
    "standard-cl": {
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long-sequence": {
        1: ["mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon",
            "sst-2", "dbpedia", "agnews", "multirc", "yahoo"],
        2: ["multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2",
            "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
        3: ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
            "agnews", "yahoo", "multirc", "boolqa", "wic"],
    },
    "superni": {
        1: ["task1572", "task363", "task1290", "task181", "task002", "task1510", "task639",
            "task1729", "task073", "task1590", "task748", "task511", "task591", "task1687", "task875"],
        2: ["task748", "task073", "task1590", "task639", "task1572", "task1687", "task591",
            "task363", "task1510", "task1729", "task181", "task511", "task002", "task1290", "task875"],
    },
}

# The built-in synthetic stream (aimmerging.data.synthetic) needs no data directory.
SYNTHETIC = "synthetic"


def benchmark_names() -> list[str]:
    return sorted([*BENCHMARKS, SYNTHETIC])


def resolve_tasks(benchmark: str | None, order: int, tasks: list[str] | None) -> list[str]:
    """The ordered task list of a run: an explicit list wins, else the benchmark's order."""
    if tasks:
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"tasks: a task is listed twice in {tasks}")
        return list(tasks)
    if benchmark is None:
        raise ConfigError("give a task stream: --benchmark NAME [--order N] or --tasks a,b,c")
    if benchmark == SYNTHETIC:
        from .synthetic import TASKS

        return list(TASKS)
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{benchmark}' (known: {', '.join(benchmark_names())})")
    orders = BENCHMARKS[benchmark]
    if order not in orders:
        raise ConfigError(f"benchmark '{benchmark}' has no order {order} (orders: {', '.join(map(str, orders))})")
    return list(orders[order])
