"""The forgetting probe's lower-noise options (BENCHMARKS.md, probe study): ``probe_size``,
``probe_set: window`` and ``probe_average``, driven through AIMMerging's hooks by a scripted view
(no model: the probe's loss is a function of the batch it is given and of the step)."""

from __future__ import annotations

import random
from contextlib import nullcontext

import pytest
import torch

from aimmerging.config import build_config
from aimmerging.data.memory import ReplayMemory
from aimmerging.data.olora import Example
from aimmerging.methods.aimmerging import Merging, MergingSettings


class ScriptedView:
    """What the hooks read: a memory of 40 examples, per-name random streams, and a ``mean_loss``
    that records each batch it is given and returns ``loss(step, batch)``."""

    def __init__(self, loss=lambda step, batch: 1.0, memory_batch_size: int = 4):
        self.memory = ReplayMemory([Example(f"m{i}", f"q{i}", "a", "t") for i in range(40)])
        self.memory_batch_size, self.grad_accum, self.step = memory_batch_size, 1, 0
        self.params = [torch.nn.Parameter(torch.zeros(3))]
        self.optimizer = torch.optim.SGD(self.params, lr=0.1)
        self.loss, self.probed, self.records, self._rngs = loss, [], [], {}

    def rng(self, name):
        return self._rngs.setdefault(name, random.Random(name))

    def mean_loss(self, examples, train_mode):
        self.probed.append((self.step, [e.id for e in examples]))
        return self.loss(self.step, examples)

    def update(self, examples, optimizer, loss_scale, penalty=None):
        return 0.5

    def timed(self, category):
        return nullcontext()

    def emit(self, record):
        self.records.append(record)


def drive(settings: MergingSettings, steps: int, **view_kw) -> tuple[ScriptedView, list[dict]]:
    """``steps`` inner steps (the adapter moves by 0.1 each) through the hooks; the step records
    and the merge records, in order."""
    method, view = Merging(settings), ScriptedView(**view_kw)
    method.before_task(view)
    out = []
    for step in range(1, steps + 1):
        view.step = step
        with torch.no_grad():
            view.params[0] += 0.1
        record = {"event": "step", "step": step}
        out.append(record)
        out.extend(method.after_step(view, record) or [])
    return view, out


# S0 = 2 with one cold-start merge, then merges on signals: windows of a few steps each
SMALL = dict(initial_interval=2, initial_outer_steps=1, cold_start=1, min_interval=2)


def windows(out: list[dict]) -> list[list[int]]:
    """The steps of each merge window (a merge at step g closes the window that holds g)."""
    result, current = [], []
    for r in out:
        if r["event"] == "step":
            current.append(r["step"])
        elif r["event"] == "merge":
            result.append(current)
            current = []
    return result + ([current] if current else [])


def test_defaults_draw_a_fresh_memory_batch_every_step_and_feed_the_raw_loss():
    view, out = drive(MergingSettings(**SMALL), 12, loss=lambda step, batch: float(step))
    batches = [ids for _, ids in view.probed]
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    assert len({tuple(b) for b in batches}) == 12  # a new draw at every step
    steps = [r for r in out if r["event"] == "step"]
    assert [r["history_loss"] for r in steps] == [float(s) for s in range(1, 13)]
    assert all("probe_loss" not in r for r in steps)


def test_probe_size_sets_the_probe_batch_alone():
    view, _ = drive(MergingSettings(**SMALL, probe_size=16), 6)
    assert all(len(ids) == 16 for _, ids in view.probed)
    view, _ = drive(MergingSettings(**SMALL, probe_size=100), 3)  # larger than the memory: all of it
    assert all(sorted(ids) == sorted(f"m{i}" for i in range(40)) for _, ids in view.probed)


def test_window_probe_keeps_one_batch_until_the_next_merge():
    # the loss falls while the window lasts and jumps right after each merge: merges on signals
    view, out = drive(MergingSettings(**SMALL, probe_set="window"), 30,
                      loss=lambda step, batch: 1.0 + (step % 5))
    merges = [r for r in out if r["event"] == "merge"]
    assert len(merges) >= 3
    by_step = dict(view.probed)
    spans = windows(out)
    for span in spans:
        assert len({tuple(by_step[s]) for s in span}) == 1, span  # one batch per window
    firsts = [tuple(by_step[span[0]]) for span in spans]
    assert len(set(firsts)) == len(firsts)  # a new draw in every window


def test_probe_average_feeds_the_running_mean_of_the_window():
    losses = {s: float(s * s) for s in range(1, 21)}
    view, out = drive(MergingSettings(**SMALL, probe_average=3), 20, loss=lambda step, batch: losses[step])
    steps = {r["step"]: r for r in out if r["event"] == "step"}
    assert len(windows(out)) >= 2
    for span in windows(out):
        for k, s in enumerate(span):
            recent = [losses[t] for t in span[max(0, k - 2):k + 1]]  # restarts at each merge
            assert steps[s]["probe_loss"] == losses[s]
            assert steps[s]["history_loss"] == pytest.approx(sum(recent) / len(recent))


def test_the_options_at_their_defaults_leave_old_run_fingerprints_unchanged():
    base = dict(method="aimmerging", benchmark="synthetic")
    plain = build_config(base).fingerprint()
    assert not {"probe_size", "probe_set", "probe_average"} & set(plain)  # old runs resume
    assert build_config({**base, "probe_set": "random", "probe_average": 1}).fingerprint() == plain
    changed = build_config({**base, "probe_set": "window", "probe_average": 4, "probe_size": 32}).fingerprint()
    assert (changed["probe_set"], changed["probe_average"], changed["probe_size"]) == ("window", 4, 32)


@pytest.mark.parametrize("bad", [dict(probe_size=0), dict(probe_average=0), dict(probe_set="fixed")])
def test_bad_probe_options_are_refused(bad):
    from aimmerging.errors import ConfigError

    with pytest.raises(ConfigError):
        build_config(dict(method="aimmerging", benchmark="synthetic", **bad))
