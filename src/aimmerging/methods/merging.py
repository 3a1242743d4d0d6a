"""AIMMerging and its two ablations, one class driven by a merge controller.

For every task after the first (the first has no memory and trains plainly), after each inner step:

1. history loss: the loss on a random memory batch, no gradients (the forgetting probe);
2. Delta_in L1: sum |theta - theta_anchor| (the adapter's move since the last merge);
3. the controller decides; on a merge: theta_k <- theta; ``outer_steps`` replay steps on memory
   batches; theta <- anchor + w_in (theta_k - anchor) + w_out (theta - theta_k); anchor <- theta.

``merge-fixed`` merges every S0 steps with fixed weights and ``merge-end`` once at the task end;
neither probes the memory. A non-finite probe is recorded and not fed to the controller; a
non-finite adapter (after a step or a fusion) falls back to the last good state and is recorded.
"""

from __future__ import annotations

import math

from ..controller import MergeController, MergeDecision
from ..models.lora import all_finite, fuse, l1_distance, restore, snapshot
from .base import Method


class Merging(Method):
    name = "aimmerging"
    uses_memory = True

    def before_task(self, session) -> None:
        self.active = bool(session.memory)
        if not self.active:
            return
        config = self.cfg.controller_config()
        self.controller = MergeController(config)
        with session.timers.section("bookkeeping"):
            self.anchor = snapshot(session.params)
        session.emit({"event": "task_start", "step": 0, "memory_size": len(session.memory),
                      "controller": config.to_dict()})

    def after_step(self, session, record: dict) -> list[dict] | None:
        if not self.active:
            return None
        c = self.controller
        if c.needs_history_loss:
            with session.timers.section("probe"):
                h = session.probe()
            record["history_loss"] = h if math.isfinite(h) else None
        with session.timers.section("bookkeeping"):
            if not all_finite(session.params):
                restore(session.params, self.anchor)
                record["fallback"] = "anchor (non-finite adapter after the step)"
            l1 = l1_distance(session.params, self.anchor)
            record["delta_in_l1"] = l1
            decision = None
            if record["history_loss"] is not None or not c.needs_history_loss:
                decision = c.observe(session.step, record["history_loss"], l1)
            record["interval"] = c.interval if decision is None else decision.interval
            record["threshold"] = c.threshold if decision is None else decision.threshold
        return [self.merge(session, decision)] if decision else None

    def after_task(self, session) -> list[dict] | None:
        if not self.active:
            return None
        with session.timers.section("bookkeeping"):
            decision = self.controller.end_of_task(session.step, l1_distance(session.params, self.anchor))
        return [self.merge(session, decision)] if decision else None

    def merge(self, session, d: MergeDecision) -> dict:
        with session.timers.section("bookkeeping"):
            theta_k = snapshot(session.params)
        with session.timers.section("replay"):
            losses = session.replay(d.outer_steps)
        fallback = None
        with session.timers.section("bookkeeping"):
            fuse(session.params, self.anchor, theta_k, d.w_in, d.w_out)
            if not all_finite(session.params):
                restore(session.params, theta_k)
                fallback = "theta_k (non-finite fusion: replay update dropped)"
            self.anchor = snapshot(session.params)
        session.merges += 1
        done = [x for x in losses if x is not None]
        return {"event": "merge", **d.to_dict(), "replay_loss": sum(done) / len(done) if done else None,
                "replay_skipped": len(losses) - len(done), "fallback": fallback}


class MergeFixed(Merging):
    """``merge-fixed``: merge every S0 steps with fixed weights; no forgetting or learning signal."""

    name = "merge-fixed"


class MergeEnd(Merging):
    """``merge-end``: one replay phase and one fusion at the end of each task."""

    name = "merge-end"
