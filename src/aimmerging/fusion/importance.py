"""Importance-masked fusion (Recurrent-KIF, ACL 2025, arXiv 2502.17510): parameter importance as
exponential moving averages of |w * grad|, global top-fraction binary masks, and the merge of an
inner and an outer task vector through those masks.

* :class:`ImportanceEMA` keeps, per tensor, the sensitivity EMA ``s <- b1 s + (1 - b1) |w * g|``
  and the uncertainty EMA ``u <- b2 u + (1 - b2) |(|w * g|) - s|`` (``s`` already updated); the
  score of an entry is ``s * u``. This is the first-order Taylor importance of AdaLoRA as the
  Recurrent-KIF code applies it (b1 = b2 = 0.85, both EMAs starting at 0); the paper describes
  the same smoothing of |w * grad| and an uncertainty term. Each update takes the parameters as they
  are after an optimizer step and that step's gradient (after clipping), as the reference does. An
  update whose |w * g| is not finite is not applied (``update`` returns False).
* :func:`top_fraction_masks`: 1 where an entry's score is strictly above the ``1 - keep``
  quantile (linear interpolation, as ``torch.quantile``) of *all* entries of all tensors together,
  else 0: about the top ``keep`` fraction (reference: 20 %); ties at the threshold are left out,
  so all-equal scores select nothing.
* :func:`importance_mask`: the fusion of one tensor, ``base + w_in * d_in + w_out * d_out`` with
  per-entry weights from the two masks: (1, 0) where only the inner mask selects the entry, (0, 1)
  where only the outer does, (0.4, 0.6) where both do and ``weights`` where neither does
  (Recurrent-KIF: 0.5, 0.5). The constants are those of the Recurrent-KIF code
  (``update_parameters_with_task_vectors``), which the paper's text does not give.
* :func:`fuse_masked_in_place`: the same over every LoRA tensor, written only when every fused value
  is finite (the contract of :func:`aimmerging.fusion.fuse_in_place`).
* :class:`ImportanceTracker`: the state of the registered fusion rule ``importance-mask``
  (parameters ``keep`` = 0.2, ``beta1`` = ``beta2`` = 0.85): an inner and an outer
  :class:`ImportanceEMA`, fed after every optimizer step of the phase it is in (``phase``:
  ``"inner"`` for task steps, ``"outer"`` for replay steps); at a merge it gives each tensor the
  two top-``keep`` masks, and after it empties the inner EMA and keeps the outer one for the task
  (Recurrent-KIF's flags). ``methods/rkif.py`` uses it, and so does AIMMerging with ``--fusion
  importance-mask``: there the weights where neither mask selects an entry are the controller's
  scheduled ``(w_in, w_out)`` of the merge (Recurrent-KIF: 0.5, 0.5), the rest as above.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .rules import Param, fusion_rule, weighted_sum, write_if_finite

BOTH_SELECTED = (0.4, 0.6)  # (inner, outer) weight where both masks select an entry (Recurrent-KIF code)
NEITHER_SELECTED = (0.5, 0.5)  # the same where neither does (Recurrent-KIF code)


class ImportanceEMA:
    """Sensitivity and uncertainty EMAs of |w * grad|, one pair of tensors per parameter tensor."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.reset()

    def reset(self) -> None:
        self.sensitivity: Optional[list[torch.Tensor]] = None
        self.uncertainty: Optional[list[torch.Tensor]] = None
        self.updates = 0

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> bool:
        """One EMA step from the parameters and their gradients (None: a zero gradient). Returns
        False, changing nothing, when some |w * g| is not finite."""
        ipt = [(p.float() * g.float()).abs() if g is not None else torch.zeros_like(p, dtype=torch.float32)
               for p, g in zip(params, grads, strict=True)]
        if not all(bool(torch.isfinite(t).all()) for t in ipt):
            return False
        if self.sensitivity is None:
            self.sensitivity = [torch.zeros_like(t) for t in ipt]
            self.uncertainty = [torch.zeros_like(t) for t in ipt]
        b1, b2 = self.beta1, self.beta2
        for s, u, t in zip(self.sensitivity, self.uncertainty, ipt):
            s.mul_(b1).add_(t, alpha=1 - b1)
            u.mul_(b2).add_((t - s).abs(), alpha=1 - b2)
        self.updates += 1
        return True

    def scores(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sensitivity x uncertainty per entry; zeros shaped as ``like`` before the first update."""
        if self.sensitivity is None:
            return [torch.zeros_like(p, dtype=torch.float32) for p in like]
        return [s * u for s, u in zip(self.sensitivity, self.uncertainty)]


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for any number of entries
    (``torch.quantile`` refuses inputs of more than 2**24)."""
    flat = values.flatten()
    pos = q * (flat.numel() - 1)
    lo = math.floor(pos)
    low = flat.kthvalue(lo + 1).values
    if pos == lo:
        return low
    return low + (pos - lo) * (flat.kthvalue(lo + 2).values - low)


@torch.no_grad()
def top_fraction_masks(scores: Sequence[torch.Tensor], keep: float = 0.2) -> list[torch.Tensor]:
    """Per tensor, 1.0 where the score is strictly above the global ``1 - keep`` quantile of all
    scores, else 0.0."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    threshold = quantile(torch.cat([s.flatten().float() for s in scores]), 1.0 - keep)
    return [(s > threshold).float() for s in scores]


class ImportanceTracker:
    """The state of ``importance-mask`` (module docstring): inner and outer importance EMAs."""

    def __init__(self, keep: float = 0.2, beta1: float = 0.85, beta2: float = 0.85):
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        self.keep = keep
        self.inner, self.outer = ImportanceEMA(beta1, beta2), ImportanceEMA(beta1, beta2)
        self.phase = "inner"
        self.last_masks: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None

    def observe(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> None:
        (self.inner if self.phase == "inner" else self.outer).update(params, grads)

    def masks(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The inner and outer top-``keep`` masks, one per tensor of ``params``."""
        m_in = top_fraction_masks(self.inner.scores(params), self.keep)
        m_out = top_fraction_masks(self.outer.scores(params), self.keep)
        self.last_masks = (m_in, m_out)
        return m_in, m_out

    def tensor_kwargs(self, params: Sequence[torch.Tensor]) -> list[dict]:
        m_in, m_out = self.masks(params)
        return [{"masks": [mi.to(p.device), mo.to(p.device)]} for p, mi, mo in zip(params, m_in, m_out, strict=True)]

    def merged(self) -> None:
        self.inner.reset()


@fusion_rule("importance-mask",
             Param("keep", float, 0.2, "fraction of all LoRA entries each importance mask selects",
                   lambda v: 0 < v <= 1, "be in (0, 1]"),
             Param("beta1", float, 0.85, "EMA coefficient of the sensitivity |w * grad|", lambda v: 0 < v < 1,
                   "be in (0, 1)"),
             Param("beta2", float, 0.85, "EMA coefficient of the uncertainty", lambda v: 0 < v < 1, "be in (0, 1)"),
             state=ImportanceTracker)
def importance_mask(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                    masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """base + w_in * delta_in + w_out * delta_out, the per-entry weights chosen by the inner and
    outer ``masks`` (see the module docstring); ``weights`` apply where neither mask is set."""
    (m_in, m_out), (w_in, w_out) = masks, weights
    both, neither = m_in * m_out, (1 - m_in) * (1 - m_out)
    only_in, only_out = m_in - both, m_out - both
    per_entry_in = only_in + BOTH_SELECTED[0] * both + float(w_in) * neither
    per_entry_out = only_out + BOTH_SELECTED[1] * both + float(w_out) * neither
    return weighted_sum(base, deltas, [per_entry_in.to(base.dtype), per_entry_out.to(base.dtype)])


@torch.no_grad()
def fuse_masked_in_place(params, anchor, theta_k, masks_in, masks_out,
                         weights: Sequence[float] = NEITHER_SELECTED) -> bool:
    """theta <- anchor + W_in * (theta_k - anchor) + W_out * (theta - theta_k) in place, with the
    per-entry weights of :func:`importance_mask`. Like :func:`aimmerging.fusion.fuse_in_place`:
    nothing is written, and False returned, when a fused value is not finite."""
    fused = [importance_mask(a, [k - a, p - k], weights, masks=[mi.to(p.device), mo.to(p.device)])
             for p, a, k, mi, mo in zip(params, anchor, theta_k, masks_in, masks_out, strict=True)]
    return write_if_finite(params, fused)


__all__ = ["BOTH_SELECTED", "NEITHER_SELECTED", "ImportanceEMA", "ImportanceTracker", "fuse_masked_in_place",
           "importance_mask", "quantile", "top_fraction_masks"]
