"""Scoring one prediction against its gold answer, and choosing the metric of a task.

Rule for the metric of a task (override per task with ``--metric TASK=exact_match|rougeL``):

1. SuperNI classification tasks ``task363``, ``task875`` and ``task1687``: exact match.
2. Any other SuperNI task (a name ``task<digits>``): ROUGE-L (ALGORITHM.md §4.3).
3. Otherwise: exact match when the task's training outputs take at most ``MAX_CLASSES`` distinct
   values (a classification task), else ROUGE-L (free text).

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
