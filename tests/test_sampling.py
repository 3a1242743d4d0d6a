"""Memory rule and balanced subsampling (data/sampling.py, ALGORITHM.md §2.1) and task orders
(data/benchmarks.py, §1.1)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from aimmerging.data.benchmarks import BENCHMARKS, benchmark_names, resolve_tasks
from aimmerging.data.olora import Example, read_task
from aimmerging.data.sampling import balanced_subsample, build_memory, reference_memory_indices
from aimmerging.errors import ConfigError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "long_sequence"
LONG_SEQ_1 = ["mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon",
              "sst-2", "dbpedia", "agnews", "multirc", "yahoo"]


@pytest.fixture(scope="module")
def train() -> dict[str, list[Example]]:
    if not (DATA / "train").is_dir():
        pytest.skip(f"benchmark data not found at {DATA}")
    return {t: read_task(DATA, "train", t) for t in LONG_SEQ_1}


def examples(outputs: list[str], task: str = "t") -> list[Example]:
    return [Example(id=f"{task}_{i}", input=f"input {i}", output=o, task=task) for i, o in enumerate(outputs)]


def ids(exs) -> list[str]:
    return [e.id for e in exs]


# -- reference memory rule on the real data -----------------------------------------------------------

def test_long_sequence_order1_buffer_sizes(train):
    tasks = [train[t] for t in LONG_SEQ_1]
    sizes = [len(build_memory(tasks[:k])) for k in range(1, 15)]
    assert sizes == [20, 25, 45, 53, 73, 93, 113, 133, 153, 173, 193, 213, 233, 253]


def test_buffer_only_grows(train):
    tasks = [train[t] for t in LONG_SEQ_1]
    previous = build_memory(tasks[:1])
    for k in range(2, 15):
        current = build_memory(tasks[:k])
        assert ids(current[:len(previous)]) == ids(previous)
        previous = current


def test_buffer_contents_come_from_the_previous_tasks_in_order(train):
    tasks = [train[t] for t in LONG_SEQ_1[:4]]  # mnli 20, cb 5, wic 20, copa 8
    memory = build_memory(tasks)
    assert [e.task for e in memory] == ["mnli"] * 20 + ["cb"] * 5 + ["wic"] * 20 + ["copa"] * 8
    assert len(set(ids(memory))) == len(memory)


def test_dbpedia_one_per_class_plus_six_top_up(train):
    data = train["dbpedia"]
    outputs = [e.output for e in data]
    first_appearance = list(dict.fromkeys(outputs))
    assert len(first_appearance) == 14
    idx = reference_memory_indices(outputs, 2.0, random.Random(42))
    assert len(idx) == 20 and len(set(idx)) == 20
    # one per class, classes in order of first appearance, then 6 random top-up indices
    assert [outputs[i] for i in idx[:14]] == first_appearance
    counts = Counter(outputs[i] for i in idx)
    assert set(counts) == set(first_appearance)
    assert sum(c - 1 for c in counts.values()) == 6


@pytest.mark.parametrize("task, per_class, n_classes", [("amazon", 4, 5), ("copa", 4, 2)])
def test_per_class_counts(train, task, per_class, n_classes):
    memory = build_memory([train[task]])
    counts = Counter(e.output for e in memory)
    assert len(counts) == n_classes
    assert set(counts.values()) == {per_class}


def test_memory_is_deterministic_for_a_seed(train):
    tasks = [train[t] for t in LONG_SEQ_1[:5]]
    assert ids(build_memory(tasks, seed=42)) == ids(build_memory(tasks, seed=42))
    assert ids(build_memory(tasks, seed=42)) != ids(build_memory(tasks, seed=7))
    assert len(build_memory(tasks, seed=7)) == 73


def test_cap_per_task_keeps_the_head_of_each_selection(train):
    tasks = [train[t] for t in LONG_SEQ_1[:4]]  # contributions 20, 5, 20, 8
    full = build_memory(tasks)
    capped = build_memory(tasks, cap_per_task=6)
    assert len(capped) == 6 + 5 + 6 + 6
    starts, pos = [], 0
    for n in (20, 5, 20, 8):
        starts.append(pos)
        pos += n
    expected = []
    for start, n in zip(starts, (20, 5, 20, 8)):
        expected += full[start:start + min(n, 6)]
    assert ids(capped) == ids(expected)


def test_memory_ratio_changes_sizes(train):
    # 10 % of 1000 = 100 (mnli: 3 classes x 33 + 1), 10 % of 250 = 25
    assert len(build_memory([train["mnli"], train["cb"]], ratio_percent=10)) == 125


# -- synthetic cases -----------------------------------------------------------------------------------

def test_free_text_takes_one_per_distinct_output():
    # n = floor(160 * 2 / 100) = 3, but 160 distinct outputs -> per_class = 1 -> 160 examples
    data = examples([f"summary {i}" for i in range(160)])
    memory = build_memory([data])
    assert len(memory) == 160
    assert sorted(ids(memory)) == sorted(ids(data))


def test_free_text_cap_per_task_limits_the_quirk():
    data = examples([f"summary {i}" for i in range(160)])
    assert len(build_memory([data], cap_per_task=3)) == 3


def test_small_class_gives_all_it_has_and_top_up_fills():
    # 100 examples -> n = 2 at 2 %; 2 classes -> 1 each
    data = examples(["a"] * 99 + ["b"])
    assert Counter(e.output for e in build_memory([data])) == {"a": 1, "b": 1}
    # 10 % -> n = 10, 5 per class: "b" has 1 -> 5 + 1 = 6 drawn, top-up 4 from "a"
    assert Counter(e.output for e in build_memory([data], ratio_percent=10)) == {"a": 9, "b": 1}


def test_tiny_task_still_gives_one_per_class():
    # floor(40 * 2 / 100) = 0 but per_class = max(1, 0) = 1: one per class (reference rule)
    data = examples(["x", "y"] * 20)
    assert len(build_memory([data])) == 2


def test_no_previous_tasks_gives_empty_memory():
    assert build_memory([]) == []


# -- balanced_subsample -----------------------------------------------------------------------------

def three_classes() -> list[Example]:
    outs = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    random.Random(0).shuffle(outs)
    return examples(outs)


@pytest.mark.parametrize("cap", [3, 7, 12, 13, 29, 30])
def test_balanced_counts_differ_by_at_most_one(cap):
    sub = balanced_subsample(three_classes(), cap, seed=1)
    counts = Counter(e.output for e in sub)
    assert len(sub) == cap
    assert set(counts) == {"a", "b", "c"}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len(set(ids(sub))) == cap


def test_balanced_small_class_exhausted_then_others_share():
    # cap 40: "c" gives all 10, "a" and "b" 15 each
    counts = Counter(e.output for e in balanced_subsample(three_classes(), 40, seed=1))
    assert counts == {"a": 15, "b": 15, "c": 10}


def test_balanced_reproducible_for_seed_and_differs_for_another():
    data = three_classes()
    assert ids(balanced_subsample(data, 12, seed=5)) == ids(balanced_subsample(data, 12, seed=5))
    assert ids(balanced_subsample(data, 12, seed=5)) != ids(balanced_subsample(data, 12, seed=6))
    assert ids(balanced_subsample(data, 12, seed="x")) == ids(balanced_subsample(data, 12, seed="x"))


@pytest.mark.parametrize("cap", [None, 60, 61, 1000])
def test_balanced_cap_none_or_large_keeps_everything_in_order(cap):
    data = three_classes()
    assert balanced_subsample(data, cap, seed=1) == data


def test_balanced_free_text_is_a_sample():
    data = examples([f"o{i}" for i in range(50)])
    sub = balanced_subsample(data, 10, seed=3)
    assert len(set(ids(sub))) == 10
    assert set(ids(sub)) <= set(ids(data))


# -- resolve_tasks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("benchmark, order, expected", [
    ("standard-cl", 1, ["dbpedia", "amazon", "yahoo", "agnews"]),
    ("standard-cl", 2, ["dbpedia", "amazon", "agnews", "yahoo"]),
    ("standard-cl", 3, ["yahoo", "amazon", "agnews", "dbpedia"]),
    ("long-sequence", 1, LONG_SEQ_1),
    ("superni", 1, ["task1572", "task363", "task1290", "task181", "task002", "task1510", "task639",
                    "task1729", "task073", "task1590", "task748", "task511", "task591", "task1687", "task875"]),
    ("superni", 2, ["task748", "task073", "task1590", "task639", "task1572", "task1687", "task591",
                    "task363", "task1510", "task1729", "task181", "task511", "task002", "task1290", "task875"]),
])
def test_resolve_tasks_orders(benchmark, order, expected):
    assert resolve_tasks(benchmark, order, None) == expected


def test_long_sequence_orders_2_and_3():
    assert resolve_tasks("long-sequence", 2, None) == [
        "multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2",
        "dbpedia", "agnews", "yelp", "amazon", "yahoo"]
    assert resolve_tasks("long-sequence", 3, None) == [
        "yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
        "agnews", "yahoo", "multirc", "boolqa", "wic"]


def test_resolve_tasks_returns_a_copy():
    tasks = resolve_tasks("standard-cl", 1, None)
    tasks.append("x")
    assert BENCHMARKS["standard-cl"][1] == ["dbpedia", "amazon", "yahoo", "agnews"]


def test_explicit_task_list_wins():
    assert resolve_tasks("standard-cl", 1, ["cb", "copa"]) == ["cb", "copa"]
    assert resolve_tasks(None, 1, ["cb"]) == ["cb"]
    assert resolve_tasks("no-such-benchmark", 9, ["cb"]) == ["cb"]


def test_unknown_benchmark_raises():
    with pytest.raises(ConfigError, match="unknown benchmark 'glue'"):
        resolve_tasks("glue", 1, None)


@pytest.mark.parametrize("benchmark, order", [("superni", 3), ("standard-cl", 4), ("long-sequence", 0)])
def test_unknown_order_raises(benchmark, order):
    with pytest.raises(ConfigError) as e:
        resolve_tasks(benchmark, order, None)
    assert f"no order {order}" in str(e.value)
    assert benchmark in str(e.value)


def test_duplicate_task_raises():
    with pytest.raises(ConfigError) as e:
        resolve_tasks(None, 1, ["cb", "copa", "cb"])
    assert "'cb'" in str(e.value)
    assert "twice" in str(e.value)


def test_no_stream_raises():
    with pytest.raises(ConfigError, match="--benchmark"):
        resolve_tasks(None, 1, None)


def test_benchmark_names():
    assert benchmark_names() == ["long-sequence", "standard-cl", "superni", "synthetic"]
