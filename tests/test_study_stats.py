"""Bootstrap intervals of a multi-order study (evaluation/bootstrap.py) and the study report
(bench/study_report.py), on small fake study directories written by hand (no model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aimmerging.bench.study_report import build_study_report, collect_study, study_markdown, write_study_report
from aimmerging.errors import UserError
from aimmerging.evaluation.bootstrap import bootstrap_study, run_metrics, verdict

B = 300  # replicates in most tests: enough for the checks, fast


# -- writing fake runs -----------------------------------------------------------------------------

def write_run(run_dir: Path, tasks: list[str], rows: dict[int, dict[str, list[float]]], *, method: str | None = None,
              complete: bool = True, ids: dict[str, list] | None = None, zero_shot: bool = True) -> None:
    """A run directory as the runner writes it: results.json and one stage per row (one stage
    named "all" filling the last row for mtl), each with scores.json and predictions."""
    method = method or run_dir.name
    stages = []
    for i, (row, by_task) in enumerate(sorted(rows.items())):
        name = "all" if method == "mtl" else tasks[row]
        stage = run_dir / "stages" / f"{i:02d}-{name}"
        (stage / "predictions").mkdir(parents=True)
        record = {"index": i, "name": name, "row": row, "scores": {t: float(np.mean(s)) for t, s in by_task.items()}}
        (stage / "scores.json").write_text(json.dumps(record))
        for t, scores in by_task.items():
            task_ids = (ids or {}).get(t) or [f"{t}_{k}" for k in range(len(scores))]
            lines = [json.dumps({"id": x, "gold": "g", "prediction": "p", "score": float(s)}) for x, s in zip(task_ids, scores)]
            (stage / "predictions" / f"{t}.jsonl").write_text("\n".join(lines) + "\n")
        stages.append(record)
    if zero_shot:  # ignored by the report: no row
        z = run_dir / "stages" / "zero-shot"
        z.mkdir(parents=True)
        (z / "scores.json").write_text(json.dumps({"name": "zero-shot", "scores": {tasks[0]: 0.0}}))
    results = {"method": method, "tasks": tasks, "accuracy_matrix": [], "complete": complete, "stages": stages}
    (run_dir / "results.json").write_text(json.dumps(results))


def seq_rows(tasks: list[str], final: dict[str, list[float]], diagonal: dict[str, list[float]]) -> dict:
    """Rows of a sequential run: row j scores tasks 0..j; the diagonal and the last row given
    (earlier off-diagonal entries reuse the diagonal)."""
    T = len(tasks)
    rows = {j: {t: diagonal[t] for t in tasks[: j + 1]} for j in range(T - 1)}
    rows[T - 1] = {t: final[t] for t in tasks}
    return rows


def write_single(study: Path, seed: int, scores: dict[str, list[float]], ids: dict[str, list] | None = None,
                 complete: bool = True) -> None:
    tasks = list(scores)
    write_run(study / f"single-s{seed}", tasks, {j: {t: scores[t]} for j, t in enumerate(tasks)}, method="single",
              ids=ids, complete=complete)


TASKS = ["a", "b"]
# hand-computed: OP = (0.5 + 0.5) / 2 = 0.5, BWT = 0.5 - 0.75 = -0.25, FWT = ((0.75 - 0.75) + (0.5 - 0.25)) / 2 = 0.125
SEQ = seq_rows(TASKS, final={"a": [1, 0, 0, 1], "b": [1, 1, 0, 0]}, diagonal={"a": [1, 0, 1, 1], "b": [1, 1, 0, 0]})
SINGLE = {"a": [1, 1, 1, 0], "b": [0, 1, 0, 0]}
# a second cell: OP = (1 + 0.25) / 2 = 0.625, BWT = 1 - 0.5 = 0.5, FWT = ((0.5 - 0.5) + (0.25 - 0.5)) / 2 = -0.125
SEQ2 = seq_rows(TASKS, final={"a": [1, 1, 1, 1], "b": [0, 0, 1, 0]}, diagonal={"a": [1, 0, 1, 0], "b": [0, 0, 1, 0]})
SINGLE2 = {"a": [0, 1, 0, 1], "b": [1, 1, 0, 0]}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Cells o1-s1 and o2-s2: seq and aimmerging (= seq) complete in both; mtl complete in o1-s1."""
    write_single(tmp_path, 1, SINGLE)
    write_single(tmp_path, 2, SINGLE2)
    for cell, rows in (("o1-s1", SEQ), ("o2-s2", SEQ2)):
        write_run(tmp_path / cell / "seq", TASKS, rows)
        write_run(tmp_path / cell / "aimmerging", TASKS, rows)
    write_run(tmp_path / "o1-s1" / "mtl", TASKS, {1: {"a": [1, 1, 0, 0], "b": [1, 1, 1, 0]}})
    return tmp_path


# -- (1) point estimates ---------------------------------------------------------------------------

def test_point_estimates_equal_hand_computed_metrics(study: Path):
    m = run_metrics(SEQ, TASKS, SINGLE)
    assert m == pytest.approx({"op": 0.5, "bwt": -0.25, "fwt": 0.125})
    report = build_study_report(study, B=B)
    cells = report["cells"]
    assert cells["o1-s1"]["methods"]["seq"] == pytest.approx({"op": 0.5, "bwt": -0.25, "fwt": 0.125})
    assert cells["o2-s2"]["methods"]["seq"] == pytest.approx({"op": 0.625, "bwt": 0.5, "fwt": -0.125})
    seq = report["methods"]["seq"]
    assert seq["cells"] == 2
    assert seq["op"]["point"] == pytest.approx((0.5 + 0.625) / 2)
    assert seq["bwt"]["point"] == pytest.approx((-0.25 + 0.5) / 2)
    assert seq["fwt"]["point"] == pytest.approx(0.0)
    assert all(seq[k]["cells"] == 2 for k in ("op", "bwt", "fwt"))
    assert cells["o1-s1"]["tasks"] == TASKS and cells["o1-s1"]["n_examples"] == {"a": 4, "b": 4}
    assert cells["o1-s1"]["order"] == 1 and cells["o2-s2"]["seed"] == 2
    json.dumps(report, allow_nan=False)  # JSON-serialisable as is


# -- (2) intervals ---------------------------------------------------------------------------------

def _one_cell(final: dict, diagonal: dict, single: dict, k: int = 1, seed: int = 0) -> dict:
    """bootstrap_study of one seq-like run with every example repeated k times."""
    rep = lambda d: {t: np.repeat(np.asarray(v, dtype=float), k) for t, v in d.items()}  # noqa: E731
    rows = seq_rows(list(final), rep(final), rep(diagonal))
    return bootstrap_study({"c": {"m": rows}}, {"c": list(final)}, {"c": rep(single)}, reference="m", B=B, seed=seed)


def test_interval_contains_point_and_shrinks_with_more_examples():
    rng = np.random.default_rng(3)
    data = [{t: (rng.random(30) < p).astype(float) for t, p in zip("xyz", (0.4, 0.6, 0.7))} for _ in range(3)]
    widths = {}
    for k in (1, 4):
        out = _one_cell(*data, k=k)["methods"]["m"]
        for metric in ("op", "bwt", "fwt"):
            s = out[metric]
            assert s["ci"][0] <= s["point"] <= s["ci"][1], (k, metric, s)
            widths[k, metric] = s["ci"][1] - s["ci"][0]
    for metric in ("op", "bwt", "fwt"):
        assert 0 < widths[4, metric] < 0.75 * widths[1, metric]  # ~ 1/sqrt(4) of the width


# -- (3) differences and verdicts ------------------------------------------------------------------

def test_identical_method_is_an_exact_tie(study: Path):
    d = build_study_report(study, B=B)["differences"]["seq"]  # aimmerging has the same scores (other files)
    for k in ("op", "bwt", "fwt"):
        assert d[k]["point"] == 0.0 and d[k]["ci"] == [0.0, 0.0] and d[k]["verdict"] == "equivalent"
        assert d[k]["p"] == 1.0 and d[k]["equivalent"] is True
        assert d[k]["cells"] == 2


def test_worse_on_every_example_is_a_win_for_the_reference(tmp_path: Path):
    rng = np.random.default_rng(0)
    tasks = ["a", "b", "c"]
    for cell in ("o1-s1", "o2-s1"):
        good = {t: rng.uniform(0.3, 1.0, 25) for t in tasks}
        bad = {t: s - rng.uniform(0.05, 0.3, 25) for t, s in good.items()}
        write_run(tmp_path / cell / "aimmerging", tasks, seq_rows(tasks, good, good))
        write_run(tmp_path / cell / "seq", tasks, seq_rows(tasks, bad, good))
    d = build_study_report(tmp_path, B=B)["differences"]["seq"]
    assert d["op"]["verdict"] == "win" and d["op"]["ci"][0] > 0
    assert d["bwt"]["verdict"] == "win"  # same diagonal, worse last row
    assert d["fwt"]["point"] is None and d["fwt"]["verdict"] is None  # no single reference
    other = build_study_report(tmp_path, reference="seq", B=B)["differences"]["aimmerging"]
    assert other["op"]["verdict"] == "loss" and other["op"]["ci"][1] < 0
    assert verdict(0.05, 0.2, 0.01) == "equivalent" and verdict(-0.1, 0.01, 0.9) == "loss"
    assert verdict(0.05, 0.2, 0.3) == "undecided" and verdict(None, None, None) is None


# -- (4) pairing -----------------------------------------------------------------------------------

def test_differences_use_only_cells_where_both_are_complete(tmp_path: Path):
    worse = seq_rows(TASKS, final={"a": [0, 0, 0, 1], "b": [0, 1, 0, 0]}, diagonal={"a": [1, 0, 1, 1], "b": [1, 1, 0, 0]})
    write_run(tmp_path / "o1-s1" / "aimmerging", TASKS, SEQ)
    write_run(tmp_path / "o1-s1" / "ewc", TASKS, worse)
    write_run(tmp_path / "o2-s1" / "aimmerging", TASKS, SEQ2)
    write_run(tmp_path / "o2-s1" / "ewc", TASKS, {0: SEQ2[0]}, complete=False)
    write_run(tmp_path / "o3-s1" / "ewc", TASKS, SEQ2)  # no aimmerging in this cell
    report = build_study_report(tmp_path, B=B)
    assert report["methods"]["aimmerging"]["op"]["cells"] == 2
    assert report["methods"]["ewc"]["op"]["cells"] == 2
    d = report["differences"]["ewc"]
    assert d["cells"] == 1 and d["op"]["cells"] == 1
    assert d["op"]["point"] == pytest.approx(0.5 - 0.25)  # o1-s1 only
    assert d["bwt"]["point"] == pytest.approx(-0.25 - (0.25 - 0.75))


# -- (5) the same examples ----------------------------------------------------------------------

def test_mismatching_ids_raise(study: Path):
    other = {"a": ["a_0", "a_1", "a_3", "a_2"]}
    write_run(study / "o1-s1" / "ewc", TASKS, SEQ, ids=other)
    with pytest.raises(ValueError, match="other test examples of task 'a'"):
        collect_study(study)
    with pytest.raises(ValueError, match="same examples"):  # the pure function checks the sizes
        bootstrap_study({"c": {"m": {0: {"a": np.ones(3)}}, "n": {0: {"a": np.ones(4)}}}}, {"c": ["a"]}, B=5)


def test_single_with_other_ids_leaves_the_cell_without_fwt(study: Path):
    shutil.rmtree(study / "single-s2")
    write_single(study, 2, SINGLE2, ids={"b": ["x0", "x1", "x2", "x3"]})
    report = build_study_report(study, B=B)
    cell = report["cells"]["o2-s2"]
    assert cell["methods"]["seq"]["fwt"] is None and "other test examples" in cell["fwt_note"]
    assert cell["methods"]["seq"]["op"] == pytest.approx(0.625)
    assert report["methods"]["seq"]["fwt"]["cells"] == 1
    assert report["methods"]["seq"]["fwt"]["point"] == pytest.approx(0.125)
    assert "o2-s2: no FWT" in study_markdown(report)


# -- (6) missing runs ------------------------------------------------------------------------------

def test_incomplete_and_absent_runs_are_missing_not_used(study: Path):
    write_run(study / "o2-s2" / "mtl", TASKS, {1: {"a": [0, 0, 0, 0], "b": [0, 0, 0, 0]}}, complete=False)
    write_run(study / "o1-s1" / "ewc", TASKS, {0: SEQ[0]}, complete=False)
    shutil.rmtree(study / "single-s2")
    report = build_study_report(study, B=B)
    missing = {(x["cell"], x["method"]): x["status"] for x in report["missing"]}
    assert missing[("o2-s2", "mtl")].startswith("incomplete")
    assert missing[("o1-s1", "ewc")] == "incomplete (1/2 stages)"
    assert missing[("o2-s2", "ewc")] == "not started"
    assert missing[("single-s2", "single")].startswith("not started")
    assert "mtl" not in report["cells"]["o2-s2"]["methods"]
    assert report["methods"]["mtl"]["op"]["point"] == pytest.approx(0.625)  # o1-s1 only
    assert report["methods"]["mtl"]["cells"] == 1
    empty = {"point": None, "ci": None, "cells": 0, "seed_sd": None, "test_se": None, "seeds": 0}
    assert report["methods"]["ewc"] == {"cells": 0, **{k: empty for k in ("op", "bwt", "fwt")}}
    assert report["cells"]["o2-s2"]["methods"]["seq"]["fwt"] is None  # no reference for seed 2
    assert report["methods"]["seq"]["fwt"]["cells"] == 1
    md = study_markdown(report)
    assert "- o1-s1: ewc (incomplete (1/2 stages))" in md and "- single-s2: single" in md


# -- (7) the joint run -----------------------------------------------------------------------------

def test_mtl_gets_op_only(study: Path):
    report = build_study_report(study, B=B)
    mtl = report["methods"]["mtl"]
    assert mtl["op"]["point"] == pytest.approx((0.5 + 0.75) / 2) and mtl["op"]["cells"] == 1
    assert mtl["bwt"]["point"] is None and mtl["fwt"]["point"] is None
    d = report["differences"]["mtl"]
    assert d["op"]["point"] == pytest.approx(0.5 - 0.625) and d["op"]["verdict"] in ("undecided", "loss")
    assert d["bwt"]["point"] is None and d["fwt"]["verdict"] is None


# -- (8) writing -----------------------------------------------------------------------------------

def test_write_study_report_writes_three_files(study: Path):
    report = write_study_report(study, command="aimmerging bench --study x", B=B)
    for name in ("report.json", "report.md", "report.png"):
        assert (study / name).is_file() and (study / name).stat().st_size > 0
    assert json.loads((study / "report.json").read_text())["methods"] == json.loads(json.dumps(report["methods"]))
    md = (study / "report.md").read_text()
    assert "`aimmerging bench --study x`" in md and "| **aimmerging** | 2 |" in md
    assert "| seq | 2 | +0.0000 [+0.0000, +0.0000] equivalent* |" in md
    assert "| mtl | 1 | -0.1250 [" in md
    assert (study / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(study.glob(".report*"))  # no temporary file left


def test_no_finished_run_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="no finished run yet"):
        write_study_report(tmp_path)
    write_run(tmp_path / "o1-s1" / "seq", TASKS, {0: SEQ[0]}, complete=False)
    with pytest.raises(UserError, match="no finished run yet"):
        write_study_report(tmp_path)
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(UserError, match="not a directory"):
        build_study_report(tmp_path / "nope")


# -- (9) determinism -------------------------------------------------------------------------------

def test_same_rng_seed_same_report(tmp_path: Path):
    rng = np.random.default_rng(1)
    for cell in ("o1-s1", "o2-s1"):
        for method in ("aimmerging", "seq"):
            scores = {t: rng.random(20) for t in TASKS}
            write_run(tmp_path / cell / method, TASKS, seq_rows(TASKS, scores, scores))
    one, two = build_study_report(tmp_path, B=B, seed=7), build_study_report(tmp_path, B=B, seed=7)
    assert one == two
    other = build_study_report(tmp_path, B=B, seed=8)
    assert other["methods"]["seq"]["op"]["point"] == one["methods"]["seq"]["op"]["point"]
    assert other["methods"]["seq"]["op"]["ci"] != one["methods"]["seq"]["op"]["ci"]
    assert one["bootstrap"]["B"] == B and one["bootstrap"]["seed"] == 7


def test_study_scale_is_fast():
    """4 tasks x 200 examples x 15 methods x 3 cells, B = 2000: well under a few seconds."""
    import time

    rng = np.random.default_rng(0)
    tasks = ["t0", "t1", "t2", "t3"]
    runs = {c: {f"m{m}": {r: {t: (rng.random(200) < 0.6).astype(float) for t in tasks[: r + 1]} for r in range(4)}
                for m in range(15)} for c in ("o1-s1", "o2-s1", "o3-s1")}
    singles = {c: {t: (rng.random(200) < 0.6).astype(float) for t in tasks} for c in runs}
    start = time.perf_counter()
    out = bootstrap_study(runs, {c: tasks for c in runs}, singles, reference="m0", B=2000)
    assert time.perf_counter() - start < 5
    assert len(out["differences"]) == 14 and out["methods"]["m3"]["fwt"]["cells"] == 3


def test_merge_summary_counts_forgetting_intervals_and_probe_noise():
    from aimmerging.trace import merge_summary

    recs = [{"task": "a", "task_index": 0, "event": "step", "step": 1, "history_loss": None, "interval": 8}]
    recs += [{"task": "b", "task_index": 1, "event": "step", "step": i, "history_loss": h, "interval": iv}
             for i, (h, iv) in enumerate([(1.0, 8), (3.0, 8), (1.0, 4), (3.0, 16)], 1)]
    recs += [{"task": "b", "task_index": 1, "event": "merge", "step": 2, "reason": "signal", "forgetting_count": 2, "outer_steps": 8},
             {"task": "b", "task_index": 1, "event": "merge", "step": 4, "reason": "forced", "forgetting_count": 1, "outer_steps": 4},
             {"task": "b", "task_index": 1, "event": "select_best", "step": 2, "val_loss": 0.5}]
    s = merge_summary(recs)
    assert s["merges"] == 2 and s["f_above_1"] == 1 and s["forgetting_counts"] == {"2": 1, "1": 1}
    assert s["reasons"] == {"signal": 1, "forced": 1} and (s["interval_min"], s["interval_max"]) == (4, 16)
    task = s["tasks"][0]
    assert task["task"] == "b" and task["outer_steps"] == 12 and task["best_step"] == 2
    assert s["history_cv_median"] == pytest.approx(np.std([1, 3, 1, 3], ddof=1) / 2)
    assert merge_summary(recs[:1]) is None
