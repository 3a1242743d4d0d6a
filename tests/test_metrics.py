"""CL metrics (evaluation/metrics.py, ALGORITHM.md §4.4) and per-example scoring (evaluation/scoring.py, §4.3)."""

from __future__ import annotations

import pytest

from aimmerging.evaluation.metrics import all_metrics, bwt, fwt, op
from aimmerging.evaluation.scoring import (
    MAX_CLASSES,
    METRICS,
    SCORERS,
    SUPERNI_ACCURACY_TASKS,
    choose_metric,
    exact_match,
    normalize,
    rouge_l,
)

# a[i][j] = score on task j after training tasks 0..i
A3 = [
    [0.90, 0.10, 0.20],
    [0.80, 0.85, 0.30],
    [0.70, 0.75, 0.95],
]
A2 = [
    [0.60, 0.50],
    [0.40, 0.80],
]


# -- OP --------------------------------------------------------------------------------------------

def test_op_3x3():
    # last row: (0.70 + 0.75 + 0.95) / 3 = 2.40 / 3 = 0.8
    assert op(A3) == pytest.approx(0.8, abs=1e-12)


def test_op_2x2():
    # last row: (0.40 + 0.80) / 2 = 0.6
    assert op(A2) == pytest.approx(0.6, abs=1e-12)


def test_op_rounds_each_entry_to_4_decimals():
    # round(0.00004, 4) = 0.0 twice -> 0.0 (unrounded mean would be 0.00004)
    assert op([[None, None], [0.00004, 0.00004]]) == 0.0
    # round(0.12346, 4) = 0.1235; (0.1235 + 0.5) / 2 = 0.31175 (unrounded: 0.31173)
    assert op([[None, None], [0.12346, 0.5]]) == pytest.approx(0.31175, abs=1e-12)


def test_op_needs_only_the_last_row():
    # entries above the last row may be missing
    assert op([[None, None, None], [None, None, None], [0.5, 0.25, 1.0]]) == pytest.approx(1.75 / 3, abs=1e-12)


def test_op_missing_entry_in_last_row_is_none():
    assert op([[0.9, None], [0.5, None]]) is None


def test_op_single_task_and_empty():
    assert op([[0.42]]) == pytest.approx(0.42)
    assert op([]) is None


# -- BWT -------------------------------------------------------------------------------------------

def test_bwt_3x3():
    # tasks 0, 1 (last excluded): ((0.70 - 0.90) + (0.75 - 0.85)) / 2 = (-0.20 - 0.10) / 2 = -0.15
    assert bwt(A3) == pytest.approx(-0.15, abs=1e-12)


def test_bwt_2x2():
    # (0.40 - 0.60) / 1 = -0.2
    assert bwt(A2) == pytest.approx(-0.2, abs=1e-12)


def test_bwt_is_not_rounded():
    # (0.123456 - 0.1) / 1 = 0.023456
    assert bwt([[0.1, None], [0.123456, 0.5]]) == pytest.approx(0.023456, abs=1e-12)


def test_bwt_undefined_for_single_task():
    assert bwt([[0.7]]) is None
    assert bwt([]) is None


def test_bwt_ignores_the_last_diagonal_entry_and_upper_triangle():
    # a[2][2] and a[0][1], a[0][2], a[1][2] are unused
    a = [[0.9, None, None], [0.5, 0.85, None], [0.70, 0.75, None]]
    assert bwt(a) == pytest.approx(-0.15, abs=1e-12)


@pytest.mark.parametrize("i, j", [(0, 0), (1, 1), (2, 0), (2, 1)])
def test_bwt_missing_needed_entry_is_none(i, j):
    a = [row[:] for row in A3]
    a[i][j] = None
    assert bwt(a) is None


# -- FWT -------------------------------------------------------------------------------------------

def test_fwt_3x3():
    # diagonal 0.90, 0.85, 0.95 minus reference 0.80, 0.90, 0.95:
    # (0.10 - 0.05 + 0.00) / 3 = 0.05 / 3
    assert fwt(A3, [0.80, 0.90, 0.95]) == pytest.approx(0.05 / 3, abs=1e-12)


def test_fwt_2x2_includes_first_task():
    # ((0.60 - 0.50) + (0.80 - 0.90)) / 2 = (0.10 - 0.10) / 2 = 0
    assert fwt(A2, [0.50, 0.90]) == pytest.approx(0.0, abs=1e-12)
    # ((0.60 - 0.40) + (0.80 - 0.80)) / 2 = 0.1
    assert fwt(A2, [0.40, 0.80]) == pytest.approx(0.1, abs=1e-12)


def test_fwt_without_reference_is_none():
    assert fwt(A3, None) is None


def test_fwt_missing_entries_are_none():
    assert fwt(A2, [0.5, None]) is None
    assert fwt([[None, 0.1], [0.2, 0.8]], [0.5, 0.5]) is None


@pytest.mark.parametrize("reference", [[0.5], [0.5, 0.5, 0.5, 0.5], []])
def test_fwt_reference_length_mismatch_raises(reference):
    with pytest.raises(ValueError, match="one reference score per task"):
        fwt(A3, reference)


@pytest.mark.parametrize("func", [op, bwt, lambda a: fwt(a, [0.1, 0.2])])
def test_non_square_matrix_raises(func):
    with pytest.raises(ValueError, match="square"):
        func([[0.1, 0.2], [0.3]])


def test_all_metrics():
    m = all_metrics(A2, [0.40, 0.80])
    assert set(m) == {"op", "bwt", "fwt"}
    assert m["op"] == pytest.approx(0.6, abs=1e-12)
    assert m["bwt"] == pytest.approx(-0.2, abs=1e-12)
    assert m["fwt"] == pytest.approx(0.1, abs=1e-12)
    assert all_metrics(A2)["fwt"] is None


# -- scoring ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gold, expected", [
    ("positive", "positive", 1.0),
    ("Positive", "positive", 1.0),
    ("  very Negative \n", "Very negative", 1.0),
    ("\tTrue", "true ", 1.0),
    ("positive.", "positive", 0.0),
    ("very  negative", "very negative", 0.0),  # inner whitespace is not normalised
    ("negative", "very negative", 0.0),
    ("", "positive", 0.0),
])
def test_exact_match(pred, gold, expected):
    assert exact_match(pred, gold) == expected


def test_normalize():
    assert normalize("  Hello World \n") == "hello world"


def test_rouge_l_identical_is_one():
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == pytest.approx(1.0)


def test_rouge_l_disjoint_is_zero():
    assert rouge_l("completely different words", "the cat sat") == 0.0


def test_rouge_l_partial_overlap():
    # gold has 6 tokens, prediction 2, LCS 2: P = 1, R = 1/3, F = 2 * (1/3) / (4/3) = 0.5
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(0.5)


def test_rouge_l_uses_stemming():
    assert rouge_l("cats running", "cat runs") == pytest.approx(1.0)


def test_rouge_l_empty_prediction_is_zero():
    assert rouge_l("", "the cat") == 0.0


def test_scorers_registry():
    assert METRICS == ("exact_match", "rougeL")
    assert SCORERS["exact_match"] is exact_match and SCORERS["rougeL"] is rouge_l


@pytest.mark.parametrize("task", ["task363", "task875", "task1687"])
def test_choose_metric_superni_classification_is_exact_match(task):
    assert task in SUPERNI_ACCURACY_TASKS
    many = [f"answer {i}" for i in range(200)]
    assert choose_metric(task, many) == "exact_match"


@pytest.mark.parametrize("task", ["task002", "task073", "task1290", "task1510", "task591"])
def test_choose_metric_other_superni_tasks_are_rouge(task):
    # even with few distinct outputs (task073 is multiple choice A-E, scored by ROUGE-L in the reference)
    assert choose_metric(task, list("ABCDE") * 10) == "rougeL"


def test_choose_metric_few_distinct_outputs_is_exact_match():
    assert choose_metric("agnews", ["World", "Sports", "Business", "Science or Technology"] * 100) == "exact_match"


def test_choose_metric_boundary_at_max_classes():
    assert MAX_CLASSES == 50
    assert choose_metric("mytask", [str(i) for i in range(50)] * 3) == "exact_match"
    assert choose_metric("mytask", [str(i) for i in range(51)]) == "rougeL"


def test_choose_metric_many_distinct_outputs_is_rouge():
    assert choose_metric("summaries", [f"summary number {i}" for i in range(500)]) == "rougeL"


def test_choose_metric_name_must_fully_match_superni_pattern():
    # 'task12a' is not a SuperNI name: the distinct-output rule applies
    assert choose_metric("task12a", ["a", "b"]) == "exact_match"
    assert choose_metric("mytask363", ["a", "b"]) == "exact_match"
