"""Security (issue 27, part 2): task names are names, not paths; a model directory's Python code
runs only with --trust-remote-code, never on a prompt; a symlinked or hard-linked ``.lock`` is
refused, not written through; pickled code in a stage's method state or a model's weights never
runs. Each ends in one line, with nothing written outside the run directory."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from pathlib import Path

import pytest

from helpers import one_line_error

from aimmerging.cli.main import main
from aimmerging.errors import ConfigError, DataError, UserError
from test_cli_errors import base_args, make_data, run_cli

BAD_NAMES = ["x/../../../escaped/pwn", "x/../../../victim/../data", "../../esc/pwn", "..", ".", ".hidden",
             "a/b", "a\\b", "a..b/c", "nul\x00byte", "tab\tname", "new\nline", "bell\x07", "", " "]


_one_line = one_line_error

def _tree(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path under ``root`` (but ``skip``'s subtree) with its content (None: a directory)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[p.relative_to(root).as_posix()] = None if p.is_dir() else p.read_bytes()
    return out


def _rows(n: int = 8) -> list[dict]:
    return [{"input": f"Is {i} even? Answer:", "output": "yes" if i % 2 == 0 else "no"} for i in range(n)]


def _tiny_run(out: Path) -> list[str]:
    return ["--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--train-cap", "4",
            "--eval-cap", "2", "--threads", "1", "--output-dir", str(out), "--no-progress"]


# -- 1. a task name is a name, not a path -------------------------------------------------------------

def test_check_task_name_accepts_names_and_refuses_paths():
    from aimmerging.data.stream import check_task_name

    for name in ["sst-2", "task1572", "boolqa", "my task", "v1.2", "Ünïcode_名"]:
        assert check_task_name(name) == name
    for name in BAD_NAMES + [None, 3]:
        with pytest.raises(DataError) as e:
            check_task_name(name)
        assert "\n" not in str(e.value) and "task name" in str(e.value)


@pytest.mark.parametrize("name", ["x/../../../escaped/pwn", "x/../../../victim/../data"])
def test_stream_yaml_task_name_cannot_write_outside_the_run_dir(tmp_path, capsys, name):
    base = tmp_path / "a" / "b"
    base.mkdir(parents=True)
    (base / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))  # the victim, too
    (base / "victim").mkdir()
    stream = base / "stream.yaml"
    stream.write_text(json.dumps({"tasks": {name: {"train": "data.jsonl", "test": "data.jsonl"}}}))
    out = base / "run"
    before = _tree(tmp_path)
    rc, err = run_cli(["run", "--model", "tiny-causal", "--data", str(stream), *_tiny_run(out)], capsys)
    _one_line(rc, err, "task name", "path")
    assert _tree(tmp_path, skip=out) == before  # nothing written, nor overwritten, outside the run dir
    assert not out.exists()  # refused before the run directory is made


def test_api_task_name_cannot_create_directories_outside_stages(tmp_path):
    import aimmerging

    out = tmp_path / "a" / "run"
    with pytest.raises((ConfigError, DataError)) as e:
        aimmerging.run({"../../esc/pwn": {"train": _rows(), "test": _rows(2)}}, method="seq", model="tiny-causal",
                       output_dir=out, max_steps=1, batch_size=2, micro_batch_size=2, threads=1)
    assert "\n" not in str(e.value) and "../../esc/pwn" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tasks", ["../../long_sequence/train/dbpedia", "alpha,sub/beta", "alpha,.."])
def test_tasks_flag_is_a_list_of_names(tmp_path, capsys, tasks):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    _one_line(*run_cli(base_args(data, out, tasks=tasks), capsys), "task name")
    assert not out.exists()


def test_datasets_inputs_are_checked_too():
    from aimmerging.data.stream import TaskStream

    with pytest.raises(DataError):
        TaskStream.from_examples({"ok": {"train": _rows()}, "../x": {"train": _rows()}})
    with pytest.raises(DataError):
        TaskStream(["ok", "a/b"], lambda task, split: [])


def test_stage_paths_never_leave_the_run_directory(tmp_path):
    """Defence in depth: the place that builds stage and prediction paths refuses one that resolves
    outside the run directory, whatever name reaches it."""
    from aimmerging.runs.rundir import RunDirectory
    from aimmerging.training.stages import stage_dirname

    with pytest.raises(UserError):
        stage_dirname(0, "../x")
    rd = RunDirectory(tmp_path / "run")
    for bad in ["../x", "00-x/../../../y", "/etc", "a/b"]:
        with pytest.raises(UserError):
            rd.stage_dir(bad)
        with pytest.raises(UserError):
            rd.tmp_stage_dir(bad)
    (tmp_path / "run" / "stages").mkdir(parents=True)
    with pytest.raises(UserError):
        rd.commit_stage("00-ok", {"scores": {}}, {"../../../pwn": [{"id": "1", "score": 1.0}]})
    with pytest.raises(UserError):
        rd.predictions_file("00-ok", "../../x")
    assert not (tmp_path / "pwn.jsonl").exists() and not list(tmp_path.glob("*.jsonl"))


def test_a_symlinked_stages_folder_is_refused(tmp_path):
    from aimmerging.runs.rundir import RunDirectory

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stages").symlink_to(elsewhere)
    with pytest.raises(UserError):
        RunDirectory(tmp_path / "run").begin_stage("00-x")
    assert list(elsewhere.iterdir()) == []


# -- 2. a model directory's code runs only with --trust-remote-code -----------------------------------

EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''
TOKENIZER = '''

from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


def _custom_code_model(root: Path, marker: Path, where: str = "config") -> Path:
    """A tiny Llama saved with an auto_map pointing at Python code in the directory, in its
    config.json (``where="config"``) or its tokenizer_config.json (``"tokenizer"``)."""
    from aimmerging.models.loading import tiny_model

    d = root / "model"
    model, tok = tiny_model("tiny-causal")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)) + TOKENIZER)
    if where == "config":
        config = json.loads((d / "config.json").read_text())
        config.update(model_type="evil-llama", architectures=["EvilForCausalLM"],
                      auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
        (d / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((d / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_model_code_does_not_run_on_a_piped_yes(tmp_path, capsys, monkeypatch, where):
    marker = tmp_path / "marker"
    model = _custom_code_model(tmp_path, marker, where)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # what `echo y | aimmerging run` gives
    data = make_data(tmp_path / "data")
    args = base_args(data, tmp_path / "out")
    args[args.index("--model") + 1] = str(model)
    _one_line(*run_cli(args, capsys), "--trust-remote-code", str(model))
    assert not marker.exists()


def test_model_code_runs_with_trust_remote_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    model = _custom_code_model(tmp_path, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # never read: no prompt
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    args = base_args(data, out) + ["--trust-remote-code", "--lora-targets", "q_proj,v_proj", "--threads", "1"]
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 0, capsys.readouterr().err
    assert marker.read_text() == "ran"
    from aimmerging.config import load_yaml

    assert load_yaml(out / "config.yaml")["trust_remote_code"] is True


# -- 3. the lock file is never written through a link -------------------------------------------------

@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_lock_file_link_is_refused_and_its_target_kept(tmp_path, capsys, link):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    if link == "symlink":
        (out / ".lock").symlink_to(victim)
    else:
        os.link(victim, out / ".lock")
    _one_line(*run_cli(base_args(data, out), capsys), str(out / ".lock"), "link")
    assert victim.read_text() == "precious\n"
    assert not (out / "config.yaml").exists()


# -- 4. pickled code never runs -----------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",))


def test_pickle_payload_in_method_state_does_not_run_on_resume(tmp_path, capsys):
    """A method_state.pt replaced by a pickle that would run code, with the stage's checksums
    recomputed (they are no signature): the resume refuses it in one line, the code never runs."""
    import hashlib

    import torch

    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    args = base_args(data, out) + ["--method", "ewc", "--threads", "1"]
    assert main(args) == 0
    capsys.readouterr()
    stage = out / "stages" / "00-alpha"
    state = stage / "method_state.pt"
    assert state.is_file()
    marker = tmp_path / "marker"
    torch.save({"fisher": _Payload(marker)}, state)
    scores = json.loads((stage / "scores.json").read_text())
    scores["sha256"]["files"]["method_state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (stage / "scores.json").write_text(json.dumps(scores))
    for later in (out / "stages").glob("01-*"):
        import shutil

        shutil.rmtree(later)  # the resume must read stage 0's method state
    _one_line(*run_cli(args, capsys), str(state), "cannot be loaded")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_payload_in_model_weights_does_not_run(tmp_path, capsys, fmt):
    import torch

    from aimmerging.models.loading import tiny_model

    d = tmp_path / "model"
    model, tok = tiny_model("tiny-causal")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    if fmt == "zip":
        torch.save(_Payload(marker), d / "pytorch_model.bin")
    else:
        with open(d / "pytorch_model.bin", "wb") as f:
            pickle.dump(_Payload(marker), f)
    data = make_data(tmp_path / "data")
    args = base_args(data, tmp_path / "out")
    args[args.index("--model") + 1] = str(d)
    _one_line(*run_cli(args, capsys), str(d))
    assert not marker.exists()
