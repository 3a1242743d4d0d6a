"""Resuming: a finished run is not retrained, and a run killed with SIGKILL at several moments
resumes and ends with exactly the results of an uninterrupted run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aimmerging.cli.main import main

from helpers import stage_adapters, tiny_args

KILL_ARGS = dict(method="aimmerging", steps=40, train_cap=32)


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aimmerging", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            proc.kill()
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point '{what}': {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"kill point '{what}' not reached in {timeout} s")


def _tmp_stage(out: Path, name: str) -> Path:
    return out / "stages" / f".tmp-{name}"


def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    ref = tmp_path / "reference"
    assert main(tiny_args(ref, data_dir, **KILL_ARGS)) == 0

    out = tmp_path / "killed"
    args = tiny_args(out, data_dir, **KILL_ARGS)
    points = [
        ("run directory created, nothing trained", lambda: (out / "config.yaml").is_file()),
        ("in the middle of training task 2",
         lambda: (t := _tmp_stage(out, "01-amazon") / "trace.jsonl").is_file() and len(t.read_text().splitlines()) > 10),
        ("while evaluating after task 2", lambda: (_tmp_stage(out, "01-amazon") / "predictions").is_dir()),
        ("in the middle of training task 3",
         lambda: (t := _tmp_stage(out, "02-agnews") / "trace.jsonl").is_file() and len(t.read_text().splitlines()) > 20),
    ]
    for what, ready in points:
        _kill_when(_spawn(args), ready, what)
        results = out / "results.json"
        assert not results.is_file() or json.loads(results.read_text())["complete"] is False
    done = subprocess.run([sys.executable, "-m", "aimmerging", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "00-dbpedia" not in done.stderr or "already finished" in done.stderr

    got, want = json.loads((out / "results.json").read_text()), json.loads((ref / "results.json").read_text())
    assert got["complete"] is True
    assert got["accuracy_matrix"] == want["accuracy_matrix"] and got["metrics"] == want["metrics"]
    strip = lambda recs: [{k: v for k, v in r.items()} for r in recs]  # noqa: E731
    trace = lambda p: strip(json.loads(line) for line in (p / "trace.jsonl").read_text().splitlines())  # noqa: E731
    assert trace(out) == trace(ref)
    a, b = stage_adapters(out), stage_adapters(ref)
    assert a.keys() == b.keys() == {"00-dbpedia", "01-amazon", "02-agnews"}
    for stage in a:
        assert all((a[stage][k] == b[stage][k]).all() for k in b[stage]), stage
    assert not list((out / "stages").glob(".tmp-*"))


def test_rerunning_a_finished_run_trains_nothing(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir)
    assert main(args) == 0
    stamps = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/scores.json")}
    before = json.loads((out / "results.json").read_text())
    caplog.clear()
    caplog.set_level(logging.INFO, logger="aimmerging")
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert caplog.text.count("already finished") == 3
    after = json.loads((out / "results.json").read_text())
    assert after["accuracy_matrix"] == before["accuracy_matrix"]
    # peak memory is the training processes' (per stage), not the resuming process's
    peaks = [json.loads(p.read_text())["peak_rss_mb"] for p in stamps]
    assert after["peak_rss_mb"] == before["peak_rss_mb"] == max(peaks) > 0


def test_a_different_config_is_refused_unless_overwrite(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, data_dir)) == 0
    capsys.readouterr()
    assert main(tiny_args(out, data_dir, lr=0.001)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config" in err[0] and "lr" in err[0] and str(out) in err[0]
    assert main(tiny_args(out, data_dir, lr=0.001, overwrite=True)) == 0
    assert "lr: 0.001" in (out / "config.yaml").read_text()
