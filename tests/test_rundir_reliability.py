"""Reliability of the run directory: one run at a time (the lock), damaged run files found on
resume (one line naming the file and what to do, never a traceback or a silently different
number), and no adapter with a non-finite value saved or resumed from."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aimmerging.cli.main import main
from aimmerging.errors import UserError
from aimmerging.runs.rundir import CHECKSUM_KEY, LOCK_NAME, RunDirectory

from helpers import TASKS, tiny_args

RUN = dict(method="aimmerging", zero_shot=True)  # merges, a trace per stage, and a zero-shot stage
STAGES = ["zero-shot", "00-dbpedia", "01-amazon", "02-agnews"]


# -- helpers -----------------------------------------------------------------------------------------

def _cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """Run the CLI in this process: (exit status, all of stderr, stderr without progress logs)."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err, [line for line in err.splitlines() if line.strip() and not line.startswith("[aimmerging]")]


def _one_line(rc: int, err: str, lines: list[str], *expected: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("aimmerging: error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _lock_is_free(out: Path) -> bool:
    lock = out / LOCK_NAME
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _strip_checksums(out: Path) -> None:
    """Make the run look written by a version without checksums."""
    for scores in (out / "stages").glob("*/scores.json"):
        record = json.loads(scores.read_text())
        record.pop(CHECKSUM_KEY, None)
        scores.write_text(json.dumps(record, indent=2) + "\n")


def _rewrite_checksum(out: Path, stage: str, rel: str) -> None:
    """Record a file's new digest in its stage's scores.json (a hand edit that also fixes the sum)."""
    import hashlib

    scores = out / "stages" / stage / "scores.json"
    record = json.loads(scores.read_text())
    record[CHECKSUM_KEY]["files"][rel] = hashlib.sha256((out / "stages" / stage / rel).read_bytes()).hexdigest()
    scores.write_text(json.dumps(record, indent=2) + "\n")


def _edit_tensor(path: Path, value: float | None = None) -> None:
    """Change one number of a safetensors file (add 0.5, or set ``value``), keeping it valid."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    flat = tensors[name].view(-1)
    flat[0] = flat[0] + 0.5 if value is None else value
    save_file(tensors, str(path), metadata=metadata)


EDITS = [  # (file name, pattern whose second group is the number to change, new number)
    ("scores.json", r'("scores": \{\s*"[^"]+": )([-\d.e]+)', "0.5"),
    ("results.json", r'("bwt": )([-\d.e]+)', "0.5"),
    ("config.yaml", r"(\nmax_steps: )(\d+)", "4"),
    ("summary.md", r"(\| )(\d\.\d{4})", "0.5000"),
    (".jsonl", r'("score": )([-\d.e]+)', "1.0"),  # predictions
    ("trace.jsonl", r'("train_loss": )([-\d.e]+)', "1.5"),
]


def _edit_number(path: Path) -> None:
    if path.suffix == ".safetensors":
        return _edit_tensor(path)
    text = path.read_text()
    for name, pattern, new in EDITS:
        if path.name == name or (name.startswith(".") and path.suffix == name and "predictions" in path.parts):
            edited, n = re.subn(pattern, lambda m: m.group(1) + new, text, count=1)
            assert n == 1 and edited != text, (path, pattern)
            path.write_text(edited)
            return
    raise AssertionError(f"no edit for {path}")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        _edit_number(path)
    assert path.read_bytes() != data


# -- one finished run, copied for every damage ---------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    assert main(tiny_args(out, data_dir, **RUN)) == 0
    assert not (out / LOCK_NAME).exists()  # the lock file goes with the run
    return {"out": out, "results": _results(out), "trace": (out / "trace.jsonl").read_text()}


def _copy(finished, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    return out


RUN_FILES = ["results.json", "config.yaml", "summary.md", "trace.jsonl"]
STAGE_FILES = (["zero-shot/scores.json", "zero-shot/predictions/amazon.jsonl"]
               + [f"{s}/{f}" for s, task in (("00-dbpedia", "dbpedia"), ("01-amazon", "amazon"), ("02-agnews", "agnews"))
                  for f in ("scores.json", f"predictions/{task}.jsonl", "trace.jsonl", "adapter/adapter_model.safetensors")])
DAMAGES = ["half", "empty", "edit"]
REWRITTEN = {"results.json", "summary.md", "trace.jsonl"}  # run-level files written anew from the stages


def _remove_later_stages(out: Path, stage: str) -> None:
    if stage == "zero-shot":
        return
    for later in STAGES[STAGES.index(stage) + 1:]:
        shutil.rmtree(out / "stages" / later)


def _outcome(out: Path, rc: int, err: str, lines: list[str], damaged: Path, finished, *, refusal: bool | None) -> None:
    """Exit 2 with one line naming the damaged file, or exit 0 with the undamaged run's results;
    ``refusal``: which of the two must happen (None: either)."""
    assert "Traceback" not in err, err
    assert rc in (0, 2), err
    if refusal is not None:
        assert (rc == 2) == refusal, err
    if rc == 2:
        line = _one_line(rc, err, lines, str(damaged))
        assert "rerun the same command" in line or "--overwrite" in line, line
    else:
        got, want = _results(out), finished["results"]
        assert got["complete"] is True
        assert got["accuracy_matrix"] == want["accuracy_matrix"] and got["metrics"] == want["metrics"]
        assert got["zero_shot"] == want["zero_shot"]
    assert _lock_is_free(out)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", RUN_FILES)
def test_damaged_run_level_file(finished, data_dir, tmp_path, capsys, name, how):
    out = _copy(finished, tmp_path)
    _damage(out / name, how)
    rc, err, lines = _cli(tiny_args(out, data_dir, **RUN), capsys)
    _outcome(out, rc, err, lines, out / name, finished, refusal=name not in REWRITTEN)
    if rc == 0:  # written anew from the stages: the files of an undamaged run again
        assert _results(out) == finished["results"]
        assert (out / "trace.jsonl").read_text() == finished["trace"]
    else:
        assert "config.yaml" in lines[0]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", STAGE_FILES)
def test_damaged_stage_file(finished, data_dir, tmp_path, capsys, rel, how):
    out = _copy(finished, tmp_path)
    stage = rel.split("/")[0]
    _remove_later_stages(out, stage)
    damaged = out / "stages" / rel
    _damage(damaged, how)
    rc, err, lines = _cli(tiny_args(out, data_dir, **RUN), capsys)
    _outcome(out, rc, err, lines, damaged, finished, refusal=True)
    assert f"delete {out / 'stages' / stage}" in lines[0]


LEGACY = [("01-amazon/scores.json", how) for how in DAMAGES] + \
         [(f"01-amazon/{f}", how) for f in ("predictions/amazon.jsonl", "predictions/dbpedia.jsonl", "trace.jsonl",
                                            "adapter/adapter_model.safetensors") for how in DAMAGES] + \
         [("zero-shot/predictions/agnews.jsonl", "edit"), ("zero-shot/scores.json", "edit")]
UNDETECTABLE = {("01-amazon/trace.jsonl", "edit"), ("01-amazon/adapter/adapter_model.safetensors", "edit")}


@pytest.mark.parametrize("rel,how", LEGACY, ids=[f"{r}-{h}" for r, h in LEGACY])
def test_damaged_stage_file_of_a_run_without_checksums(finished, data_dir, tmp_path, capsys, rel, how):
    """Stages written before the checksums existed: checked by recomputing the scores from the
    predictions, parsing the trace and loading the adapter. A changed loss in the trace or a changed
    adapter value cannot be told from a real one there; a changed score can."""
    out = _copy(finished, tmp_path)
    _strip_checksums(out)
    stage = rel.split("/")[0]
    _remove_later_stages(out, stage)
    damaged = out / "stages" / rel
    _damage(damaged, how)
    rc, err, lines = _cli(tiny_args(out, data_dir, **RUN), capsys)
    _outcome(out, rc, err, lines, damaged, finished, refusal=None if (rel, how) in UNDETECTABLE else True)


def test_damage_in_an_earlier_stage_is_found_while_later_stages_are_finished(finished, data_dir, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    damaged = out / "stages" / "00-dbpedia" / "predictions" / "dbpedia.jsonl"
    _damage(damaged, "edit")
    rc, err, lines = _cli(tiny_args(out, data_dir, **RUN), capsys)
    _one_line(rc, err, lines, str(damaged), "delete")


def test_a_stage_of_another_plan_is_refused(finished, data_dir, tmp_path, capsys):
    """A finished stage folder under the wrong name (index, name and row are checked)."""
    out = _copy(finished, tmp_path)
    stages = out / "stages"
    shutil.rmtree(stages / "02-agnews")
    shutil.copytree(stages / "01-amazon", stages / "02-agnews")
    rc, err, lines = _cli(tiny_args(out, data_dir, **RUN), capsys)
    _one_line(rc, err, lines, str(stages / "02-agnews" / "scores.json"), "index")


# -- non-finite adapters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("checksums", ["rewritten", "absent"])
def test_resuming_from_an_adapter_with_nan_is_refused(finished, data_dir, tmp_path, capsys, checksums):
    out = _copy(finished, tmp_path)
    _remove_later_stages(out, "01-amazon")  # the resume starts from 01-amazon's adapter
    adapter = out / "stages" / "01-amazon" / "adapter" / "adapter_model.safetensors"
    _edit_tensor(adapter, float("nan"))
    if checksums == "absent":
        _strip_checksums(out)
    else:
        _rewrite_checksum(out, "01-amazon", "adapter/adapter_model.safetensors")
    rc, err, lines = _cli(tiny_args(out, data_dir, **RUN), capsys)
    _one_line(rc, err, lines, str(adapter), "non-finite", f"delete {out / 'stages' / '01-amazon'}")
    assert not (out / "stages" / "02-agnews").exists()


def test_an_adapter_with_nan_is_never_committed(tmp_path):
    from aimmerging.models.loading import tiny_model
    from aimmerging.models.lora import attach_lora, lora_parameters

    model, _ = tiny_model("tiny-causal")
    peft_model = attach_lora(model, "causal")
    with torch.no_grad():
        lora_parameters(peft_model)[1].view(-1)[3] = float("nan")
    rd = RunDirectory(tmp_path / "run")
    record = {"index": 0, "name": "a", "row": 0, "scores": {"a": 0.0}}
    with pytest.raises(RuntimeError, match="non-finite"):
        rd.commit_stage("00-a", record, {"a": [{"id": "1", "gold": "x", "prediction": "y", "score": 0.0}]}, peft_model)
    assert not rd.stage_dir("00-a").exists()


# -- the lock ------------------------------------------------------------------------------------------

LONG = dict(method="aimmerging", steps=24, train_cap=32)


def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_completes(tmp_path, data_dir, capsys):
    # warm up this process on the path the second run takes (imports), so that it is tried at once
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    assert _cli(tiny_args(tmp_path / "foreign", data_dir, **LONG), capsys)[0] == 2
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, **LONG)
    first = subprocess.Popen([sys.executable, "-m", "aimmerging", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 300
        while True:  # until it holds the lock
            try:
                if json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < end, "the first run never took the lock"
            time.sleep(0.02)
        for second in (args, tiny_args(out, data_dir, **{**LONG, "lr": 0.001})):  # same and other settings
            start = time.monotonic()
            rc, err, lines = _cli(second, capsys)
            line = _one_line(rc, err, lines, f"pid {first.pid}", str(out), "in use", "--output-dir")
            assert time.monotonic() - start < 10, "refused at once, not after waiting"
            assert "different config" not in line
        assert first.poll() is None, "the first run ended before the second was tried: make it longer"
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _results(out)["complete"] is True
    steps = [r for r in map(json.loads, (out / "trace.jsonl").read_text().splitlines()) if r["event"] == "step"]
    assert len(steps) == len(TASKS.split(",")) * LONG["steps"]
    assert not (out / LOCK_NAME).exists()

    # a lock file left by a run that was killed (its pid is dead) does not block the resume
    shutil.rmtree(out / "stages" / "02-agnews")
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "command": "killed"}) + "\n")
    rc, err, lines = _cli(args, capsys)
    assert rc == 0 and not lines, err
    assert _results(out)["complete"] is True and (out / "stages" / "02-agnews" / "scores.json").is_file()
    assert not (out / LOCK_NAME).exists()


def test_a_live_lock_held_by_this_process_is_refused_naming_it(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    holder = RunDirectory(out)
    holder.lock()
    try:
        rc, err, lines = _cli(tiny_args(out, data_dir), capsys)
        _one_line(rc, err, lines, f"pid {os.getpid()}", os.uname().nodename)
    finally:
        holder.unlock()
    assert not out.exists()  # created for the lock only, and removed with it
    assert main(tiny_args(out, data_dir)) == 0


def test_a_directory_that_is_not_a_run_is_refused_untouched(tmp_path, data_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err, lines = _cli(tiny_args(out, data_dir), capsys)
    _one_line(rc, err, lines, "not an aimmerging run directory")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_keeps_the_lock_while_it_replaces_the_run(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir)) == 0
    real_init = RunDirectory.init
    seen = {}

    def init(self, cfg, replace):
        real_init(self, cfg, replace)
        seen["replace"] = replace
        seen["held"] = (self.path / LOCK_NAME).is_file() and not _lock_is_free(self.path)

    monkeypatch.setattr(RunDirectory, "init", init)
    assert main(tiny_args(out, data_dir, lr=0.001, overwrite=True)) == 0
    assert seen == {"replace": True, "held": True}
    assert "lr: 0.001" in (out / "config.yaml").read_text() and not (out / LOCK_NAME).exists()


def test_the_lock_is_released_after_a_failed_run(tmp_path, data_dir, capsys, monkeypatch):
    import aimmerging.runs.runner as runner_module

    # a user error after the lock was taken: a new directory is left as it was (absent)
    out = tmp_path / "run"
    args = tiny_args(out, data_dir)
    bad = list(args)
    bad[bad.index("--model") + 1] = str(tmp_path / "no-such-model")
    rc, err, lines = _cli(bad, capsys)
    _one_line(rc, err, lines, "no-such-model")
    assert not out.exists()

    # a bug (any exception) in the middle of the run
    def broken(*a, **k):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(runner_module, "evaluate_tasks", broken)
        with pytest.raises(RuntimeError, match="boom"):
            main(args)
    assert (out / "config.yaml").is_file() and _lock_is_free(out)

    # Ctrl-C in the middle of training
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(runner_module, "train_stage", interrupted)
        assert main(args) == 130
    assert _lock_is_free(out)
    assert main(args) == 0
    assert _results(out)["complete"] is True and _lock_is_free(out)


def test_keep_lock_holds_the_directory_for_the_caller(tmp_path, data_dir, capsys):
    """For a caller that still writes into the directory after the run (the CLI's plots)."""
    from aimmerging.cli.main import build_parser
    from aimmerging.cli.run_cmd import config_from_args
    from aimmerging.runs.runner import run_config

    out = tmp_path / "run"
    argv = tiny_args(out, data_dir)
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    rd = RunDirectory(out)
    try:
        assert run_config(cfg, run_dir=rd, keep_lock=True).results["complete"] is True
        assert rd.locked and not _lock_is_free(out)
        rc, err, lines = _cli(argv, capsys)
        _one_line(rc, err, lines, f"pid {os.getpid()}", "in use")
    finally:
        rd.unlock()
    assert _lock_is_free(out) and not (out / LOCK_NAME).exists()


# -- one place for the layout; the bench's shared stages go through the run directory's commit -------------

def test_no_module_outside_runs_spells_a_run_directory_file_name():
    """Every file name of a run directory is spelled in ``runs/layout.py`` only (plots, hf, bench,
    the study report and the demo build their paths through it)."""
    from aimmerging.runs import layout

    names = [layout.CONFIG, layout.RESULTS, layout.TRACE, layout.SUMMARY, layout.SCORES, layout.METHOD_STATE,
             layout.BENCH_FILE, layout.THROUGHPUT]
    src = Path(layout.__file__).resolve().parents[1]
    spelled = []
    for path in src.rglob("*.py"):
        if path.parent.name == "runs":
            continue
        text = path.read_text(encoding="utf-8")
        spelled += [f"{path.relative_to(src)}: {name}" for name in names
                    if f'"{name}"' in text or f"'{name}'" in text or f'/ "{name}' in text]
        spelled += [f"{path.relative_to(src)}: {d}" for d in (layout.STAGES, layout.PREDICTIONS, layout.PLOTS)
                    if f'/ "{d}"' in text]
    assert spelled == []


def test_copy_stage_verifies_the_source_and_commits_like_a_stage(finished, tmp_path, capsys):
    source = _copy(finished, tmp_path / "source")
    target = RunDirectory(tmp_path / "target")
    (tmp_path / "target").mkdir()
    assert target.copy_stage(RunDirectory(source), "00-dbpedia")
    assert (tmp_path / "target" / "stages" / "00-dbpedia" / "scores.json").is_file()
    assert not list((tmp_path / "target" / "stages").glob(".tmp-*"))
    assert not target.copy_stage(RunDirectory(source), "00-dbpedia")  # already there: left alone
    assert RunDirectory(tmp_path / "target").finished("00-dbpedia") is not None
    _damage(source / "stages" / "01-amazon" / "trace.jsonl", "half")
    with pytest.raises(UserError) as refused:
        target.copy_stage(RunDirectory(source), "01-amazon")
    assert "01-amazon" in str(refused.value) and not (tmp_path / "target" / "stages" / "01-amazon").exists()
