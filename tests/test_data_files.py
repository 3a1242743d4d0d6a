"""Reading task data from JSONL / JSON / CSV / Parquet files and saved datasets, chat rows, and
task-stream YAML files (``aimmerging.data.files``)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from aimmerging.data.files import (load_stream_file, read_csv, read_examples, read_json, read_jsonl, read_parquet,
                                   read_saved_dataset, render_prompt)
from aimmerging.data.olora import Example
from aimmerging.errors import DataError

ROWS = [{"id": "q0", "input": "2 + 2 =", "output": "4"}, {"id": "q1", "input": "3 + 3 =", "output": "6"}]
CHAT = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]}]
EXPECTED = [Example("q0", "2 + 2 =", "4", "t"), Example("q1", "3 + 3 =", "6", "t")]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows, fields=None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


# -- each format ------------------------------------------------------------------------------------------

def test_each_format_reads_the_same_examples(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "t.json").write_text(json.dumps(ROWS))
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    (tmp_path / "blank-lines.jsonl").write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    write_csv(tmp_path / "t.csv", ROWS)
    write_parquet(tmp_path / "t.parquet", ROWS)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))

    assert read_json(tmp_path / "t.json", task="t") == EXPECTED
    assert read_jsonl(tmp_path / "t.jsonl", task="t") == EXPECTED
    assert read_examples(tmp_path / "blank-lines.jsonl", task="t") == EXPECTED
    assert read_csv(tmp_path / "t.csv", task="t") == EXPECTED
    assert read_parquet(tmp_path / "t.parquet", task="t") == EXPECTED
    assert read_saved_dataset(tmp_path / "saved", task="t") == EXPECTED
    assert read_examples(tmp_path / "dd", task="t", split="test") == EXPECTED[:1]
    # the format comes from the extension (a directory: a saved dataset); the task from the stem
    assert [e.task for e in read_examples(tmp_path / "t.parquet")] == ["t", "t"]
    assert read_examples(tmp_path / "saved", task="t") == EXPECTED
    # an explicit format wins over the extension
    write_jsonl(tmp_path / "rows.txt", ROWS)
    assert read_examples(tmp_path / "rows.txt", task="t", format="jsonl") == EXPECTED


def test_column_mapping_ids_and_integer_answers(tmp_path):
    rows = [{"question": "Is it raining?", "label": 1, "extra": [1, 2]}, {"question": "Sunny?", "label": 0}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    got = read_examples(tmp_path / "q.json", input_field="question", output_field="label")
    assert got == [Example("q-0", "Is it raining?", "1", "q"), Example("q-1", "Sunny?", "0", "q")]
    write_csv(tmp_path / "q.csv", [{"text": "a", "answer": "x"}])
    assert read_csv(tmp_path / "q.csv", input_field="text", output_field="answer", task="k")[0] == \
        Example("k-0", "a", "x", "k")


# -- chat rows --------------------------------------------------------------------------------------------------

def test_chat_rows_plain_rendering_and_chat_template(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", CHAT)
    plain = read_examples(tmp_path / "c.jsonl")
    assert plain[0].input == "system: Be terse.\nuser: Capital of France?\nassistant:"
    assert plain[0].output == "Paris"
    assert plain[1].input == "user: hi\nassistant: hello\nuser: bye\nassistant:" and plain[1].output == "goodbye"

    from aimmerging.models.loading import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    templated = read_examples(tmp_path / "c.jsonl", tokenizer=tok)
    assert templated[0].input == "<|system|>Be terse.\n<|user|>Capital of France?\n<|assistant|>"
    assert templated[1].output == "goodbye"
    # a tokenizer without a template: the plain rendering; a loader is called only when needed
    assert render_prompt([{"role": "user", "content": "x"}], object()) == "user: x\nassistant:"
    calls = []
    assert read_examples(tmp_path / "c.jsonl", tokenizer=lambda: calls.append(1) or tok) == templated
    assert calls == [1]
    # in a CSV file the conversation is a JSON string
    write_csv(tmp_path / "c.csv", [{"messages": json.dumps(CHAT[0]["messages"])}])
    assert read_csv(tmp_path / "c.csv")[0].input == plain[0].input


# -- bad inputs -------------------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_data_errors_naming_the_file(tmp_path):
    write_jsonl(tmp_path / "no-output.jsonl", [{"input": "a"}])
    assert "no-output.jsonl: missing column 'output'" in error(read_examples, tmp_path / "no-output.jsonl")
    write_jsonl(tmp_path / "cols.jsonl", ROWS)
    msg = error(read_examples, tmp_path / "cols.jsonl", input_field="question")
    assert "cols.jsonl" in msg and "'question'" in msg and "columns: id, input, output" in msg
    write_jsonl(tmp_path / "later.jsonl", [ROWS[0], {"input": "b"}])
    assert "later.jsonl: row 1: missing value for column 'output'" in error(read_examples, tmp_path / "later.jsonl")

    for name, text in (("empty.jsonl", ""), ("empty.json", "[]"), ("blank.json", "  \n"), ("header.csv", "input,output\n")):
        (tmp_path / name).write_text(text)
        assert f"{name}: no examples (the file is empty)" in error(read_examples, tmp_path / name)

    write_jsonl(tmp_path / "user-only.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "user-only.jsonl: row 0: 'messages' has no assistant turn" in error(read_examples, tmp_path / "user-only.jsonl")
    write_jsonl(tmp_path / "trailing.jsonl", [{"messages": CHAT[0]["messages"] + [{"role": "user", "content": "?"}]}])
    assert "turns after the last assistant turn" in error(read_examples, tmp_path / "trailing.jsonl")
    write_jsonl(tmp_path / "bad-turn.jsonl", [{"messages": [{"role": "user"}]}])
    assert "bad-turn.jsonl: row 0: turn 0" in error(read_examples, tmp_path / "bad-turn.jsonl")

    (tmp_path / "data.txt").write_text("x")
    assert "data.txt: unknown file type '.txt'" in error(read_examples, tmp_path / "data.txt")
    assert "unknown format 'xml'" in error(read_examples, tmp_path / "data.txt", format="xml")
    assert "missing.jsonl: file not found" in error(read_examples, tmp_path / "missing.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    assert "binary.jsonl: cannot read: not UTF-8 text" in error(read_examples, tmp_path / "binary.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": \n')
    assert "broken.jsonl: line 2: not JSON" in error(read_examples, tmp_path / "broken.jsonl")
    (tmp_path / "object.json").write_text('{"input": "a", "output": "b"}')
    assert "object.json: expected a JSON array of objects" in error(read_examples, tmp_path / "object.json")
    write_jsonl(tmp_path / "scalar.jsonl", [3])
    assert "scalar.jsonl: row 0: expected an object" in error(read_examples, tmp_path / "scalar.jsonl")
    write_jsonl(tmp_path / "empty-input.jsonl", [{"input": " ", "output": "b"}])
    assert "empty-input.jsonl: row 0: the prompt ('input') is empty" in error(read_examples, tmp_path / "empty-input.jsonl")
    write_jsonl(tmp_path / "list-out.jsonl", [{"input": "a", "output": ["b"]}])
    assert "field 'output' is not a string (list)" in error(read_examples, tmp_path / "list-out.jsonl")


def test_optional_dependencies_corrupt_files_and_missing_packages(tmp_path, monkeypatch):
    """Files read by ``pyarrow`` / ``datasets``: corrupt ones, and a clear line when those are missing."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    assert "corrupt.parquet: cannot read Parquet file" in error(read_examples, tmp_path / "corrupt.parquet")
    (tmp_path / "plain-dir").mkdir()
    assert "plain-dir: not a dataset saved with datasets' save_to_disk" in error(read_examples, tmp_path / "plain-dir")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    write_parquet(tmp_path / "ok.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "needs the 'datasets' package (pip install 'aimmerging[hf]')" in error(read_examples, tmp_path / "saved")
    assert "ok.parquet: reading Parquet files needs pyarrow" in error(read_examples, tmp_path / "ok.parquet")


# -- task-stream YAML files ---------------------------------------------------------------------------------------

def test_stream_file_fields_formats_and_relative_paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a_train.jsonl", [{"q": "1+1", "a": "2"}, {"q": "2+2", "a": "4"}])
    write_jsonl(data / "a_test.jsonl", [{"q": "3+3", "a": "6"}])
    write_csv(data / "b_train.csv", [{"text": "good", "label": "pos"}])
    write_csv(data / "b_test.rows", [{"text": "bad", "label": "neg"}])  # a CSV file under another extension
    write_jsonl(data / "c_train.jsonl", CHAT)
    write_jsonl(data / "c_dev.jsonl", CHAT[:1])
    (tmp_path / "stream.yaml").write_text(
        "input_field: q\noutput_field: a\n"
        "tasks:\n"
        "  arith: {train: data/a_train.jsonl, test: data/a_test.jsonl}\n"
        "  sentiment:\n"
        "    train: data/b_train.csv\n"
        "    test: data/b_test.rows\n"
        "    input_field: text\n"
        "    output_field: label\n"
        "    format: csv\n"
        "  chat: {train: data/c_train.jsonl, dev: data/c_dev.jsonl, format: jsonl}\n")
    stream = load_stream_file(tmp_path / "stream.yaml")
    assert stream.tasks == ["arith", "sentiment", "chat"]
    assert stream.split("arith", "train") == [Example("arith-0", "1+1", "2", "arith"), Example("arith-1", "2+2", "4", "arith")]
    assert stream.split("sentiment", "test") == [Example("sentiment-0", "bad", "neg", "sentiment")]
    assert stream.split("chat", "dev")[0].output == "Paris"
    assert "stream.yaml: task 'chat' has no test file" in error(stream.split, "chat", "test")
    # the defaults given by the caller (e.g. --input-field) apply where the file sets none
    (tmp_path / "plain.yaml").write_text("tasks:\n  arith: {train: data/a_train.jsonl}\n")
    plain = load_stream_file(tmp_path / "plain.yaml", input_field="q", output_field="a")
    assert plain.split("arith", "train")[0] == Example("arith-0", "1+1", "2", "arith")
    assert load_stream_file(tmp_path / "stream.yaml", input_field="zzz").split("arith", "test")[0].input == "3+3"


def test_stream_file_runs_through_the_runner(tmp_path):
    import aimmerging
    from aimmerging.models.loading import tiny_model

    for task in ("x", "y"):
        write_jsonl(tmp_path / f"{task}.jsonl", [{"input": f"{task} {i}\nAnswer:", "output": str(i % 2)} for i in range(8)])
    (tmp_path / "s.yaml").write_text("tasks:\n  x: {train: x.jsonl, test: x.jsonl}\n  y: {train: y.jsonl, test: y.jsonl}\n")
    result = aimmerging.run(load_stream_file(tmp_path / "s.yaml"), method="seq", model=tiny_model("tiny-causal"),
                            max_steps=1, batch_size=2, micro_batch_size=2, eval_cap=2, max_input_tokens=32,
                            eval_batch_size=2)
    assert result.tasks == ["x", "y"] and len(result.accuracy_matrix) == 2


def test_bad_stream_files(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    (tmp_path / "t.txt").write_text("x")
    cases = {
        "tasks: [a, b]": "'tasks' must map each task name to its files",
        "tasks: {}": "'tasks' must map each task name to its files",
        "": "'tasks' must map each task name to its files",
        "tasks: {t: {train: t.jsonl}}\nbatch: 3": "unknown key(s) batch",
        "tasks: {t: {train: t.jsonl, tset: t.jsonl}}": "task 't': unknown key(s) tset",
        "tasks: {t: {test: t.jsonl}}": "task 't': no 'train' file",
        "tasks: {t: [t.jsonl]}": "task 't': expected a mapping",
        "tasks: {t: {train: nope.jsonl}}": f"task 't': train file {tmp_path / 'nope.jsonl'} not found",
        "tasks: {t: {train: 3}}": "task 't': 'train' must be a file path",
        "tasks: {t: {train: t.txt}}": "t.txt: unknown file type '.txt'",
        "tasks: {t: {train: t.jsonl, format: xml}}": "task 't': unknown format 'xml'",
        "format: xml\ntasks: {t: {train: t.jsonl}}": "unknown format 'xml'",
        "input_field: 3\ntasks: {t: {train: t.jsonl}}": "'input_field' must be a non-empty string",
        "tasks: {t: {train: t.jsonl}\n": "invalid YAML",
        "- a\n- b": "must be a YAML mapping",
    }
    for text, expected in cases.items():
        (tmp_path / "s.yaml").write_text(text)
        msg = error(load_stream_file, tmp_path / "s.yaml")
        assert expected in msg, (text, msg)
        assert str(tmp_path) in msg
    assert "missing.yaml: cannot read" in error(load_stream_file, tmp_path / "missing.yaml")


# -- the CLI: aimmerging run --data stream.yaml ------------------------------------------------------------

def _cli_stream(tmp_path, chat: bool = False):
    import json as _json

    datasets = pytest.importorskip("datasets")
    rows = {t: [{"q": f"{t} question {i}?", "a": "yes" if i % 2 else "no"} for i in range(12)] for t in ("alpha", "beta")}
    (tmp_path / "alpha.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows["alpha"]))
    datasets.Dataset.from_list(rows["beta"]).save_to_disk(str(tmp_path / "beta_saved"))
    (tmp_path / "stream.yaml").write_text(
        "input_field: q\noutput_field: a\ntasks:\n"
        "  alpha: {train: alpha.jsonl, test: alpha.jsonl}\n"
        "  beta: {train: beta_saved, test: beta_saved}\n")
    return tmp_path / "stream.yaml"


def test_cli_runs_a_stream_file_of_jsonl_and_saved_datasets(tmp_path, capsys):
    import json as _json

    from aimmerging.cli.main import main

    stream = _cli_stream(tmp_path)
    out = tmp_path / "run"
    args = ["run", "--data", str(stream), "--model", "tiny-causal", "--method", "replay", "--max-steps", "2",
            "--batch-size", "4", "--micro-batch-size", "4", "--max-input-tokens", "48", "--memory-ratio", "25",
            "--output-dir", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    results = _json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["alpha", "beta"] and results["complete"] is True
    assert len(results["accuracy_matrix"]) == 2 and results["metrics"]["op"] is not None
    assert main(args) == 0  # resumes: same config (the stream file is part of it)
    capsys.readouterr()
    assert main(args + ["--data-dir", str(tmp_path)]) == 2
    assert "data: a task-stream file names the whole stream" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ("tasks:\n  alpha: {train: nope.jsonl, test: nope.jsonl}\n", "nope.jsonl"),
    ("tasks:\n  alpha: {train: empty.jsonl, test: empty.jsonl}\n", "empty.jsonl"),
    ("input_field: zz\ntasks:\n  alpha: {train: alpha.jsonl, test: alpha.jsonl}\n", "alpha.jsonl"),
    ("tasks:\n  alpha: {train: chat.jsonl, test: chat.jsonl}\n", "chat.jsonl"),
])
def test_cli_bad_stream_inputs_are_one_line(tmp_path, capsys, content, expected):
    from aimmerging.cli.main import main

    _cli_stream(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "bad.yaml").write_text(content)
    capsys.readouterr()  # the datasets progress bar of the set-up
    rc = main(["run", "--data", str(tmp_path / "bad.yaml"), "--model", "tiny-causal", "--max-steps", "1",
               "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[aimmerging]")]
    assert rc == 2 and len(err) == 1 and expected in err[0], err
