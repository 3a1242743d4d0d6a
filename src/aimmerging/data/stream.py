"""Task streams: where a run's examples come from, and the per-task data a run trains on.

A :class:`TaskStream` is an ordered list of task names and a way to read each task's splits
(``train``, ``dev``, ``test``), each a list of :class:`~aimmerging.data.olora.Example`. Three
kinds are built in:

* :meth:`TaskStream.from_olora` - an O-LoRA data directory (``<dir>/{train,dev,test}/<task>.json``),
  files read when first needed (a missing dev split only matters to model selection);
* :meth:`TaskStream.synthetic` - the built-in synthetic stream (``aimmerging.data.synthetic``);
* :meth:`TaskStream.from_examples` - in memory: ``{task: {"train": [...], "test": [...], "dev": [...]}}``
  with ``{"input", "output"}`` dicts (an ``id`` is optional) or ``datasets.Dataset`` objects with
  those columns.

:func:`prepare_tasks` turns a stream into what a run uses: class-balanced, seeded caps of the
training and evaluation sets, the dev split when model selection needs it, and each task's metric.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ..errors import DataError
from .olora import SPLITS, Example, is_unicode_text, read_task
from .sampling import balanced_subsample

TASK_NAME_MAX_BYTES = 200  # a task name is a file name (``predictions/<task>.jsonl``, ``stages/NN-<task>``)


def check_task_name(name: Any) -> str:
    """``name`` when it is a valid task name, else a one-line DataError. A task name becomes a file
    and folder name in the run directory, so it is a name, never a path: not empty, no ``/`` or
    ``\\``, no ``..``, no leading dot, no NUL or other control character, at most 200 bytes.
    Every task stream checks its names here, before anything is read or written: stream files
    (``--data``), ``--tasks``, the Python API's mapping and ``datasets`` inputs all build a
    :class:`TaskStream`."""
    if not isinstance(name, str):
        raise DataError(f"task name {name!r}: expected a string, got {type(name).__name__}")
    if not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif ".." in name:
        problem = "contains '..'"
    elif name.startswith("."):
        problem = "starts with a dot"
    elif any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        problem = "contains a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > TASK_NAME_MAX_BYTES:
        problem = f"is longer than {TASK_NAME_MAX_BYTES} bytes"
    else:
        return name
    shown = repr(name) if len(name) <= 80 else repr(name[:77]) + "..."
    raise DataError(f"task name {shown} {problem}: a task name is used as a file name in the run directory, "
                    "not a path; rename the task")

class TaskStream:
    """An ordered task stream; ``split(task, name)`` returns that split's examples (DataError when
    the stream has none)."""

    def __init__(self, tasks: Sequence[str], reader: Callable[[str, str], list[Example]], description: str = "custom"):
        for task in tasks:
            try:
                check_task_name(task)
            except DataError as e:
                raise DataError(f"{description}: {e}" if description != "custom" else str(e)) from None
        if len(set(tasks)) != len(tasks):
            raise DataError(f"tasks: a task is listed twice in {list(tasks)}")
        if not tasks:
            raise DataError("a task stream needs at least one task")
        self.tasks = list(tasks)
        self.description = description
        self._reader = reader
        self._cache: dict[tuple[str, str], list[Example]] = {}

    def split(self, task: str, name: str) -> list[Example]:
        if task not in self.tasks:
            raise DataError(f"task '{task}' is not in the stream ({', '.join(self.tasks)})")
        key = (task, name)
        if key not in self._cache:
            self._cache[key] = self._reader(task, name)
        return self._cache[key]

    def __repr__(self) -> str:
        return f"TaskStream({self.description}: {', '.join(self.tasks)})"

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_olora(cls, data_dir: str | Path, tasks: Sequence[str]) -> "TaskStream":
        """``tasks`` of an O-LoRA data directory, in this order."""
        return cls(tasks, lambda task, split: read_task(data_dir, split, task), f"O-LoRA directory {data_dir}")

    @classmethod
    def synthetic(cls, seed: int = 42, tasks: Sequence[str] | None = None) -> "TaskStream":
        """The built-in synthetic stream (three code tables), generated from ``seed``."""
        from .synthetic import TASKS, generate

        return cls(list(tasks or TASKS), lambda task, split: generate(task, split, seed=seed), "synthetic")

    @classmethod
    def from_examples(cls, data: Mapping[str, Mapping[str, Any]]) -> "TaskStream":
        """In-memory tasks: ``{task: {split: examples}}`` where examples are ``{"input", "output"}``
        mappings (``id`` optional) or a ``datasets.Dataset`` with those columns."""
        if not isinstance(data, Mapping) or not data:
            raise DataError("a task stream mapping needs at least one task: {task: {'train': [...], 'test': [...]}}")
        parsed: dict[str, dict[str, list[Example]]] = {}
        for task, splits in data.items():
            if not isinstance(splits, Mapping):
                raise DataError(f"task '{task}': expected a mapping of split -> examples, got {type(splits).__name__}")
            unknown = set(splits) - set(SPLITS)
            if unknown:
                raise DataError(f"task '{task}': unknown split(s) {', '.join(sorted(map(str, unknown)))} (splits: {', '.join(SPLITS)})")
            parsed[str(task)] = {split: _to_examples(str(task), split, rows) for split, rows in splits.items()}

        def reader(task: str, split: str) -> list[Example]:
            if split not in parsed[task]:
                raise DataError(f"task '{task}' has no {split} split")
            return parsed[task][split]

        return cls(list(parsed), reader, "in-memory examples")


def _to_examples(task: str, split: str, rows: Iterable[Any]) -> list[Example]:
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise DataError(f"task '{task}', {split}: expected a list of {{'input', 'output'}} mappings, got {type(rows).__name__}")
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"task '{task}', {split} item {i}: expected a mapping with 'input' and 'output', "
                            f"got {type(row).__name__}")
        for key in ("input", "output"):
            if not isinstance(row.get(key), str):
                raise DataError(f"task '{task}', {split} item {i}: field '{key}' missing or not a string")
        if not row["input"].strip():
            raise DataError(f"task '{task}', {split} item {i}: field 'input' is empty")
        for key in ("input", "output"):
            if not is_unicode_text(row[key]):
                raise DataError(f"task '{task}', {split} item {i}: field '{key}' is not valid Unicode text (a lone surrogate)")
        examples.append(Example(id=str(row.get("id", f"{task}-{split}-{i}")), input=row["input"],
                                output=row["output"], task=task))
    if not examples:
        raise DataError(f"task '{task}': the {split} split is empty")
    return examples


@dataclass
class TaskData:
    name: str
    train: list[Example]  # capped, class-balanced (without the held-out examples)
    test: list[Example]  # capped, class-balanced (the evaluation split)
    dev: list[Example] | None  # validation pool, only loaded when validation is needed
    outputs: frozenset[str]  # distinct outputs of the full training set
    metric: str
    holdout: list[Example] = field(default_factory=list)  # training examples held out for validation
    dev_source: str | None = None  # where ``dev`` comes from (DEV_SOURCES)


# Where a task's validation pool comes from.
DEV_SOURCES = {
    "dev": "the dev split",
    "dev-overlap-kept": "the dev split, which holds examples of the scored split (--dev-test-overlap keep)",
    "dev-minus-overlap": "the dev split without the examples it shares with the scored split",
    "unused-train": "training examples outside --train-cap (the dev split is the scored split's examples)",
    "train-holdout": "training examples held out of training (the dev split is the scored split's examples)",
}


def prepare_tasks(stream: TaskStream, *, seed: int, eval_seed: Optional[int] = None, train_cap: Optional[int] = None,
                  eval_cap: Optional[int] = None,
                  eval_split: str = "test", need_dev: bool = False,
                  metric_for: Callable[[str, list[Example]], str], holdout: float | None = None,
                  dev_test_overlap: str = "holdout") -> dict[str, TaskData]:
    """Read and check every split the run needs before any training starts; ``metric_for(task,
    full training set)`` names each task's metric. ``eval_seed`` (default: ``seed``) alone draws the
    capped test subset, so that runs of other training seeds score the same test examples.

    ``holdout``: hold this fraction of each task's (capped) training set out of training, for
    validation (``TaskData.holdout``; the reference's single-task runs). ``need_dev``: load a
    validation pool (``TaskData.dev``) from the dev split; dev examples that are also in the
    scored split are dropped (``dev_test_overlap="holdout"``), and a task left without any is
    validated on training examples it does not train on (outside the cap, else held out);
    ``"keep"`` keeps them (``dev_source`` says so, the runner warns)."""
    out: dict[str, TaskData] = {}
    for task in stream.tasks:
        train_full = stream.split(task, "train")
        scored_full = stream.split(task, eval_split)
        train = balanced_subsample(train_full, train_cap, f"{seed}-train-{task}")
        held: list[Example] = []
        if holdout:
            train, held = split_holdout(train, holdout, f"{seed}-holdout-{task}")
        dev, source = None, None
        if need_dev:
            dev, source = _validation_pool(stream.split(task, "dev"), scored_full, dev_test_overlap)
            if dev is None:  # every dev example is scored: training examples the run does not train on
                trained = {id(e) for e in train}
                unused = [e for e in train_full if id(e) not in trained]
                if unused:
                    dev, source = unused, "unused-train"
                else:
                    train, dev = split_holdout(train, holdout or 0.1, f"{seed}-holdout-{task}")
                    source = "train-holdout"
        out[task] = TaskData(
            name=task, train=train,
            test=balanced_subsample(scored_full, eval_cap, f"{seed if eval_seed is None else eval_seed}-test-{task}"),
            dev=dev, outputs=frozenset(e.output for e in train_full),
            metric=metric_for(task, train_full), holdout=held, dev_source=source)
    return out


def _validation_pool(dev: list[Example], scored: list[Example], mode: str) -> tuple[list[Example] | None, str]:
    scored_keys = {(e.input, e.output) for e in scored}
    clean = [e for e in dev if (e.input, e.output) not in scored_keys]
    if len(clean) == len(dev):
        return dev, "dev"
    if mode == "keep":
        return dev, "dev-overlap-kept"
    return (clean, "dev-minus-overlap") if clean else (None, "")


def split_holdout(examples: list[Example], fraction: float, seed: str) -> tuple[list[Example], list[Example]]:
    """(kept, held out): ``int(fraction * N)`` examples (at least 1, at most N - 1) chosen by a
    seeded shuffle, both in their original order."""
    n = len(examples)
    k = min(max(1, int(fraction * n)), n - 1) if n > 1 else 0
    chosen = set(random.Random(seed).sample(range(n), k))
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def validation_set(tasks: dict[str, TaskData], seen: list[str], per_task: int, seed: int) -> list[Example]:
    """Reference validation set: the first ``per_task`` of each seen task's shuffled validation
    pool, concatenated and shuffled (ALGORITHM.md §2.2)."""
    val: list[Example] = []
    for task in seen:
        dev = list(tasks[task].dev or [])
        random.Random(f"val-{seed}-{task}").shuffle(dev)
        val.extend(dev[:per_task])
    random.Random(f"val-{seed}").shuffle(val)
    return val


def holdout_validation_set(tasks: dict[str, TaskData], trained: list[str], seed: int) -> list[Example]:
    """The held-out training examples of the tasks a stage trains on, shuffled (the reference's
    single-task runs validate on their whole 10 % split)."""
    val = [e for t in trained for e in tasks[t].holdout]
    random.Random(f"val-{seed}").shuffle(val)
    return val
