"""Reliability: options checked up front, equal configs resume, OS errors as one line, disk full
resumes, library noise kept off stderr (issue 13, items 4, 5, 6 and 9)."""

from __future__ import annotations

import errno
import json
import os


import pytest

from helpers import one_line_error

from aimmerging.cli.main import main
from test_cli_errors import base_args, make_data, run_cli


_one_line = one_line_error

# -- 5. every option checked before anything is written ---------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--adam-beta1", "1.5"], "adam_beta1: must be in [0, 1)"),
    (["--adam-beta2", "nan"], "adam_beta2: must be a finite number"),
    (["--adam-eps", "-1"], "adam_eps: must be > 0"),
    (["--adam-eps", "0"], "adam_eps: must be > 0"),
    (["--seed", "-5"], "seed: must be in [0, 4294967295]"),
    (["--seed", str(2**32)], "seed: must be in [0, 4294967295]"),
    (["--lr", "inf"], "lr: must be a finite number"),
    (["--method", "aimmerging", "--outer-lr", "-1"], "outer_lr: must be > 0"),
    (["--method", "aimmerging", "--threshold-factor", "nan"], "threshold_factor: must be a finite number"),
    (["--method", "merge-fixed", "--fixed-w-in", "nan"], "fixed_w_in: must be a finite number"),
    (["--fixed-w-in", "nan"], "fixed_w_in: must be a finite number"),  # another method's option: checked too
    (["--method", "aimmerging", "--max-interval", "1"], "min_interval <= max_interval"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, flags, expected):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    _one_line(*run_cli(base_args(data, out) + flags, capsys), expected)
    assert not out.exists()  # no config.yaml that would block the corrected command


# -- 4. equal configs resume; the refusal says what --overwrite deletes ------------------------------

def test_trailing_slash_in_data_dir_is_the_same_config(tmp_path, capsys, caplog):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main(base_args(data, out)) == 0
    capsys.readouterr()
    again = base_args(data, out)
    again[again.index("--data-dir") + 1] = str(data) + "/"
    caplog.clear()
    assert main(again) == 0
    assert "already finished" in caplog.text


def test_a_different_config_is_refused_naming_what_overwrite_deletes(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main(base_args(data, out)) == 0
    capsys.readouterr()
    line = _one_line(*run_cli(base_args(data, out) + ["--lr", "0.01"], capsys), "differs in: lr")
    assert "--overwrite to delete that run" in line


# -- 6. operating-system errors are one line naming the path -----------------------------------------

def test_output_dir_under_a_file(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    (tmp_path / "file").write_text("x")
    _one_line(*run_cli(base_args(data, tmp_path / "file" / "run"), capsys), str(tmp_path / "file"))


def _fail_nth_write(monkeypatch, n: int, err: int, match: str = ""):
    """Make the n-th atomic write whose path contains ``match`` raise OSError(err)."""
    from aimmerging import io as io_mod

    real = io_mod.atomic_write
    calls = {"n": 0}

    def atomic_write(path, write):
        if match in str(path):
            calls["n"] += 1
            if calls["n"] == n:
                raise OSError(err, os.strerror(err), str(path))
        return real(path, write)

    monkeypatch.setattr(io_mod, "atomic_write", atomic_write)
    from aimmerging.reporting import plots

    monkeypatch.setattr(plots, "atomic_write", atomic_write)  # bound by name there
    return calls


@pytest.mark.parametrize("where", ["config.yaml", "predictions", "scores.json", "results.json", "adapter"])
def test_disk_full_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch, where):
    """ENOSPC while writing the config, a stage's predictions, its scores, the results, or the
    adapter: one line naming the file; after space is freed the same command finishes with the
    results of an uninterrupted run."""
    data = make_data(tmp_path / "data")
    clean = tmp_path / "clean"
    assert main(base_args(data, clean)) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        if where == "adapter":
            from peft import PeftModel

            def full(self, *a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[0]) if a else None)

            m.setattr(PeftModel, "save_pretrained", full)
        else:
            _fail_nth_write(m, 2 if where in ("predictions", "scores.json") else 1, errno.ENOSPC, where)
        capsys.readouterr()
        _one_line(*run_cli(base_args(data, out), capsys), "No space left on device", "rerun the same command")
    assert main(base_args(data, out)) == 0
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, clean))
    assert got["accuracy_matrix"] == want["accuracy_matrix"] and got["complete"] is True
    assert not list(out.glob("**/.*.tmp")) and not list((out / "stages").glob(".tmp-*"))


def test_read_only_run_and_plot_directories(tmp_path, capsys, monkeypatch):
    """(Simulated: this machine runs as root, which may write anywhere.)"""
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_nth_write(m, 1, errno.EACCES, "config.yaml")
        _one_line(*run_cli(base_args(data, out), capsys), "config.yaml", "Permission denied")
    assert main(base_args(data, out)) == 0
    with monkeypatch.context() as m:
        _fail_nth_write(m, 1, errno.EROFS, ".png")
        _one_line(*run_cli(["plot", str(out)], capsys), "accuracy_matrix.png", "Read-only file system")


def test_binary_config_and_trace_files(tmp_path, capsys):
    binary = tmp_path / "bin"
    binary.write_bytes(b"\x80\x81\xff\x00\x17")
    _one_line(*run_cli(["run", "--config", str(binary)], capsys), str(binary))
    _one_line(*run_cli(["controller", "replay", str(binary)], capsys), str(binary))


@pytest.mark.parametrize("record, expected", [
    ({"task": "a", "event": "step", "step": 1, "history_loss": "high", "delta_in_l1": 1.0}, "task 'a'"),
    ({"task": "a", "event": "step", "step": 1, "history_loss": 1.0, "delta_in_l1": [1]}, "task 'a'"),
    ({"task": "a", "event": "step", "step": "one", "history_loss": 1.0, "delta_in_l1": 1.0}, "'step' must be a number"),
])
def test_wrongly_typed_trace_records(tmp_path, capsys, record, expected):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"task": "a", "event": "task_start", "controller": {}}) + "\n" + json.dumps(record) + "\n")
    _one_line(*run_cli(["controller", "replay", str(trace), "--schedule", "reference"], capsys), str(trace))


# -- 9. smaller ones -----------------------------------------------------------------------------------

def test_a_prompt_is_tokenised_once(monkeypatch):
    from aimmerging.data.formatting import Formatter
    from aimmerging.data.olora import Example
    from aimmerging.models.loading import byte_tokenizer

    tok = byte_tokenizer()
    f = Formatter(tok, "causal", max_input_tokens=64)
    calls = {"n": 0}
    real = f._tokenize_prompt

    def counted(text):
        calls["n"] += 1
        return real(text)

    monkeypatch.setattr(f, "_tokenize_prompt", counted)
    ex = [Example(str(i), "x" * 5000 + str(i), "y", "t") for i in range(3)]
    for _ in range(3):  # three evaluations
        f.collate_prompts(ex)
        sorted(ex, key=lambda e: len(f.prompt_ids(e.input)))
    assert calls["n"] == 3


def test_stray_plot_temp_files_are_removed(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main(base_args(data, out)) == 0
    stray = out / "plots" / ".accuracy_matrix.png.abc.tmp"
    stray.write_bytes(b"half a png")
    assert main(["plot", str(out)]) == 0
    assert not stray.exists() and (out / "plots" / "accuracy_matrix.png").is_file()


def test_no_library_noise_on_stderr(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    rc, err = run_cli(base_args(data, tmp_path / "out"), capsys)
    assert rc == 0 and err == [], err  # only "[aimmerging] ..." progress lines (filtered by run_cli)


def test_unknown_model_fails_fast_with_one_line(tmp_path, capsys):
    import time

    data = make_data(tmp_path / "data")
    args = base_args(data, tmp_path / "out")
    args[args.index("--model") + 1] = "no-such-org/no-such-model"
    start = time.perf_counter()
    line = _one_line(*run_cli(args, capsys), "no-such-org/no-such-model")
    assert time.perf_counter() - start < 20 and line.count("aimmerging") == 1


