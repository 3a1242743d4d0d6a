"""Continual-learning metrics as pure functions of the accuracy matrix.

``a[i][j]`` is the score on task j of the model after training tasks 0..i (fractions in [0, 1];
``None`` where not evaluated). With T tasks (definitions as in the AIMMerging reference,
ALGORITHM.md §4.4):

* OP  (overall performance)  = (1/T) * sum_j round(a[T-1][j], 4)
* BWT (backward transfer)    = (1/(T-1)) * sum_{j<T-1} (a[T-1][j] - a[j][j])
* FWT (forward transfer)     = (1/T) * sum_t (a[t][t] - ref[t]), ``ref[t]`` the score of an adapter
  trained on task t alone from the base model (the ``single`` method); the first task is included.

Each returns ``None`` when an entry it needs is missing or when it is undefined (BWT with T = 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

Matrix = Sequence[Sequence[Optional[float]]]


def _check_square(a: Matrix) -> int:
    T = len(a)
    if any(len(row) != T for row in a):
        raise ValueError("the accuracy matrix must be square (T x T)")
    return T


def op(a: Matrix) -> float | None:
    T = _check_square(a)
    if T == 0 or any(x is None for x in a[T - 1]):
        return None
    return sum(round(x, 4) for x in a[T - 1]) / T


def bwt(a: Matrix) -> float | None:
    T = _check_square(a)
    if T < 2:
        return None
    pairs = [(a[T - 1][j], a[j][j]) for j in range(T - 1)]
    if any(x is None or d is None for x, d in pairs):
        return None
    return sum(x - d for x, d in pairs) / (T - 1)


def fwt(a: Matrix, reference: Sequence[Optional[float]] | None) -> float | None:
    T = _check_square(a)
    if T == 0 or reference is None:
        return None
    if len(reference) != T:
        raise ValueError(f"FWT needs one reference score per task ({T}), got {len(reference)}")
    pairs = [(a[t][t], reference[t]) for t in range(T)]
    if any(x is None or r is None for x, r in pairs):
        return None
    return sum(x - r for x, r in pairs) / T


def all_metrics(a: Matrix, reference: Sequence[Optional[float]] | None = None, *,
                op_matrix: Matrix | None = None, fwt_matrix: Matrix | None = None) -> dict[str, float | None]:
    """OP, BWT and FWT of ``a``; ``op_matrix`` / ``fwt_matrix``: the matrix OP / FWT read instead,
    where a protocol scores some answers differently for them (the reference's SuperNI scripts)."""
    return {"op": op(op_matrix or a), "bwt": bwt(a), "fwt": fwt(fwt_matrix or a, reference)}
