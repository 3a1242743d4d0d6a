"""Hostile runtime conditions (issue 27, part 3): finite but huge options, a method hook that
writes a non-finite value, a kill between writing a run file and its rename, Ctrl-C before the
command runs, a full disk while an adapter or a method state is saved, the umask, and a hand-made
trace for ``controller replay``. Each ends in a finished run or in ONE line and the stated exit
status, with nothing half-written and no stale temporary file after the resume."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from aimmerging.cli.main import main
from aimmerging.io import atomic_torch_save, atomic_write_text, is_temp_file_of, remove_temp_files
from aimmerging.methods.seq import Sequential
from aimmerging.training.engine import SKIP_OVERFLOW, optimizer_step

from helpers import stage_adapters, tiny_args

HERE = Path(__file__).resolve().parent
RUN_FILES = ("results.json", "trace.jsonl", "summary.md", "config.yaml")


# -- helpers -----------------------------------------------------------------------------------------

def _cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """Run the CLI in this process: (exit status, all of stderr, stderr without progress logs)."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err, _lines(err)


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[aimmerging]")]


def _one_line(rc: int, err: str, lines: list[str], *expected: str, status: int = 2) -> str:
    assert "Traceback" not in err, err
    assert rc == status, err
    assert len(lines) == 1 and lines[0].startswith("aimmerging: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _strict_records(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def _assert_finite_adapters(out: Path) -> None:
    adapters = stage_adapters(out)
    assert adapters
    for stage, tensors in adapters.items():
        for name, t in tensors.items():
            assert bool(t.isfinite().all()), f"{stage}: {name} is not finite"


def _temp_files(root: Path) -> list[Path]:
    """Every temporary file of the atomic writer under ``root`` (``.<name>.<8 chars>.tmp``)."""
    return [p for p in root.rglob(".*.tmp") if p.is_file() and is_temp_file_of(p.name, p.name[1:].rsplit(".", 2)[0])]


def _finished_cleanly(out: Path) -> None:
    """A complete run: results say so, every stage is committed, nothing temporary is left."""
    assert _results(out)["complete"] is True
    assert not list((out / "stages").glob(".tmp-*"))
    assert _temp_files(out) == []
    _assert_finite_adapters(out)


# -- 1. finite but huge options: an optimizer step torch refuses as overflowing -------------------------

def _tiny_engine(data_dir, lr: float):
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    from aimmerging.data.formatting import Formatter
    from aimmerging.data.olora import read_task
    from aimmerging.models.loading import load_base_model
    from aimmerging.models.lora import attach_lora
    from aimmerging.training.engine import Engine

    torch.manual_seed(0)
    base, tok, kind = load_base_model("tiny-causal")
    model = attach_lora(base, kind)
    engine = Engine(model, Formatter(tok, kind, max_input_tokens=64), Accelerator(cpu=True),
                    micro_batch_size=2, max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(engine.params, lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10)
    batches = [read_task(data_dir, "train", "agnews")[k:k + 2] for k in (0, 2)]
    return engine, optimizer, scheduler, batches


def test_an_overflowing_optimizer_step_is_skipped_and_leaves_adapter_and_state_unchanged(data_dir):
    """AdamW's first step size is 10 x lr: with lr 1e38 it does not fit a float32 and torch raises
    inside ``param.addcdiv_`` (possibly after updating some moments): the step is skipped, the
    adapter and the optimizer's state are as before, and training goes on at a sane lr."""
    engine, optimizer, scheduler, batches = _tiny_engine(data_dir, lr=1e-2)
    assert engine.inner_step(batches, optimizer, scheduler)["skipped"] is None
    params = [p.detach().clone() for p in engine.params]
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in engine.params}
    for group in optimizer.param_groups:
        group["lr"] = 1e38
    scheduler.base_lrs = [1e38] * len(scheduler.base_lrs)
    stats = engine.inner_step(batches, optimizer, scheduler)
    assert stats["skipped"] == SKIP_OVERFLOW and stats["lr"] > 1e37
    assert all(torch.equal(p, q) for p, q in zip(engine.params, params))
    for p in engine.params:
        assert all(torch.equal(v, state[id(p)][k]) for k, v in optimizer.state[p].items())
        assert p.grad is None
    scheduler.base_lrs = [1e-2] * len(scheduler.base_lrs)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    assert engine.inner_step(batches, optimizer, scheduler)["skipped"] is None  # and training goes on


def test_optimizer_step_lets_other_errors_through():
    class Broken:
        def step(self):
            raise RuntimeError("expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        optimizer_step(Broken())
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    assert optimizer_step(torch.optim.AdamW([p], lr=1e38)) is False
    assert optimizer_step(torch.optim.AdamW([p], lr=1e-3)) is True


def _force_settings(monkeypatch, **changes) -> None:
    """Training settings the config check might refuse (an up-front bound on --lr), forced in."""
    from aimmerging.training import loop

    real = loop.TrainSettings.from_config.__func__
    monkeypatch.setattr(loop.TrainSettings, "from_config",
                        classmethod(lambda cls, cfg: dataclasses.replace(real(cls, cfg), **changes)))


def _force_max_grad_norm(monkeypatch, value: float) -> None:
    from aimmerging.runs import runner

    real = runner.build_engine

    def build(*args, **kwargs):
        built = real(*args, **kwargs)
        built.engine.max_grad_norm = value
        return built

    monkeypatch.setattr(runner, "build_engine", build)


@pytest.mark.parametrize("method", ["seq", "replay", "ewc", "ilora", "aimmerging"])
def test_a_huge_learning_rate_ends_with_finite_adapters(tmp_path, data_dir, monkeypatch, method):
    """``--lr 1e38 --warmup-steps 0``: every step at full lr overflows inside AdamW; it is skipped
    like a non-finite one and the run finishes with finite adapters, the trace saying why."""
    _force_settings(monkeypatch, lr=1e38, warmup_steps=0)
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method=method)) == 0
    _finished_cleanly(out)
    steps = [r for r in _strict_records(out / "trace.jsonl") if r["event"] == "step"]
    assert any(r.get("skipped") == SKIP_OVERFLOW for r in steps)
    assert "Skipped:" in (out / "summary.md").read_text()


@pytest.mark.parametrize("method", ["seq", "aimmerging"])
def test_the_largest_learning_rate_and_clip_end_with_finite_adapters(tmp_path, data_dir, monkeypatch, method):
    """``--lr 1e308 --max-grad-norm 1e308``: every step at a learning rate above 0 overflows (its step
    size does not fit a float32, or even a double) and is skipped; the adapters stay finite."""
    _force_settings(monkeypatch, lr=1e308)
    _force_max_grad_norm(monkeypatch, 1e308)
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method=method)) == 0
    _finished_cleanly(out)
    steps = [r for r in _strict_records(out / "trace.jsonl") if r["event"] == "step"]
    assert steps and all(r.get("skipped") == SKIP_OVERFLOW for r in steps if r["lr"] > 0)


# -- 2. a method hook that writes a non-finite value into the adapter ----------------------------------

class NanAfterTask(Sequential):
    """seq, whose ``after_task`` writes a NaN into the adapter at the second stage while ``broken``
    (used by import path ``test_hostile_runtime:NanAfterTask``)."""

    name = "nan-after-task"
    broken = True

    def after_task(self, view):
        if NanAfterTask.broken and view.stage.index == 1:
            with torch.no_grad():
                view.params[0].view(-1)[0] = math.nan
        return None


def test_a_non_finite_adapter_from_a_method_hook_stops_in_one_line_and_resumes(tmp_path, data_dir, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(NanAfterTask, "broken", True)
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, method="test_hostile_runtime:NanAfterTask")
    rc, err, lines = _cli(args, capsys)
    _one_line(rc, err, lines, "stage 01-amazon", "method 'nan-after-task'", "non-finite", "lora_",
              "rerun the same command")
    assert (out / "stages" / "00-dbpedia" / "scores.json").is_file()
    assert not (out / "stages" / "01-amazon").exists()  # not committed
    assert _results(out)["complete"] is False
    monkeypatch.setattr(NanAfterTask, "broken", False)  # the cause fixed: the same command resumes
    first = (out / "stages" / "00-dbpedia" / "scores.json").read_bytes()
    rc, err, lines = _cli(args, capsys)
    assert rc == 0 and lines == [], err
    assert (out / "stages" / "00-dbpedia" / "scores.json").read_bytes() == first  # not trained again
    _finished_cleanly(out)


# -- 3. a kill between writing a run file and its rename -------------------------------------------

KILL_AT_RENAME = """
import os, sys
target = sys.argv[1]
real = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == target:
        os._exit(137)  # killed after the write, before the rename
    return real(src, dst, *args, **kwargs)
os.replace = replace
from aimmerging.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("target", ["results.json", "trace.jsonl", "summary.md", "scores.json"])
def test_a_kill_before_a_rename_leaves_no_temp_file_after_the_resume(tmp_path, data_dir, target):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, target, *args], capture_output=True, text=True,
                            timeout=240, cwd=HERE)
    assert killed.returncode == 137, killed.stderr
    left = _temp_files(out)
    assert any(is_temp_file_of(p.name, target) for p in left), left  # the kill left one
    assert main(args) == 0
    _finished_cleanly(out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # and the lock file went too


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(tiny_args(out, data_dir)) == 0
    return out


def test_only_our_temp_files_are_removed(finished, data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    stale = []
    for name in RUN_FILES:  # what the atomic writer leaves when killed before its rename
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        os.write(fd, b"half")
        os.close(fd)
        stale.append(Path(path))
    kept = [out / ".results.json.tmp", out / ".results.json.abc.tmp", out / "results.json.abcdefgh.tmp",
            out / ".notes.txt.abcdefgh.tmp", out / ".results.json.abcdefgh.tmp.bak", out / ".results.json.ABCDEFGH.tmp"]
    for p in kept:
        p.write_text("mine")
    (out / ".summary.md.abcdefgh.tmp").mkdir()  # a folder is never a temporary file of ours
    before = _results(out)
    assert main(tiny_args(out, data_dir)) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "mine" for p in kept)
    assert (out / ".summary.md.abcdefgh.tmp").is_dir()
    assert _results(out)["accuracy_matrix"] == before["accuracy_matrix"]


def test_remove_temp_files_matches_the_writers_pattern(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "x")
    fd, ours = tempfile.mkstemp(prefix=".results.json.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    other = tmp_path / ".results.json.abcdefgh.tmp.x"
    other.write_text("y")
    assert is_temp_file_of(Path(ours).name, "results.json")
    assert not is_temp_file_of(Path(ours).name, "results")
    assert remove_temp_files(tmp_path, ["results.json"]) == [Path(ours)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "results.json"]
    assert remove_temp_files(tmp_path / "missing", ["results.json"]) == []


# -- 4. Ctrl-C before the command runs ------------------------------------------------------------------

def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys, tmp_path, data_dir):
    from aimmerging.cli import main as main_mod

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_mod, "build_parser", interrupted)
    out = tmp_path / "run"
    rc, err, lines = _cli(tiny_args(out, data_dir), capsys)
    assert _one_line(rc, err, lines, status=130) == "aimmerging: interrupted"
    assert not out.exists()


def test_ctrl_c_one_second_after_start_is_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "aimmerging", *tiny_args(out, data_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = _lines(err)
    # 130, or death by SIGINT (a shell shows 130 too): CPython ends a process by SIGINT after main
    # returned when a C extension's PyRun_String saw the KeyboardInterrupt (its own flag)
    rc = 130 if proc.returncode == -signal.SIGINT else proc.returncode
    _one_line(rc, err, lines, "interrupted", status=130)
    if out.exists():  # a slow start leaves nothing; a fast one an unfinished run, never a half-written file
        assert _temp_files(out) == []
        assert not (out / "results.json").exists() or _results(out)["complete"] in (True, False)


# -- 5. a full disk while an adapter or a method state is saved ------------------------------------------

DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_while_saving_an_adapter_is_one_line_and_resumes(tmp_path, data_dir, capsys, monkeypatch):
    """What safetensors raises on a full disk becomes the one line every other write gives."""
    import peft.peft_model
    from safetensors import SafetensorError

    real, calls = peft.peft_model.safe_save_file, []

    def full(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("filename"))
        if len(calls) == 2:  # the second stage's adapter
            raise SafetensorError(DISK_FULL)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    out = tmp_path / "run"
    args = tiny_args(out, data_dir)
    rc, err, lines = _cli(args, capsys)
    line = _one_line(rc, err, lines, "adapter_model.safetensors", "No space left on device",
                     "free some space and rerun the same command")
    assert ".tmp-01-amazon" in line
    assert not (out / "stages" / "01-amazon").exists() and _results(out)["complete"] is False
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real)  # space freed
    rc, err, lines = _cli(args, capsys)
    assert rc == 0 and lines == [], err
    _finished_cleanly(out)


@pytest.mark.parametrize("text, code", [
    (DISK_FULL, errno.ENOSPC),
    ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
     errno.ENOSPC),
    ("Error while serializing: I/O error: Disk quota exceeded (os error 122)", 122),
])
def test_safetensors_os_errors_become_os_errors(text, code):
    from safetensors import SafetensorError

    from aimmerging.models.lora import safetensors_os_error

    e = safetensors_os_error(SafetensorError(text), "/x/adapter_model.safetensors")
    assert isinstance(e, OSError) and e.errno == code and e.filename == "/x/adapter_model.safetensors"
    other = SafetensorError("invalid header")
    assert safetensors_os_error(other, "/x") is other


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, leave_kib: int) -> Path:
    """Fill ``disk`` up to ``leave_kib`` KiB of free space."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_kib * 1024))
    return filler


def test_a_full_disk_while_saving_method_state_is_one_line_and_resumes(tmp_path, data_dir, capsys, monkeypatch,
                                                                       small_disk):
    """A real full disk (a small tmpfs with 48 KiB free when the second stage of ewc is committed:
    room for its predictions and adapter, not its 66 KiB Fisher state): one line, and after freeing
    space the same command finishes the run."""
    from aimmerging.runs.rundir import RunDirectory

    real, filled = RunDirectory.commit_stage, []

    def commit(self, dirname, *args, **kwargs):
        if dirname == "01-amazon" and not filled:
            filled.append(_fill(small_disk, 48))
        return real(self, dirname, *args, **kwargs)

    monkeypatch.setattr(RunDirectory, "commit_stage", commit)
    out = small_disk / "run"
    args = tiny_args(out, data_dir, method="ewc")
    rc, err, lines = _cli(args, capsys)
    _one_line(rc, err, lines, "method_state.pt", "No space left on device", "free some space and rerun")
    assert not (out / "stages" / "01-amazon").exists()
    filled[0].unlink()
    rc, err, lines = _cli(args, capsys)
    assert rc == 0 and lines == [], err
    _finished_cleanly(out)


def test_a_real_full_disk_under_an_adapter_is_an_os_error(small_disk):
    from aimmerging.models.loading import tiny_model
    from aimmerging.models.lora import attach_lora, save_adapter

    model, _ = tiny_model("tiny-causal")
    peft_model = attach_lora(model, "causal")
    _fill(small_disk, 8)  # less than the 15 KiB of weights
    with pytest.raises(OSError) as e:
        save_adapter(peft_model, small_disk / "adapter")
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("adapter_model.safetensors")
    with pytest.raises(OSError) as e:
        atomic_torch_save(small_disk / "state.pt", {"fisher": torch.zeros(20000)})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(small_disk / "state.pt")
    assert not (small_disk / "state.pt").exists() and _temp_files(small_disk) == []


# -- 6. the umask --------------------------------------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o027, 0o002, 0o000])
def test_the_adapter_file_follows_the_umask(tmp_path, umask, mask):
    from aimmerging.models.loading import tiny_model
    from aimmerging.models.lora import attach_lora, save_adapter

    model, _ = tiny_model("tiny-causal")
    peft_model = attach_lora(model, "causal")
    umask(mask)
    save_adapter(peft_model, tmp_path / "adapter")
    atomic_torch_save(tmp_path / "state.pt", {"a": torch.ones(2)})
    for p in [*(tmp_path / "adapter").iterdir(), tmp_path / "state.pt"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_every_file_of_a_run_follows_the_umask(tmp_path, data_dir, umask):
    umask(0o027)
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir, method="ewc")) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files) and any(p.name == "method_state.pt" for p in files)
    assert {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != 0o640} == {}


# -- 8. controller replay on a hand-made trace without task_index ---------------------------------------

def _hand_made_trace(path: Path, with_index: bool) -> Path:
    lines = []
    for index, task in enumerate(["alpha", "beta"]):
        for step in range(1, 21):
            rec = {"task": task, "event": "step", "step": step, "history_loss": 1.0, "delta_in_l1": float(step)}
            if with_index:
                rec["task_index"] = index
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def _replay(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["controller", "replay", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_controller_replay_groups_a_hand_made_trace_by_task_name(tmp_path, capsys):
    """Without ``task_index`` every line used to be a task of its own: nothing was printed."""
    outputs = {}
    for with_index in (False, True):
        trace = _hand_made_trace(tmp_path / f"trace-{with_index}.jsonl", with_index)
        rc, out, err = _replay(capsys, str(trace), "--schedule", "fixed", "--initial-interval", "6")
        assert rc == 0 and err == "", err
        outputs[with_index] = out
    assert outputs[False] == outputs[True]
    decisions = [json.loads(line) for line in outputs[False].splitlines()]
    assert [(d["task"], d["step"]) for d in decisions] == [(t, s) for t in ("alpha", "beta") for s in (6, 12, 18)]
    rc, out, _ = _replay(capsys, str(tmp_path / "trace-False.jsonl"), "--schedule", "fixed", "--initial-interval", "6",
                         "--task", "beta")
    assert rc == 0 and [json.loads(line)["step"] for line in out.splitlines()] == [6, 12, 18]


def test_records_without_task_index_join_their_named_task():
    from aimmerging.cli.controller_cmd import _index_tasks_by_name

    records = [{"task": "a", "task_index": 3, "step": 1}, {"task": "b", "step": 1}, {"task": "a", "step": 2},
               {"task": "b", "step": 2}, {"event": "run_start"}]
    assert [r.get("task_index") for r in _index_tasks_by_name(records)] == [3, 4, 3, 4, None]
