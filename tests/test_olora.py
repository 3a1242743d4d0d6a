"""Reading and validating O-LoRA task files (data/olora.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from aimmerging.data.olora import Example, list_tasks, read_task, task_file, validate_dir
from aimmerging.errors import DataError, UserError


def rec(i: int, output: str = "yes", **kw) -> dict:
    return {"id": f"t_{i}", "input": f"question {i}\nAnswer:", "output": output, **kw}


def write(root: Path, split: str, name: str, content) -> Path:
    """Write ``content`` (JSON-encoded unless it is a str) to root/split/name."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def read_error(root: Path, task: str = "t", split: str = "train") -> str:
    with pytest.raises(DataError) as e:
        read_task(root, split, task)
    return str(e.value)


# -- read_task ----------------------------------------------------------------------------------------

def test_read_task_returns_examples(tmp_path):
    write(tmp_path, "train", "t.json", [rec(0, "yes"), rec(1, "no")])
    assert read_task(tmp_path, "train", "t") == [
        Example(id="t_0", input="question 0\nAnswer:", output="yes", task="t"),
        Example(id="t_1", input="question 1\nAnswer:", output="no", task="t"),
    ]


def test_extra_fields_are_allowed(tmp_path):
    write(tmp_path, "train", "t.json", [rec(0, data_id=0)])
    assert [e.id for e in read_task(tmp_path, "train", "t")] == ["t_0"]


def test_t5_spelling_is_accepted(tmp_path):
    path = write(tmp_path, "dev", "copa_T5.json", [rec(0, "A")])
    assert task_file(tmp_path, "dev", "copa") == path
    assert [e.output for e in read_task(tmp_path, "dev", "copa")] == ["A"]
    assert list_tasks(tmp_path) == ["copa"]


def test_both_spellings_are_refused(tmp_path):
    # silently preferring one of t.json / t_T5.json hid the other (reliability issue): a DataError now
    plain = write(tmp_path, "train", "t.json", [rec(0, "plain")])
    t5 = write(tmp_path, "train", "t_T5.json", [rec(0, "t5")])
    with pytest.raises(DataError, match="two files") as e:
        task_file(tmp_path, "train", "t")
    assert str(plain) in str(e.value) and str(t5) in str(e.value)
    assert list_tasks(tmp_path) == ["t"]


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)


def test_malformed_json(tmp_path):
    path = write(tmp_path, "train", "t.json", '[{"id": "a", "input": "x", "output": "y"},')
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert "malformed JSON" in msg
    assert "line 1" in msg


def test_not_utf8(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "t.json").write_bytes(b'[{"id": "\xff\xfe"}]')
    msg = read_error(tmp_path)
    assert str(folder / "t.json") in msg and "UTF-8" in msg


@pytest.mark.parametrize("content, kind", [({"id": "a"}, "dict"), ("\"text\"", "str"), ("3", "int")])
def test_top_level_not_an_array(tmp_path, content, kind):
    path = write(tmp_path, "train", "t.json", content)
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert "expected a JSON array" in msg and kind in msg


def test_empty_array(tmp_path):
    path = write(tmp_path, "train", "t.json", [])
    msg = read_error(tmp_path)
    assert str(path) in msg and "empty" in msg


def test_item_not_an_object(tmp_path):
    path = write(tmp_path, "train", "t.json", [rec(0), ["not", "an", "object"]])
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert "item 1: expected an object, found list" in msg


@pytest.mark.parametrize("field", ["id", "input", "output"])
def test_missing_field(tmp_path, field):
    bad = rec(1)
    del bad[field]
    path = write(tmp_path, "train", "t.json", [rec(0), bad])
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert f"item 1: missing field '{field}'" in msg


@pytest.mark.parametrize("field, value", [("id", 7), ("input", None), ("output", ["yes"]), ("output", 1)])
def test_non_string_field(tmp_path, field, value):
    path = write(tmp_path, "train", "t.json", [rec(0, **{field: value})])
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert f"item 0: field '{field}' is not a string" in msg


@pytest.mark.parametrize("value", ["", "   \n\t"])
def test_empty_input(tmp_path, value):
    path = write(tmp_path, "train", "t.json", [rec(0), rec(1), rec(2, input=value)])
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert "item 2: field 'input' is empty" in msg


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, "train", "t.json", [rec(0), rec(1), rec(0)])
    msg = read_error(tmp_path)
    assert str(path) in msg
    assert "item 2: duplicate id 't_0' (first at item 0)" in msg


def test_several_problems_are_counted_in_the_message(tmp_path):
    bad = [rec(0, output=1), rec(1, input=""), rec(0)]
    write(tmp_path, "train", "t.json", bad)
    msg = read_error(tmp_path)
    assert "item 0: field 'output' is not a string" in msg
    assert "and 2 more problems" in msg
    assert "aimmerging data validate" in msg


def test_missing_task_file_lists_available_tasks(tmp_path):
    write(tmp_path, "train", "alpha.json", [rec(0)])
    write(tmp_path, "test", "beta_T5.json", [rec(0)])
    msg = read_error(tmp_path, task="gamma")
    assert "no train file for task 'gamma'" in msg
    assert "tasks found: alpha, beta" in msg


def test_missing_split_names_split(tmp_path):
    write(tmp_path, "train", "alpha.json", [rec(0)])
    msg = read_error(tmp_path, task="alpha", split="dev")
    assert "no dev file for task 'alpha'" in msg
    assert "alpha" in msg


def test_missing_task_in_empty_dir(tmp_path):
    msg = read_error(tmp_path, task="gamma")
    assert "no train file for task 'gamma'" in msg
    assert "tasks found" not in msg


# -- validate_dir ---------------------------------------------------------------------------------

def test_validate_dir_reports_counts_and_labels(tmp_path):
    write(tmp_path, "train", "t.json", [rec(0, "yes"), rec(1, "no"), rec(2, "yes")])
    write(tmp_path, "dev", "t.json", [rec(0, "no")])
    write(tmp_path, "test", "t_T5.json", [rec(0, "yes"), rec(1, "yes")])
    report, errors, warnings = validate_dir(tmp_path)
    assert errors == [] and warnings == []
    assert set(report) == {"t"}
    assert {s: r.count for s, r in report["t"].items()} == {"train": 3, "dev": 1, "test": 2}
    assert report["t"]["train"].labels == Counter({"yes": 2, "no": 1})
    assert report["t"]["dev"].labels == Counter({"no": 1})
    assert report["t"]["test"].labels == Counter({"yes": 2})


def test_validate_dir_collects_all_problems_across_files(tmp_path):
    write(tmp_path, "train", "a.json", [rec(0, output=1), rec(0)])  # non-string output + duplicate id
    write(tmp_path, "dev", "a.json", "{broken")
    write(tmp_path, "train", "b.json", [])
    write(tmp_path, "test", "b.json", [rec(0), "oops"])
    write(tmp_path, "dev", "b.json", [rec(0)])
    write(tmp_path, "test", "a.json", [rec(0)])
    report, errors, warnings = validate_dir(tmp_path)
    a_train, a_dev = tmp_path / "train" / "a.json", tmp_path / "dev" / "a.json"
    b_train, b_test = tmp_path / "train" / "b.json", tmp_path / "test" / "b.json"
    expected = [
        f"{a_train}: item 0: field 'output' is not a string",
        f"{a_train}: item 1: duplicate id 't_0' (first at item 0)",
        f"{a_dev}: malformed JSON",
        f"{b_train}: the task file is empty",
        f"{b_test}: item 1: expected an object, found str",
    ]
    assert len(errors) == len(expected)
    for want in expected:
        assert any(e.startswith(want) for e in errors), (want, errors)
    # files that could be parsed still get a report entry; the malformed one does not
    assert report["a"]["train"].count == 2
    assert "dev" not in report["a"]
    assert report["b"]["train"].count == 0
    assert report["b"]["test"].count == 2


def test_validate_dir_warns_on_missing_dev(tmp_path):
    write(tmp_path, "train", "t.json", [rec(0)])
    write(tmp_path, "test", "t.json", [rec(0)])
    report, errors, warnings = validate_dir(tmp_path)
    assert errors == []
    assert warnings == ["t: no dev file"]
    assert set(report["t"]) == {"train", "test"}


def test_validate_dir_missing_train_is_an_error(tmp_path):
    write(tmp_path, "dev", "t.json", [rec(0)])
    write(tmp_path, "test", "t.json", [rec(0)])
    _, errors, warnings = validate_dir(tmp_path)
    assert errors == ["t: no train file"]
    assert warnings == []


def test_validate_dir_warns_on_unseen_dev_and_test_labels(tmp_path):
    write(tmp_path, "train", "t.json", [rec(0, "yes"), rec(1, "no")])
    write(tmp_path, "dev", "t.json", [rec(0, "yes"), rec(1, "-"), rec(2, "maybe")])
    write(tmp_path, "test", "t.json", [rec(0, "perhaps")])
    _, errors, warnings = validate_dir(tmp_path)
    assert errors == []
    assert warnings == ["t: dev labels never seen in train: '-', 'maybe'",
                        "t: test labels never seen in train: 'perhaps'"]


def test_validate_dir_no_label_warning_for_free_text(tmp_path):
    # more than 50 distinct training outputs: a free-text task, unseen dev outputs are normal
    write(tmp_path, "train", "t.json", [rec(i, f"answer {i}") for i in range(51)])
    write(tmp_path, "dev", "t.json", [rec(0, "something new")])
    write(tmp_path, "test", "t.json", [rec(0, "another")])
    assert validate_dir(tmp_path)[2] == []


def test_validate_dir_not_a_directory(tmp_path):
    report, errors, warnings = validate_dir(tmp_path / "nope")
    assert report == {} and warnings == []
    assert errors == [f"{tmp_path / 'nope'}: not a directory"]


def test_validate_dir_without_task_files(tmp_path):
    (tmp_path / "train").mkdir()
    report, errors, _ = validate_dir(tmp_path)
    assert report == {}
    assert len(errors) == 1 and "no task files found" in errors[0]
