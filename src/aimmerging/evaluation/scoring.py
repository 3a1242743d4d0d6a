"""Scoring one prediction against its gold answer, and choosing the metric of a task.

Rule for the metric of a task (override per task with ``--metric TASK=exact_match|rougeL``):

1. SuperNI classification tasks ``task363``, ``task875`` and ``task1687``: exact match.
2. Any other SuperNI task (a name ``task<digits>``): ROUGE-L (ALGORITHM.md §4.3).
3. Otherwise: exact match when the task's training outputs take at most ``MAX_CLASSES`` distinct
   values (a classification task), else ROUGE-L (free text).

With ``scoring="reference"`` (``--protocol reference``) two answers are scored as the reference's
SuperNI scripts score them (ALGORITHM.md §4.3), for one metric only: in OP, a task363 answer
``pos`` / ``neg`` counts as its label ``p`` / ``n``; in FWT, task1687 is scored by ROUGE-L (the
script's list names task195, the task that file holds). :func:`use_scores` gives those scores.

Exact match compares ``prediction.strip().lower()`` with ``gold.strip().lower()``. ROUGE-L is the
F-measure of ``rouge_score`` (``rougeL``, Porter stemming), on lower-cased texts.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

METRICS = ("exact_match", "rougeL")
SUPERNI_ACCURACY_TASKS = frozenset({"task363", "task875", "task1687"})
MAX_CLASSES = 50


def normalize(text: str) -> str:
    return text.strip().lower()


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, gold: str) -> float:
    return float(_rouge().score(normalize(gold), normalize(prediction))["rougeL"].fmeasure)


SCORERS = {"exact_match": exact_match, "rougeL": rouge_l}


def choose_metric(task: str, train_outputs: Iterable[str]) -> str:
    if task in SUPERNI_ACCURACY_TASKS:
        return "exact_match"
    if re.fullmatch(r"task\d+", task):
        return "rougeL"
    return "exact_match" if len(set(train_outputs)) <= MAX_CLASSES else "rougeL"


# The reference's per-use exceptions (``scoring="reference"``): OP maps answers, FWT changes metric.
REFERENCE_OP_ANSWERS = {"task363": {"pos": "p", "neg": "n"}}
REFERENCE_FWT_METRICS = {"task1687": "rougeL"}


def use_scores(task: str, metric: str, rows: Iterable[dict], scoring: str) -> dict[str, float]:
    """The task's score for the uses ("op", "fwt") where the reference scores the same answers
    differently from ``metric``; empty when none does. ``rows``: ``{"prediction", "gold"}`` dicts."""
    if scoring != "reference":
        return {}
    rows = list(rows)
    if not rows:
        return {}
    out: dict[str, float] = {}
    answers = REFERENCE_OP_ANSWERS.get(task)
    if answers is not None:
        scorer = SCORERS[metric]
        mapped = [scorer(answers.get(normalize(r["prediction"]), r["prediction"]), r["gold"]) for r in rows]
        out["op"] = sum(mapped) / len(mapped)
    fwt_metric = REFERENCE_FWT_METRICS.get(task)
    if fwt_metric is not None and fwt_metric != metric:
        scorer = SCORERS[fwt_metric]
        out["fwt"] = sum(scorer(r["prediction"], r["gold"]) for r in rows) / len(rows)
    return out
