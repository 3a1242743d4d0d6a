"""Hostile inputs (issue 27, part 3): absurd numbers, wrong types given to the Python API, and
text or files that used to end in a traceback (or read until memory ran out) are each refused
with one line, exit status 2, and nothing written."""

from __future__ import annotations

import json
import os

import pytest

import aimmerging
from aimmerging.config import RunConfig
from aimmerging.controller import ControllerConfig
from aimmerging.errors import ConfigError, DataError
from aimmerging.methods import METHODS, load_builtin_methods
from aimmerging.settings import base_type, coerce, option_fields
from test_cli_errors import base_args, make_data, run_cli
from test_user_errors import _one_line

ROWS = [{"input": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no"} for i in range(8)]
STREAM = {"t": {"train": ROWS, "test": ROWS}}


def refused(args: list[str], out, capsys, *expected: str) -> str:
    """The CLI ends in one line naming ``expected``, exit status 2, and ``out`` was never created."""
    line = _one_line(*run_cli(args, capsys), *expected)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return line


# -- 1, 2. absurd numbers are refused with the options, before anything is loaded ------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--lora-r", "99999999999"], "lora_r: must be <= 4096, got 99999999999"),
    (["--lora-r", str(2**63)], "lora_r: must be <= 4096"),
    (["--max-steps", str(2**63)], "max_steps: must be <= 1000000000"),
    (["--max-steps", str(-2**63)], "max_steps: must be >= -1000000000"),
    (["--threads", str(2**40)], "threads: must be <= 4096"),
    (["--eval-batch-size", str(2**63)], "eval_batch_size: must be <= 1000000"),
    (["--max-new-tokens", str(10**18)], "max_new_tokens: must be <= 65536"),
    (["--method", "aimmerging", "--initial-interval", str(2**63)], "initial_interval: must be <= 1000000000"),
    (["--lr", "1e38", "--warmup-steps", "0"], "lr: must be in (0, 10], got 1e+38"),
    (["--lr", "1e308", "--max-grad-norm", "1e308"], "lr: must be in (0, 10]"),
])
def test_absurd_numbers_are_refused_with_the_options(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    refused(base_args(make_data(tmp_path / "data"), out) + flags, out, capsys, expected)


@pytest.mark.parametrize("text, expected", [
    ("lora_r: 9e99\n", "lora_r: expected int, got '9e99'"),  # YAML 1.1 reads 9e99 as a string
    ("lora_r: 9.0e+99\n", "lora_r: must be <= 4096, got 9e+99"),  # ... and this as a float
    ("lora_r: 4\nlora_r: 8\n", "found duplicate key 'lora_r'"),
])
def test_bad_numbers_and_duplicate_keys_in_a_yaml_config(tmp_path, capsys, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    out = tmp_path / "out"
    refused(base_args(make_data(tmp_path / "data"), out) + ["--config", str(tmp_path / "c.yaml")], out, capsys,
            expected)


def _integer_options() -> list[tuple[type, str]]:
    load_builtin_methods()
    classes = [RunConfig, ControllerConfig, *(cls.Settings for _, cls in METHODS.items() if cls.Settings is not None)]
    return [(cls, name) for cls in dict.fromkeys(classes) for name in option_fields(cls) if base_type(cls, name) is int]


def test_every_integer_option_is_bounded():
    options = _integer_options()
    assert len(options) > 20  # RunConfig's, the controller's and the methods' own
    for cls, name in options:
        for value in (2**63, -2**63, 9.0e99, str(2**64)):
            with pytest.raises(ConfigError, match=f"^{name}: must be [<>]="):
                coerce(cls, name, value)
    with pytest.raises(ConfigError, match="lora_r: must be <= 4096"):  # a config built without coerce()
        RunConfig(lora_r=10**12).validate()


# -- 3, 4. the Python API: wrong types and absurd values are one-line errors ---------------------------------

@pytest.mark.parametrize("kwargs, error, expected", [
    ({"method": 123}, ConfigError, "method: expected a registered name"),
    ({"method": object}, ConfigError, "got the class object"),
    ({"method": None}, ConfigError, "method: None is not a method"),
    ({"model": (1, 2)}, ConfigError, "(model, tokenizer) pair, got (int, int)"),
    ({"model": 123}, ConfigError, "model: expected an alias"),
    ({"output_dir": 123}, ConfigError, "output_dir: expected a directory path"),
    ({"lora_r": 10**12}, ConfigError, "lora_r: must be <= 4096"),
    ({"max_new_tokens": 10**18}, ConfigError, "max_new_tokens: must be <= 65536"),
    ({"stream": {"t": {"train": 5, "test": ROWS}}}, DataError, "task 't', train: expected a list"),
    ({"stream": {"t": {"train": [{"input": "x\ud800", "output": "y"}], "test": ROWS}}}, DataError,
     "field 'input' is not valid Unicode text"),
])
def test_api_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, kwargs, error, expected):
    monkeypatch.chdir(tmp_path)
    kwargs = {"stream": STREAM, "model": "tiny-causal", "max_steps": 1, "threads": 1, **kwargs}
    with pytest.raises(error) as e:
        aimmerging.run(**kwargs)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written (output_dir=123 made no folder "123")


def test_unknown_lora_target_is_named_with_the_available_modules(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        aimmerging.run(STREAM, model="tiny-causal", output_dir=out, lora_targets="q_proj,nope", max_steps=1, threads=1)
    msg = str(e.value)
    assert "lora_targets: no module named 'nope'" in msg and "q_proj" not in msg.split("(")[0]
    assert "v_proj" in msg and "\n" not in msg  # the names it could have been
    assert not out.exists()


# -- 5. text and file edge cases ---------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content, expected", [
    ('[{"id": "a", "input": "x\\ud800", "output": "y"}]', "item 0: field 'input' is not valid Unicode text"),
    ('[{"id": "a", "input": "x", "output": "\\udfff"}]', "item 0: field 'output' is not valid Unicode text"),
    (DEEP, "malformed JSON: nested too deeply"),
])
def test_hostile_olora_task_files(tmp_path, capsys, content, expected):
    data = make_data(tmp_path / "data", broken={"train/beta": content})
    out = tmp_path / "out"
    refused(base_args(data, out), out, capsys, "beta.json", expected)


def _stream_args(tmp_path, stream_yaml: str) -> list[str]:
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "stream.yaml").write_text(stream_yaml)
    return ["run", "--data", str(tmp_path / "stream.yaml"), "--model", "tiny-causal", "--max-steps", "1",
            "--threads", "1", "--output-dir", str(tmp_path / "out"), "--no-progress"]


STREAM_CASES = {
    "lone surrogate in JSONL": ("bad.jsonl", '{"input": "x", "output": "\\ud800"}\n',
                                "bad.jsonl: row 0: field 'output' is not valid Unicode text"),
    "lone surrogate in a chat turn": ("bad.jsonl",
                                      '{"messages": [{"role": "user", "content": "\\ud800"}, '
                                      '{"role": "assistant", "content": "y"}]}\n',
                                      "bad.jsonl: row 0: field 'messages' is not valid Unicode text"),
    "deep JSON": ("bad.json", DEEP, "bad.json: malformed JSON: nested too deeply"),
    "deep JSONL line": ("bad.jsonl", DEEP + "\n", "bad.jsonl: line 1: malformed JSON: nested too deeply"),
    "NUL in CSV": ("bad.csv", "input,output\nx,y\na\0b,c\n", "bad.csv: malformed CSV: line 3 contains a NUL byte"),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_hostile_data_files_in_a_stream(tmp_path, capsys, case):
    name, content, expected = STREAM_CASES[case]
    (tmp_path / name).write_text(content, encoding="utf-8", newline="")
    args = _stream_args(tmp_path, f"tasks:\n  a: {{train: {name}, test: good.jsonl}}\n")
    refused(args, tmp_path / "out", capsys, expected)


@pytest.mark.parametrize("tasks, expected", [
    ("  a: {train: good.jsonl}\n  a: {train: good.jsonl}\n", "found duplicate key 'a' at line 3"),
    ("  1: {train: good.jsonl}\n  '1': {train: good.jsonl}\n", "task '1' is listed twice"),
])
def test_a_task_named_twice_in_a_stream_file(tmp_path, capsys, tasks, expected):
    refused(_stream_args(tmp_path, "tasks:\n" + tasks), tmp_path / "out", capsys, "stream.yaml", expected)


def _fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


@pytest.mark.parametrize("which", ["/dev/zero", "fifo"])
def test_a_device_or_fifo_is_refused_as_a_config_and_as_a_data_file(tmp_path, capsys, which):
    path = str(_fifo(tmp_path)) if which == "fifo" else which
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    out = tmp_path / "out"
    refused(base_args(make_data(tmp_path / "data"), out) + ["--config", path], out, capsys,
            f"{path}: cannot read config file: not a regular file")
    args = _stream_args(tmp_path, f"tasks:\n  a: {{train: {path}, test: good.jsonl, format: jsonl}}\n")
    refused(args, out, capsys, f"train file {path} is not a regular file")


def test_oversized_config_and_data_files_are_refused_unread(tmp_path, capsys, monkeypatch):
    import aimmerging.data.olora as olora

    (tmp_path / "big.yaml").write_text("lr: 0.001\n" + "#" * 2**20 + "\n")
    out = tmp_path / "out"
    refused(base_args(make_data(tmp_path / "data"), out) + ["--config", str(tmp_path / "big.yaml")], out, capsys,
            "big.yaml: cannot read config file: file too large", "the limit is 1 MiB")
    assert olora.DATA_FILE_LIMIT == 2 * 2**30
    monkeypatch.setattr(olora, "DATA_FILE_LIMIT", 100)  # a stand-in for a file over 2 GiB
    args = _stream_args(tmp_path, "tasks:\n  a: {train: good.jsonl, test: good.jsonl}\n")
    refused(args, out, capsys, "good.jsonl: cannot read: file too large", "the limit is 100 bytes")
    data = make_data(tmp_path / "data")
    refused(base_args(data, out), out, capsys, "alpha.json: cannot read: file too large")


def test_data_validate_reports_a_lone_surrogate_without_crashing(tmp_path, capsys):
    from aimmerging.cli.main import main

    data = make_data(tmp_path / "data", broken={"test/alpha": '[{"id": "a", "input": "x", "output": "\\ud800"}]'})
    assert main(["data", "validate", str(data)]) == 1
    out = capsys.readouterr().out
    assert "alpha.json: item 0: field 'output' is not valid Unicode text" in out
