"""``aimmerging plot``: plots of hand-written run directories (no training, seconds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aimmerging.cli.plot_cmd import register
from aimmerging.errors import UserError
from aimmerging.reporting.plots import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("history_loss", "learning_signal", "interval", "train_loss")


def _results(method: str, tasks: list[str]) -> dict:
    T = len(tasks)
    matrix = [[round(0.9 - 0.1 * (i - j), 2) if j <= i else None for j in range(T)] for i in range(T)]
    matrix[T - 1][0] = None  # a hole below the diagonal too (eval scope "needed")
    return {"method": method, "model": "tiny-causal", "tasks": tasks, "accuracy_matrix": matrix,
            "metrics": {"op": 0.8, "bwt": -0.05, "fwt": None}, "zero_shot": None, "complete": True}


def _steps(task: str, index: int, n: int, merging: bool, history: bool) -> list[dict]:
    """Step records; with merging, a merge every 4 steps (threshold defined after the window fills)."""
    records = []
    for step in range(1, n + 1):
        since_merge = (step - 1) % 4 + 1
        rec = {"task": task, "task_index": index, "event": "step", "step": step, "train_loss": 5.0 - 0.05 * step,
               "lr": 1e-3, "history_loss": (1.2 + 0.1 * since_merge) if history else None,
               "delta_in_l1": 2.0 * since_merge if merging else None}
        if history and step % 4 == 0:
            rec["val_loss"] = 3.0 + 1.0 / step
        if merging:
            rec["interval"] = 4
            rec["threshold"] = 1.5 if since_merge >= 2 and history else None
        records.append(rec)
        if merging and step % 4 == 0:
            records.append({"task": task, "task_index": index, "event": "merge", "step": step,
                            "reason": ["planned", "early", "forced"][step // 4 % 3] if history else "fixed",
                            "forgetting_count": 1, "w_in": 0.6, "w_out": 0.4, "outer_steps": 2,
                            "learning_signal": 10.0 / step, "interval": 4, "elapsed": 4, "threshold": 1.5,
                            "next_interval": 4 + step // 4, "next_outer_steps": 2, "replay_loss": 4.0,
                            "replay_skipped": 0, "fallback": None})
    return records


def _write_run(run_dir: Path, method: str, tasks: list[str], records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(_results(method, tasks)))
    (run_dir / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture
def merging_run(tmp_path) -> Path:
    """aimmerging: task 0 trains without memory (no history loss, no merges), task 1 merges."""
    records = _steps("dbpedia", 0, 12, merging=False, history=False)
    records.append({"task": "amazon", "task_index": 1, "event": "task_start", "step": 0, "memory_size": 14,
                    "controller": {"schedule": "reference", "initial_interval": 4}})
    records += _steps("amazon", 1, 12, merging=True, history=True)
    records.append({"task": "amazon", "task_index": 1, "event": "select_best", "step": 8, "val_loss": 3.0})
    records.append({"task": "amazon", "task_index": 1, "event": "something_new", "step": 9})  # ignored
    return _write_run(tmp_path / "aim", "aimmerging", ["dbpedia", "amazon"], records)


def _assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 0, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_merging_run(merging_run):
    written = plot_run(merging_run)
    plots = merging_run / "plots"
    expected = [plots / "accuracy_matrix.png", plots / "00-dbpedia_train_loss.png"]
    expected += [plots / f"01-amazon_{kind}.png" for kind in KINDS]
    assert sorted(written) == sorted(expected)
    for path in expected:
        _assert_png(path)
    for kind in ("history_loss", "learning_signal", "interval"):  # the first task has none of these
        assert not (plots / f"00-dbpedia_{kind}.png").exists()
    assert not [p for p in plots.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_non_merging_method(tmp_path):
    tasks = ["dbpedia", "amazon", "agnews"]
    records = [r for i, t in enumerate(tasks) for r in _steps(t, i, 10, merging=False, history=False)]
    run_dir = _write_run(tmp_path / "seq", "seq", tasks, records)
    written = plot_run(run_dir)
    run_dir / "plots"
    assert sorted(p.name for p in written) == sorted(
        ["accuracy_matrix.png"] + [f"{i:02d}-{t}_train_loss.png" for i, t in enumerate(tasks)])
    for path in written:
        _assert_png(path)


def test_fixed_schedule_has_no_history_loss(tmp_path):
    records = _steps("amazon", 1, 12, merging=True, history=False)
    run_dir = _write_run(tmp_path / "fixed", "merge-fixed", ["dbpedia", "amazon"], records)
    names = sorted(p.name for p in plot_run(run_dir))
    assert names == ["01-amazon_interval.png", "01-amazon_learning_signal.png", "01-amazon_train_loss.png",
                     "accuracy_matrix.png"]


def test_replot_overwrites(merging_run):
    first = plot_run(merging_run)
    assert plot_run(merging_run) == first


def test_missing_results(merging_run):
    (merging_run / "results.json").unlink()
    with pytest.raises(UserError, match="results.json"):
        plot_run(merging_run)


def test_missing_trace(merging_run):
    (merging_run / "trace.jsonl").unlink()
    with pytest.raises(UserError, match="trace.jsonl"):
        plot_run(merging_run)


@pytest.mark.parametrize("setup", ["missing", "empty_dir", "file", "bad_results", "bad_trace"])
def test_not_a_run(tmp_path, setup):
    target = tmp_path / "x"
    if setup == "empty_dir":
        target.mkdir()
    elif setup == "file":
        target.write_text("hello")
    elif setup == "bad_results":
        target.mkdir()
        (target / "results.json").write_text('{"tasks": ["a"]}')
        (target / "trace.jsonl").write_text("")
    elif setup == "bad_trace":
        target.mkdir()
        (target / "results.json").write_text(json.dumps(_results("seq", ["a"])))
        (target / "trace.jsonl").write_text("{not json\n")
    with pytest.raises(UserError) as info:
        plot_run(target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_command(merging_run, capsys):
    parser = argparse.ArgumentParser(prog="aimmerging")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plot", str(merging_run)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(Path(line).is_file() for line in lines)
