"""Recurrent-KIF: Recurrent Knowledge Identification and Fusion (Feng et al., ACL 2025, arXiv
2502.17510), AIMMerging's direct predecessor, on the LoRA tensors.

For every task after the first (the first has no memory and trains plainly), repeatedly:

1. inner loop: ``rkif_inner_steps`` (Q = 8) task steps; after each, the inner importance EMA of
   |w * grad| is updated (:class:`aimmerging.fusion.importance.ImportanceEMA`);
2. outer loop: theta_k <- theta; ``rkif_outer_steps`` (4) replay updates on random memory
   batches, each followed by an update of the outer importance EMA;
3. fusion: with M_in, M_out the top ``rkif_keep`` (20 %) masks of the inner and outer importance
   over all LoRA entries, theta <- anchor + W_in * (theta_k - anchor) + W_out * (theta - theta_k)
   (the fusion rule ``importance-mask`` through ``aimmerging.fusion.fuse_in_place``, its state an
   ``ImportanceTracker``: weight 1 for the one task vector whose mask selects an entry, 0.4/0.6
   where both do, 0.5/0.5 where neither does); anchor <- theta; the inner EMA is emptied, the
   outer one kept. AIMMerging offers the same merge as ``--fusion importance-mask``.

Constants and their sources. Q = 8, 4 outer steps, the 2 % memory: the paper and its training
script (``--inner_iterations=8 --outer_iterations=4``). beta1 = beta2 = 0.85, top 20 % (the 0.8
quantile), the 0.4/0.6 and 0.5/0.5 weights, the score = sensitivity EMA x uncertainty EMA, the
global (not per-tensor) threshold, the inner EMA emptied at every fusion and the outer one kept
for the whole task (``--empty_inner_score_flag=1``, ``empty_outer_score_flag`` 0 by default): the
Recurrent-KIF code (``utils/lora_importance_bilevel.py``, ``trainer.py``), read, not copied.

Choices where the paper is silent, and how they follow the code:

* the importance of a step uses the parameters after the optimizer step and that step's gradient
  after clipping, taken from a post-step hook on the optimizer (the code updates the scores right
  after ``optimizer.step()``, before ``zero_grad``); a step the engine skips (non-finite loss or
  gradient) updates nothing, and a non-finite |w * g| is not folded in;
* the replay updates use the task's own optimizer at its current learning rate, without stepping
  its LR schedule, with the loss divided by the accumulation steps, as the code does (it builds an
  ``outer_lr`` optimizer but steps the inner one); memory batches have ``--memory-batch-size``
  examples (the code: 8), a fresh random draw each;
* a fusion happens after every Q-th step of the task (step % Q == 0, counted from the task start);
  the steps after the last multiple of Q stay in the adapter unfused, as in the code;
* the memory and its sampling are the harness's (``--memory-ratio``), as for every replay method.

Nothing outlives a stage (the EMAs start empty at every task, as each task of the reference is a
fresh process), so there is no ``state_dict``. Every fusion adds a ``{"event": "fusion", ...}``
record with the replay loss, the entries the inner mask selects (``selected``), those both masks
select (``overlap``) and any fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import fusion
from ..fusion.importance import NEITHER_SELECTED, ImportanceTracker
from ..models.lora import restore, snapshot
from ..settings import Bounded, option
from . import register_method
from .base import Method


@dataclass
class RKIFSettings(Bounded):
    rkif_inner_steps: int = option(8, "rkif: task steps between two fusions (the inner loop, Q)", maximum=100_000,
                                   ge=1)
    rkif_outer_steps: int = option(4, "rkif: replay updates on memory batches before each fusion (the outer loop)",
                                   maximum=100_000, ge=0)
    rkif_beta1: float = option(0.85, "rkif: EMA coefficient of the sensitivity |w * grad|", gt=0, lt=1)
    rkif_beta2: float = option(0.85, "rkif: EMA coefficient of the uncertainty |(|w * grad|) - sensitivity|",
                               gt=0, lt=1)
    rkif_keep: float = option(0.2, "rkif: fraction of all LoRA entries each importance mask selects", gt=0, le=1)


@register_method
class RecurrentKIF(Method):
    name = "rkif"
    paper = "Recurrent-KIF (ACL 2025, arXiv 2502.17510)"
    summary = ("every Q task steps, replay steps on memory, then an importance-masked fusion of the task and "
               "replay updates (top-k masks of EMA abs(w * grad); --rkif-inner-steps, --rkif-outer-steps)")
    Settings = RKIFSettings
    uses_memory = True

    def before_task(self, view) -> None:
        self.active = bool(view.memory)
        if not self.active:
            return
        s = self.settings
        self.tracker = ImportanceTracker(s.rkif_keep, s.rkif_beta1, s.rkif_beta2)
        self.inner, self.outer = self.tracker.inner, self.tracker.outer
        self.hook = view.optimizer.register_step_post_hook(fusion.optimizer_hook(self.tracker, view.params))
        self.anchor = snapshot(view.params)

    def after_step(self, view, record):
        if not self.active or view.step % self.settings.rkif_inner_steps:
            return None
        with view.timed("bookkeeping"):
            theta_k = snapshot(view.params)
        self.tracker.phase = "outer"
        with view.timed("replay"):
            losses = [view.update(view.memory.sample(view.rng("replay"), view.memory_batch_size), view.optimizer,
                                  1.0 / view.grad_accum) for _ in range(self.settings.rkif_outer_steps)]
        self.tracker.phase = "inner"
        with view.timed("bookkeeping"):
            fallback = None
            # the fusion empties the inner EMA (tracker.merged); the masks it used are tracker.last_masks
            if not fusion.fuse_in_place(view.params, self.anchor, theta_k, *NEITHER_SELECTED, "importance-mask",
                                        state=self.tracker):
                restore(view.params, theta_k)
                fallback = "theta_k (non-finite fusion: replay update dropped)"
            m_in, m_out = self.tracker.last_masks
            self.anchor = snapshot(view.params)
        done = [x for x in losses if x is not None]
        return [{"event": "fusion", "step": view.step, "replay_loss": sum(done) / len(done) if done else None,
                 "replay_skipped": len(losses) - len(done), "selected": int(sum(m.sum() for m in m_in)),
                 "overlap": int(sum((a * b).sum() for a, b in zip(m_in, m_out))), "fallback": fallback}]

    def after_task(self, view):
        if self.active:
            self.hook.remove()
            self.active = False
        return None
