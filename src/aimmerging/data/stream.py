"""Load the data of a task stream: capped training and test sets, dev sets for validation, and
what evaluation needs per task (metric, answer lengths)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import RunConfig
from ..errors import ConfigError
from ..evaluation.scoring import choose_metric
from .benchmarks import SYNTHETIC
from .olora import Example, read_task
from .sampling import balanced_subsample

# Test files that are copies of the dev files in ../shared/data/long_sequence (see its README).
DEV_IS_TEST = frozenset({"dbpedia", "yahoo"})


@dataclass
class TaskData:
    name: str
    train: list[Example]  # capped, class-balanced
    test: list[Example]  # capped, class-balanced
    dev: list[Example] | None  # only loaded when validation is needed
    outputs: frozenset[str]  # distinct outputs of the full training set
    metric: str


def _split(cfg: RunConfig, task: str, split: str) -> list[Example]:
    if cfg.benchmark == SYNTHETIC and not cfg.data_dir:
        from .synthetic import generate

        return generate(task, split, seed=cfg.seed)
    if not cfg.data_dir:
        raise ConfigError("data_dir: required for this task stream (--data-dir DIR)")
    return read_task(cfg.data_dir, split, task)


def load_stream(cfg: RunConfig, tasks: list[str]) -> dict[str, TaskData]:
    """Read and check every file the run needs before any training starts."""
    stream: dict[str, TaskData] = {}
    for task in tasks:
        train_full = _split(cfg, task, "train")
        test_full = _split(cfg, task, cfg.eval_split)
        dev = _split(cfg, task, "dev") if cfg.select_best_every else None
        outputs = frozenset(e.output for e in train_full)
        metric = (cfg.metric or {}).get(task) or choose_metric(task, (e.output for e in train_full))
        stream[task] = TaskData(
            name=task,
            train=balanced_subsample(train_full, cfg.train_cap, f"{cfg.seed}-train-{task}"),
            test=balanced_subsample(test_full, cfg.eval_cap, f"{cfg.seed}-test-{task}"),
            dev=dev, outputs=outputs, metric=metric)
    unknown = set(cfg.metric or {}) - set(tasks)
    if unknown:
        raise ConfigError(f"metric: override for task(s) not in the stream: {', '.join(sorted(unknown))}")
    return stream


def validation_set(stream: dict[str, TaskData], seen: list[str], per_task: int, seed: int) -> list[Example]:
    """Reference validation set: the first ``per_task`` of each seen task's shuffled dev split,
    concatenated and shuffled (ALGORITHM.md §2.2)."""
    val: list[Example] = []
    for task in seen:
        dev = list(stream[task].dev or [])
        random.Random(f"val-{seed}-{task}").shuffle(dev)
        val.extend(dev[:per_task])
    random.Random(f"val-{seed}").shuffle(val)
    return val
