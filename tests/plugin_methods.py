"""A continual-learning method written outside the package, as a user would: replay plus a loss
term pulling the adapter towards the adapter the previous task ended with (an L2 anchor).
Registered with the public decorator; also reachable by import path ``plugin_methods:PullReplay``."""

from __future__ import annotations

from dataclasses import dataclass

import aimmerging
from aimmerging.methods.replay import Replay, ReplaySettings


@dataclass
class PullSettings(ReplaySettings):
    pull_weight: float = aimmerging.option(1.0, "pull-replay: weight of the L2 pull towards the previous task's adapter")


@aimmerging.register_method
class PullReplay(Replay):
    """Replay, plus pull_weight x ||theta - theta_previous_task||^2 on every micro-batch."""

    name = "pull-replay"
    Settings = PullSettings
    calls = 0  # how often the loss hook added a term (class-wide, for the tests)

    def before_task(self, view):
        self.previous = [p.detach().clone() for p in view.params]

    def extra_loss(self, view, inputs):
        if view.stage.index == 0:
            return None
        type(self).calls += 1
        return self.settings.pull_weight * sum(((p - q) ** 2).sum() for p, q in zip(view.params, self.previous))
