"""Where everything of a run directory lies: the one place that spells its file names.

Layout::

    RUN_DIR/.lock                     held by the run working in the directory
    RUN_DIR/config.yaml               fully resolved config (written first)
    RUN_DIR/stages/00-<task>/         one committed directory per finished stage:
        adapter/                      the adapter after the stage, PEFT format
        predictions/<task>.jsonl      {id, prompt, gold, prediction, score} per test example
        trace.jsonl                   per-step and per-merge records of the stage
        method_state.pt               the method's state_dict(), when it has one (resume)
        scores.json                   the stage's row of the accuracy matrix, timings, checksums
                                      (written last: its presence marks a finished stage)
    RUN_DIR/stages/.tmp-00-<task>/    a stage being written (renamed into place when complete)
    RUN_DIR/stages/zero-shot/         (--zero-shot) the base model's scores
    RUN_DIR/trace.jsonl               all stage traces, in order
    RUN_DIR/results.json              matrix, metrics, timings; "complete": false until the end
    RUN_DIR/summary.md                the markdown table printed at the end
    RUN_DIR/plots/                    drawn by ``aimmerging plot`` / the demo

A bench directory holds one run directory per method (``bench.yaml``, ``throughput.json`` beside
them). Paths only: :class:`~aimmerging.runs.rundir.RunDirectory` locks, checks and commits, and
confines stage paths to the run directory; readers of finished runs use these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
RESULTS = "results.json"
TRACE = "trace.jsonl"
SUMMARY = "summary.md"
LOCK = ".lock"
STAGES = "stages"
PLOTS = "plots"
TMP_PREFIX = ".tmp-"
ZERO_SHOT = "zero-shot"
# inside a stage folder
ADAPTER = "adapter"
PREDICTIONS = "predictions"
SCORES = "scores.json"
METHOD_STATE = "method_state.pt"
# a bench directory
BENCH_FILE = "bench.yaml"
THROUGHPUT = "throughput.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run directory ``path`` (nothing is checked or created)."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def trace(self) -> Path:
        return self.path / TRACE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def stages(self) -> Path:
        return self.path / STAGES

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    def stage(self, dirname: str) -> Path:
        return self.stages / dirname

    def tmp_stage(self, dirname: str) -> Path:
        return self.stages / f"{TMP_PREFIX}{dirname}"


def predictions_file(stage: Path, task: str) -> Path:
    """``predictions/<task>.jsonl`` of the stage folder ``stage``."""
    return stage / PREDICTIONS / f"{task}.jsonl"


def scores_file(stage: Path) -> Path:
    return stage / SCORES


def stage_trace(stage: Path) -> Path:
    return stage / TRACE


def adapter_dir(stage: Path) -> Path:
    return stage / ADAPTER


def method_state_file(stage: Path) -> Path:
    return stage / METHOD_STATE


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a run directory (results, a config or stages in it)."""
    layout = RunLayout(path)
    return layout.path.is_dir() and (layout.results.is_file() or layout.config.is_file() or layout.stages.is_dir())
