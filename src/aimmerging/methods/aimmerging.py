"""AIMMerging (Adaptive Iterative Model Merging, EMNLP 2025, arXiv 2509.17348) and its two
ablations, one class driven by the merge controller.

For every task after the first (the first has no memory and trains plainly), after each inner step:

1. history loss: the loss on a random memory batch, no gradients (the forgetting probe; options,
   all off by default: ``--probe-size`` examples instead of a memory batch, ``--probe-set window``
   one batch per merge window instead of a fresh one per step, ``--probe-average N`` the mean of
   the window's last N losses: the lower-noise variants of BENCHMARKS.md's probe study);
2. Delta_in L1: sum |theta - theta_anchor| (the adapter's move since the last merge);
3. the controller decides; on a merge: theta_k <- theta; ``outer_steps`` replay steps on memory
   batches; theta <- fusion(anchor, [theta_k - anchor, theta - theta_k], [w_in, w_out]); anchor <- theta.

The fusion rule is ``--fusion`` (any rule of ``aimmerging.fusion.FUSION_RULES``; default the
reference's ``weighted-sum``) with ``--fusion-params NAME=VALUE,...`` (e.g. ``--fusion dare
--fusion-params rate=0.3,seed=1``; checked when the config is built). A random rule (DARE) draws
fresh masks at every merge: its seed is mixed with a draw of the stage's ``fusion`` random stream
and the tensor's index. A rule with state (``importance-mask``, Recurrent-KIF's importance-masked
merge) gets it here: the state is created at the task start, fed after every optimizer step (a
post-step hook on the task's optimizer and on the separate replay optimizer), in the ``inner``
phase for task steps and the ``outer`` phase for replay steps, and handed to the fusion, where
the controller's ``(w_in, w_out)`` apply to the entries neither importance mask selects.

``merge-fixed`` is this method with the ``fixed`` schedule (merge every S0 steps, fixed weights)
and ``merge-end`` with the ``end`` schedule (one replay phase and fusion at the task end); neither
probes the memory.

Non-finite values: the engine skips every optimizer step (inner or replay) whose loss, gradient or
resulting adapter is not finite, so the anchor and theta_k are always finite. A non-finite history
loss is recorded as null with ``probe_skipped`` and not fed to the controller. The fall-backs stay
as a second line of defence: an adapter that is not finite after a step (only a method hook could
make it so) falls back to the anchor; a fusion whose result is not finite is never written and
the adapter falls back to theta_k (the replay update is dropped); both are recorded (``fallback``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Optional

import torch

from ..controller import ControllerConfig, MergeController, MergeDecision
from .. import fusion
from ..fusion import FUSION_RULES, given_params, params_help
from ..models.lora import all_finite, l1_distance, restore, snapshot
from ..settings import check_bounds, option
from . import register_method
from .base import Method

OUTER_WARMUP_STEPS, OUTER_SCHEDULE_STEPS = 50, 200  # the separate replay optimizer's linear schedule
OUTER_OPTIMIZERS = ("inner", "separate")
PROBE_SETS = ("random", "window")
OUTER_OPTIMIZER_HELP = ("replay steps use the task's optimizer at its current LR (reference) or a separate AdamW; "
                        "merge-end's default is 'separate' (its replay phase comes at the task end, where the task's "
                        "LR has reached 0)")


@dataclass
class MergingSettings(ControllerConfig):
    """The controller's settings plus how the probe, the replay steps and the fusion run."""

    probe_mode: str = option("train", "forgetting probe: 'train' (reference: dropout on, loss / accumulation) or 'eval'", ("train", "eval"))
    probe_size: Optional[int] = option(None, "examples per forgetting probe (default: --memory-batch-size; the "
                                       "reference probes with its training batch, 32 examples)", gt=0)
    probe_set: str = option("random", "forgetting probe examples: a fresh random memory batch at every step "
                            "(reference), or one batch per merge window, the same at every step until the next "
                            "merge (the loss then moves with the adapter only)", PROBE_SETS)
    probe_average: int = option(1, "feed the controller the mean of the window's last N history losses (1: each "
                                "step's own, reference; larger: less noise, slower to react)", ge=1)
    outer_optimizer: str = option("inner", OUTER_OPTIMIZER_HELP, OUTER_OPTIMIZERS)
    outer_lr: float = option(1e-3, "learning rate of the separate replay optimizer (--outer-optimizer separate)",
                             gt=0)
    fusion: str = option("weighted-sum", "fusion rule of a merge", FUSION_RULES.choices())
    fusion_params: Optional[dict] = option(None, "parameters of the fusion rule, NAME=VALUE,... (rules with "
                                           f"parameters and their defaults: {params_help()}); a method's flag "
                                           "--RULE-PARAM sets one too (--fusion dare --dare-rate 0.3)",
                                           pairs="NAME=VALUE")

    def __post_init__(self) -> None:
        super().__post_init__()  # the controller's rules
        check_bounds(self)
        if self.fusion in FUSION_RULES:  # an unknown rule is reported by its choices
            self.fusion_params = given_params(self.fusion, self.fusion_params)

    def controller_config(self, schedule: Optional[str] = None) -> ControllerConfig:
        names = {f.name for f in fields(ControllerConfig)}
        values = {n: getattr(self, n) for n in names}
        if schedule is not None:
            values["schedule"] = schedule
        return ControllerConfig(**values)


def controller_step(controller: MergeController, params, anchor, step: int, record: dict) -> Optional[MergeDecision]:
    """The bookkeeping after one inner step (shared with ``aimmerging.hf``'s callback): a
    non-finite adapter falls back to the anchor; the L1 of the move since the anchor and the
    step's ``history_loss`` (None when not finite) go to the controller; the step record gets
    ``delta_in_l1``, ``interval`` and ``threshold``. Returns the merge decision, if any."""
    if not all_finite(params):
        restore(params, anchor)
        record["fallback"] = "anchor (non-finite adapter after the step)"
    l1 = l1_distance(params, anchor)
    record["delta_in_l1"] = l1
    decision = None
    if record["history_loss"] is not None or not controller.needs_history_loss:
        decision = controller.observe(step, record["history_loss"], l1)
    record["interval"] = controller.interval if decision is None else decision.interval
    record["threshold"] = controller.threshold if decision is None else decision.threshold
    return decision


def fuse_or_fall_back(params, anchor, theta_k, d: MergeDecision, rule, rule_params=None, *, state=None,
                      salt=None) -> Optional[str]:
    """Fuse in place with the decision's weights (``rule_params``, ``state`` and ``salt`` as
    :func:`aimmerging.fusion.fuse_in_place`); a non-finite fusion (not written, or undone) falls
    back to ``theta_k``, the adapter before the replay steps. Returns the fallback, if any.
    (Shared with ``aimmerging.hf``'s callback.)"""
    extra = {k: v for k, v in (("rule_params", rule_params), ("state", state), ("salt", salt)) if v is not None}
    # the module attribute, so that a test can fault the fusion by patching aimmerging.fusion
    fused = fusion.fuse_in_place(params, anchor, theta_k, d.w_in, d.w_out, rule, **extra)
    if fused is False or not all_finite(params):
        restore(params, theta_k)
        return "theta_k (non-finite fusion: replay update dropped)"
    return None


def merge_record(d: MergeDecision, losses: list[Optional[float]], fallback: Optional[str]) -> dict:
    """The trace record of one merge: the decision, the replay steps' mean loss and skips, the fallback."""
    done = [x for x in losses if x is not None]
    return {"event": "merge", **d.to_dict(), "replay_loss": sum(done) / len(done) if done else None,
            "replay_skipped": len(losses) - len(done), "fallback": fallback}


@register_method
class Merging(Method):
    name = "aimmerging"
    paper = "AIMMerging (EMNLP 2025, arXiv 2509.17348)"
    summary = ("replay memory + merge controller: forgetting signal triggers merges, learning signal sets the "
               "interval, each merge fuses the new-task update with a replay update")
    Settings = MergingSettings
    uses_memory = True
    forced_schedule: ClassVar[Optional[str]] = None  # the ablations fix the schedule whatever --schedule says

    def before_task(self, view) -> None:
        self.active = bool(view.memory)
        if not self.active:
            return
        config = self.settings.controller_config(self.forced_schedule)
        self.controller = MergeController(config)
        self.outer = None
        if self.settings.outer_optimizer == "separate":
            from transformers import get_linear_schedule_with_warmup

            opt = torch.optim.AdamW(view.params, lr=self.settings.outer_lr)
            self.outer = (opt, get_linear_schedule_with_warmup(opt, OUTER_WARMUP_STEPS, OUTER_SCHEDULE_STEPS))
        self.fusion_state, self.hooks = None, []
        rule = self.settings.fusion
        factory = fusion.rule_state(rule)
        if factory is not None:  # the rule's state, fed after every optimizer step of this task
            self.fusion_state = factory(**fusion.resolve_params(rule, self.settings.fusion_params))
            hook = fusion.optimizer_hook(self.fusion_state, view.params)
            optimizers = [view.optimizer] + ([self.outer[0]] if self.outer else [])
            self.hooks = [opt.register_step_post_hook(hook) for opt in optimizers]
        with view.timed("bookkeeping"):
            self.anchor = snapshot(view.params)
        self.probe_batch, self.recent = None, []  # the window's probe batch and history losses (options)
        view.emit({"event": "task_start", "step": 0, "memory_size": len(view.memory), "controller": config.to_dict()})

    def probe(self, view) -> float:
        """History loss on a memory batch of ``probe_size`` examples, no gradients: a fresh random
        one every step, or (``probe_set: window``) the one drawn at the first step of the merge
        window. Reference mode: train mode (dropout on) and the loss divided by the accumulation
        steps; eval mode: the plain loss."""
        size = self.settings.probe_size or view.memory_batch_size
        if self.settings.probe_set == "window":
            if self.probe_batch is None:
                self.probe_batch = view.memory.sample(view.rng("probe"), size)
            batch = self.probe_batch
        else:
            batch = view.memory.sample(view.rng("probe"), size)
        if self.settings.probe_mode == "train":
            return view.mean_loss(batch, train_mode=True) / view.grad_accum
        return view.mean_loss(batch, train_mode=False)

    def replay(self, view, steps: int) -> list[Optional[float]]:
        """``steps`` replay updates on fresh random memory batches (loss / accumulation, as the
        reference does), with the task's optimizer or the separate one. Returns their losses."""
        opt, sched = self.outer if self.outer else (view.optimizer, None)
        losses = []
        for _ in range(steps):
            batch = view.memory.sample(view.rng("replay"), view.memory_batch_size)
            losses.append(view.update(batch, opt, 1.0 / view.grad_accum))
            if sched is not None:
                sched.step()
        return losses

    def after_step(self, view, record):
        if not self.active:
            return None
        c = self.controller
        if c.needs_history_loss:
            with view.timed("probe"):
                h = self.probe(view)
            if math.isfinite(h):
                record["history_loss"] = self.smoothed(h, record)
            else:
                record["history_loss"] = None
                record["probe_skipped"] = "non-finite history loss"
        with view.timed("bookkeeping"):
            decision = controller_step(c, view.params, self.anchor, view.step, record)
        return [self.merge(view, decision)] if decision else None

    def smoothed(self, h: float, record: dict) -> float:
        """The history loss fed to the controller: ``h``, or (``probe_average`` N > 1) the mean of
        the window's last N probe losses, ``h`` included (the step record keeps ``h`` as
        ``probe_loss``; ``history_loss`` is what the controller saw, so a trace replays)."""
        n = self.settings.probe_average
        if n == 1:
            return h
        self.recent = (self.recent + [h])[-n:]
        record["probe_loss"] = h
        return sum(self.recent) / len(self.recent)

    def after_task(self, view):
        if not self.active:
            return None
        with view.timed("bookkeeping"):
            decision = self.controller.end_of_task(view.step, l1_distance(view.params, self.anchor))
        extra = [self.merge(view, decision)] if decision else None
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        return extra

    def merge(self, view, d: MergeDecision) -> dict:
        with view.timed("bookkeeping"):
            theta_k = snapshot(view.params)
        state = self.fusion_state
        if state is not None:
            state.phase = "outer"
        with view.timed("replay"):
            losses = self.replay(view, d.outer_steps)
        if state is not None:
            state.phase = "inner"
        rule = self.settings.fusion
        salt = view.rng("fusion").getrandbits(63) if any(p.seed for p in fusion.rule_params(rule)) else None
        with view.timed("bookkeeping"):
            fallback = fuse_or_fall_back(view.params, self.anchor, theta_k, d, rule, self.settings.fusion_params,
                                         state=state, salt=salt)
            self.anchor = snapshot(view.params)
        self.probe_batch, self.recent = None, []  # a new merge window
        return merge_record(d, losses, fallback)


@register_method
class MergeFixed(Merging):
    """``merge-fixed``: fixed-interval merging with replay: merge every S0 steps with the fixed
    weights; no forgetting or learning signal."""

    name = "merge-fixed"
    paper = "fixed-interval merging with replay (AIMMerging ablation)"
    summary = "ablation: merge every S0 steps with fixed weights (--fixed-w-in/--fixed-w-out), no signals"
    forced_schedule = "fixed"


@dataclass
class MergeEndSettings(MergingSettings):
    """``merge-end``'s settings: those of AIMMerging, with the separate replay optimizer by default."""

    outer_optimizer: str = option("separate", OUTER_OPTIMIZER_HELP, OUTER_OPTIMIZERS)


@register_method
class MergeEnd(Merging):
    """``merge-end``: one replay phase and one fusion at the end of each task.

    Its replay phase runs on the separate AdamW (``--outer-lr``, warm-up of 50 steps) by default:
    with the task's own optimizer at its current LR, as AIMMerging's merges do, the phase would run
    at the end of the linear schedule, LR 0, and change nothing (the merge would only keep
    ``w_in`` of the task's update)."""

    name = "merge-end"
    paper = "merge once at the task end (AIMMerging ablation)"
    summary = "ablation: one replay phase and one fusion at the end of each task"
    Settings = MergeEndSettings
    forced_schedule = "end"
