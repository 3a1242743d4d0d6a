"""Evidence that survives a second look (issue 31): bootstrap draws shared by every cell that scored
the same test examples, known-answer intervals that a changed design would fail, Holm-adjusted
verdicts with an equivalence test, seed-to-seed spread beside the test-sampling error, and a test
subset drawn with its own seed. Pure functions on small synthetic inputs, plus two CLI calls on a
fake study directory (no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aimmerging.evaluation import bootstrap as bs
from test_study_stats import seq_rows, write_run, write_single

# -- a small fixed study: two orders of one seed, a reference "ref" and a method "m" --------------------
# skewed scores in [0, 1] (most near 1, a few near 0), 10 examples per task, ids 0..9 in both cells
R = {"a": [0.93, 0.85, 0.89, 0.99, 0.98, 0.97, 0.88, 0.9, 0.94, 0.0], "b": [0.89, 0.96, 0.85, 0.86, 0.96, 0.9, 0.9, 0.85, 0.8, 0.99]}
M = {"a": [0.14, 0.96, 0.88, 0.11, 0.92, 0.19, 0.06, 0.94, 0.0, 0.83], "b": [0.09, 0.01, 0.0, 0.91, 0.07, 0.9, 0.18, 0.82, 0.97, 0.86]}
R2 = {"a": [0.08, 0.83, 0.84, 0.84, 0.81, 0.84, 0.92, 0.98, 0.87, 0.87], "b": [0.8, 0.91, 0.9, 0.92, 0.95, 0.9, 0.91, 0.9, 0.92, 0.01]}
M2 = {"a": [0.91, 0.89, 0.07, 0.9, 0.0, 0.84, 0.95, 0.85, 0.12, 0.86], "b": [0.07, 0.82, 0.01, 0.06, 0.9, 0.01, 0.99, 0.09, 0.98, 0.03]}
D = {"a": [0.15, 0.85, 0.9, 0.07, 0.98, 0.99, 0.81, 0.9, 0.84, 0.09], "b": [0.98, 0.9, 0.16, 0.83, 0.96, 0.89, 0.89, 0.98, 0.83, 0.9]}
S = {"a": [0.8, 0.81, 0.81, 0.99, 0.96, 0.8, 0.99, 0.2, 0.85, 0.02], "b": [0.12, 0.98, 0.92, 0.85, 0.94, 1.0, 0.98, 0.96, 0.87, 0.92]}
TASKS = {"o1-s42": ["a", "b"], "o2-s42": ["b", "a"]}
B, SEED = 400, 0

# pinned: bootstrap_study(RUNS, TASKS, SINGLES, reference="ref", B=400, seed=0), 95 % percentile
REF_OP = (0.83225, [0.7567, 0.88503125])
DIFF_OP = (0.3275, [0.20940625, 0.46130625])
TOL = 1e-9  # counts are integers and the rng (PCG64) is the same everywhere; only summation order may differ


def _rows(tasks: list[str], final: dict, diagonal: dict) -> dict:
    return {0: {tasks[0]: np.asarray(diagonal[tasks[0]])}, 1: {t: np.asarray(final[t]) for t in tasks}}


RUNS = {"o1-s42": {"ref": _rows(TASKS["o1-s42"], R, D), "m": _rows(TASKS["o1-s42"], M, D)},
        "o2-s42": {"ref": _rows(TASKS["o2-s42"], R2, D), "m": _rows(TASKS["o2-s42"], M2, D)}}
SINGLES = {c: {t: np.asarray(v) for t, v in S.items()} for c in RUNS}


def _op(**kwargs) -> tuple[tuple, tuple]:
    out = bs.bootstrap_study(RUNS, TASKS, SINGLES, reference="ref", B=B, seed=SEED, **kwargs)
    ref, diff = out["methods"]["ref"]["op"], out["differences"]["m"]["op"]
    return (ref["point"], ref["ci"]), (diff["point"], diff["ci"])


def _matches(got: tuple, pinned: tuple) -> bool:
    return abs(got[0] - pinned[0]) < TOL and all(abs(a - b) < TOL for a, b in zip(got[1], pinned[1]))


def _far(got: tuple, pinned: tuple) -> bool:
    """At least one bound off by more than 1e-3: the pinned test would fail."""
    return max(abs(a - b) for a, b in zip(got[1], pinned[1])) > 1e-3


# -- (1) known answers, and what a changed design gives -------------------------------------------------

def test_known_answer_intervals_are_pinned_and_match_the_design():
    ref, diff = _op()
    assert _matches(ref, REF_OP), ref
    assert _matches(diff, DIFF_OP), diff
    # the same numbers from the design written out: one resample of each task's 10 examples per
    # replicate, keyed by (task, example id), shared by both cells and both methods
    counts = {t: bs.draw_counts(10, B, SEED, t) for t in "ab"}
    op = lambda final: sum(counts[t] @ np.asarray(final[t]) / 10 for t in "ab") / 2  # noqa: E731
    ref_reps = (op(R) + op(R2)) / 2
    diff_reps = (op(R) - op(M) + op(R2) - op(M2)) / 2
    assert np.allclose(np.percentile(ref_reps, [2.5, 97.5]), REF_OP[1], atol=TOL)
    assert np.allclose(np.percentile(diff_reps, [2.5, 97.5]), DIFF_OP[1], atol=TOL)


def test_pinned_values_fail_for_90_percent():
    ref, diff = _op(level=0.90)
    assert _far(ref, REF_OP) and _far(diff, DIFF_OP)


def test_pinned_values_fail_for_independent_draws_per_cell(monkeypatch):
    # each (cell, task) its own stratum: the old design, which counted the orders' examples thrice
    monkeypatch.setattr(bs, "_universe_key", lambda cell, task: f"{cell}/{task}")
    ref, diff = _op()
    assert _far(ref, REF_OP) and _far(diff, DIFF_OP)
    assert ref[0] == pytest.approx(REF_OP[0])  # the point does not depend on the draws


def test_pinned_values_fail_for_the_same_draws_for_every_task(monkeypatch):
    monkeypatch.setattr(bs, "_universe_key", lambda cell, task: "every task")
    ref, diff = _op()
    assert _far(ref, REF_OP) and _far(diff, DIFF_OP)


def test_pinned_values_fail_for_a_basic_interval():
    # the basic interval [2 theta - q_hi, 2 theta - q_lo] of the same replicates
    for point, (lo, hi) in (REF_OP, DIFF_OP):
        assert _far((point, [2 * point - hi, 2 * point - lo]), (point, [lo, hi]))


# -- (2) what is shared counts once --------------------------------------------------------------------

def test_a_copied_cell_adds_no_evidence():
    """Orders whose stages are copies (and one single shared by every cell) give the interval of one
    cell, not a narrower one; independent draws per cell would narrow it by about 1/sqrt(2)."""
    one = {"o1-s42": RUNS["o1-s42"]}
    two = {"o1-s42": RUNS["o1-s42"], "o2-s42": RUNS["o1-s42"]}
    tasks = {c: TASKS["o1-s42"] for c in two}
    a = bs.bootstrap_study(one, tasks, SINGLES, reference="ref", B=B)
    b = bs.bootstrap_study(two, tasks, SINGLES, reference="ref", B=B)
    for k in ("op", "bwt", "fwt"):
        assert b["methods"]["ref"][k]["ci"] == pytest.approx(a["methods"]["ref"][k]["ci"], abs=1e-12), k
        assert b["differences"]["m"][k]["ci"] == pytest.approx(a["differences"]["m"][k]["ci"], abs=1e-12), k


def test_a_copied_cell_narrows_the_interval_under_independent_draws(monkeypatch):
    monkeypatch.setattr(bs, "_universe_key", lambda cell, task: f"{cell}/{task}")
    two = {"o1-s42": RUNS["o1-s42"], "o2-s42": RUNS["o1-s42"]}
    tasks = {c: TASKS["o1-s42"] for c in two}
    width = lambda out: np.diff(out["methods"]["ref"]["op"]["ci"])[0]  # noqa: E731
    one = bs.bootstrap_study({"o1-s42": RUNS["o1-s42"]}, tasks, SINGLES, reference="ref", B=B)
    assert width(bs.bootstrap_study(two, tasks, SINGLES, reference="ref", B=B)) < 0.85 * width(one)


def test_draws_follow_example_ids_not_positions():
    """A cell that lists the same examples in another order gets the same draws for them."""
    perm = np.array([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    shuffled = {m: {r: {t: s[perm] for t, s in by_task.items()} for r, by_task in rows.items()}
                for m, rows in RUNS["o2-s42"].items()}
    ids = {"o1-s42": {t: list(range(10)) for t in "ab"}, "o2-s42": {t: perm.tolist() for t in "ab"}}
    singles = {"o1-s42": SINGLES["o1-s42"], "o2-s42": {t: s[perm] for t, s in SINGLES["o2-s42"].items()}}
    got = bs.bootstrap_study({"o1-s42": RUNS["o1-s42"], "o2-s42": shuffled}, TASKS, singles, ids=ids,
                             reference="ref", B=B, seed=SEED)
    assert _matches((got["methods"]["ref"]["op"]["point"], got["methods"]["ref"]["op"]["ci"]), REF_OP)
    assert got["differences"]["m"]["op"]["ci"] == pytest.approx(DIFF_OP[1], abs=TOL)
    # without the ids (positions taken as ids) the pairing is wrong and the interval changes
    wrong = bs.bootstrap_study({"o1-s42": RUNS["o1-s42"], "o2-s42": shuffled}, TASKS, singles, reference="ref", B=B)
    assert _far((0, wrong["differences"]["m"]["op"]["ci"]), DIFF_OP)


# -- (3) seeds: training noise beside test-set noise ----------------------------------------------------

def _seed_study(shift: float) -> dict:
    """Two seeds x one order; seed 2's reference run scores ``shift`` higher on every example."""
    base = RUNS["o1-s42"]
    shifted = {**base, "ref": {r: {t: np.clip(s + shift, 0, 1) for t, s in by_task.items()} for r, by_task in base["ref"].items()}}
    runs = {"o1-s1": base, "o1-s2": shifted}
    return bs.bootstrap_study(runs, {c: TASKS["o1-s42"] for c in runs}, {c: SINGLES["o1-s42"] for c in runs},
                              cell_seeds={"o1-s1": 1, "o1-s2": 2}, cell_orders={"o1-s1": 1, "o1-s2": 1},
                              reference="ref", B=B, seed=SEED)


def test_seed_spread_is_reported_and_widens_the_interval():
    same, apart = _seed_study(0.0), _seed_study(-0.3)
    assert same["resampled"] == ["examples", "seeds"]
    one = bs.bootstrap_study({"o1-s42": RUNS["o1-s42"]}, {"o1-s42": TASKS["o1-s42"]}, SINGLES, reference="ref", B=B)
    # identical seeds: the spread is 0 and the interval that of one run
    assert same["methods"]["ref"]["op"]["seed_sd"] == pytest.approx(0.0, abs=1e-12)
    assert same["methods"]["ref"]["op"]["ci"] == pytest.approx(one["methods"]["ref"]["op"]["ci"], abs=1e-12)
    s = apart["methods"]["ref"]["op"]
    op1, op2 = (apart["cells"][c]["methods"]["ref"]["op"] for c in ("o1-s1", "o1-s2"))
    assert s["seed_sd"] == pytest.approx(abs(op1 - op2) / np.sqrt(2))  # sd of two values, ddof 1
    assert s["test_se"] == pytest.approx(one["methods"]["ref"]["op"]["test_se"], rel=0.5)
    assert s["seeds"] == 2 and apart["methods"]["m"]["op"]["seed_sd"] == pytest.approx(0.0, abs=1e-12)
    # seeds resampled: the interval reaches toward both seeds' figures, wider than one seed's
    width = lambda x: x["ci"][1] - x["ci"][0]  # noqa: E731
    assert width(s) > 1.5 * width(one["methods"]["ref"]["op"])
    assert s["ci"][0] < min(op1, op2) + 0.05 and s["ci"][1] > max(op1, op2) - 0.05


# -- (4) verdicts: Holm over the primary family, equivalence by two one-sided tests ----------------------

def test_p_values_holm_and_verdict_rules():
    r = np.linspace(0.005, 0.015, 99)  # every replicate above 0 and inside +-0.02
    assert bs.p_values(r, 0.02) == pytest.approx((2 / 100, 1 / 100))
    assert bs.p_values(np.zeros(99), 0.02) == pytest.approx((1.0, 1 / 100))
    assert bs.p_values(r - 0.1, 0.02) == pytest.approx((2 / 100, 1.0))
    assert bs.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert bs.holm({"a": 0.2, "b": 0.6}) == pytest.approx({"a": 0.4, "b": 0.6})
    assert bs.verdict(+0.01, 0.01, 0.5) == "win" and bs.verdict(-0.01, 0.01, 0.5) == "loss"
    assert bs.verdict(0.0, 0.8, 0.01) == "equivalent" and bs.verdict(0.0, 0.8, 0.2) == "undecided"
    assert set(bs.VERDICTS) == {"win", "loss", "equivalent", "undecided"}


def _paired(n: int, ref_only: int, m_only: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 scores on n examples: both right on half, only the reference on ``ref_only``, only m on ``m_only``."""
    ref, m = np.zeros(n), np.zeros(n)
    ref[: n // 2] = m[: n // 2] = 1
    ref[n // 2: n // 2 + ref_only] = 1
    m[n // 2 + ref_only: n // 2 + ref_only + m_only] = 1
    return ref, m


def _joint(methods: dict[str, np.ndarray], ref: np.ndarray, **kwargs) -> dict:
    """One cell of joint runs (OP only) of one task."""
    runs = {"c": {"ref": {0: {"t": ref}}, **{m: {0: {"t": s}} for m, s in methods.items()}}}
    return bs.bootstrap_study(runs, {"c": ["t"]}, reference="ref", B=2000, seed=SEED, **kwargs)


def test_holm_turns_a_narrow_win_undecided():
    ref, m = _paired(200, 20, 8)  # +0.06, about 2.3 standard errors
    four = {f"m{i}": m for i in range(4)}
    alone = _joint(four, ref, primary=["m0"])["differences"]
    family = _joint(four, ref)["differences"]
    assert 0.0125 < alone["m0"]["op"]["p"] < 0.05 and alone["m0"]["op"]["verdict"] == "win"
    assert alone["m1"]["op"]["primary"] is False and alone["m1"]["op"]["verdict"] == "win"  # secondary, unadjusted
    d = family["m0"]["op"]
    assert d["primary"] and d["p_adj"] == pytest.approx(min(1, 4 * d["p"]))
    assert d["verdict"] == "undecided" and d["ci"][0] > 0  # the unadjusted interval excludes 0


def test_tie_is_equivalent_only_when_the_interval_is_narrow():
    small = _joint({"m": _paired(40, 3, 3)[1]}, _paired(40, 3, 3)[0])["differences"]["m"]["op"]
    large = _joint({"m": _paired(4000, 30, 30)[1]}, _paired(4000, 30, 30)[0])["differences"]["m"]["op"]
    assert small["point"] == large["point"] == 0.0
    assert small["ci"][0] < 0 < small["ci"][1] and small["verdict"] == "undecided"
    assert large["verdict"] == "equivalent" and large["equivalent"] is True
    wide = _joint({"m": _paired(4000, 30, 30)[1]}, _paired(4000, 30, 30)[0], margin=0.001)["differences"]["m"]["op"]
    assert wide["verdict"] == "undecided"  # the margin is configurable


# -- (5) the report and the CLI ----------------------------------------------------------------------------

@pytest.fixture
def study(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    tasks = ["a", "b"]
    for seed in (42, 43):
        write_single(tmp_path, seed, {t: (rng.random(30) < 0.6).astype(float).tolist() for t in tasks})
        for order in (1, 2):
            for method, q in (("aimmerging", 0.7), ("seq", 0.4), ("replay", 0.68)):
                final = {t: (rng.random(30) < q).astype(float).tolist() for t in tasks}
                diag = {t: (rng.random(30) < 0.7).astype(float).tolist() for t in tasks}
                write_run(tmp_path / f"o{order}-s{seed}" / method, tasks if order == 1 else tasks[::-1],
                          seq_rows(tasks if order == 1 else tasks[::-1], final, diag))
    return tmp_path


def test_report_groups_seeds_by_orders_and_states_the_family(study: Path):
    from aimmerging.bench.study_report import build_study_report, study_markdown

    report = build_study_report(study, B=300, primary=["replay"])
    assert report["comparisons"]["methods"] == ["replay"] and report["comparisons"]["adjustment"] == "holm"
    assert report["bootstrap"]["resampled"] == ["examples", "seeds"]
    assert report["differences"]["replay"]["op"]["primary"] and not report["differences"]["seq"]["op"]["primary"]
    assert report["methods"]["seq"]["op"]["seeds"] == 2 and report["methods"]["seq"]["op"]["seed_sd"] is not None
    md = study_markdown(report)
    assert "## Primary comparisons" in md and "`aimmerging` minus each of `replay` on OP (1 comparison;" in md
    assert "Holm-adjusted" in md and "| method | seed | order 1 | order 2 |" in md
    assert "| seq | 43 |" in md and "## Training noise beside test-set noise" in md
    assert " tie" not in md


def test_bench_report_cli_prints_the_primary_comparisons(study: Path, capsys):
    from aimmerging.cli.main import main

    assert main(["bench", "report", "--output-dir", str(study), "--primary", "replay,seq",
                 "--equivalence-margin", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "`aimmerging` minus each of `replay`, `seq` on OP (2 comparisons" in out
    assert "Equivalence margin ±0.05" in out and "Holm p" in out
    assert main(["bench", "report", "--output-dir", str(study), "--primary", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aimmerging: error: --primary: nope")
    assert main(["bench", "report", "--output-dir", str(study), "--equivalence-margin", "nan"]) == 2
    assert "--equivalence-margin" in capsys.readouterr().err


# -- (6) the test subset has its own seed ----------------------------------------------------------------

def _stream():
    from aimmerging.data.stream import TaskStream

    rows = lambda split, n: [{"input": f"{split} {i}", "output": "xyz"[i % 3], "id": f"{split}-{i}"} for i in range(n)]  # noqa: E731
    return TaskStream.from_examples({"t": {"train": rows("train", 60), "test": rows("test", 60)}})


def test_test_subset_depends_on_eval_seed_only():
    from aimmerging.data.sampling import balanced_subsample
    from aimmerging.data.stream import prepare_tasks

    def draw(seed, eval_seed=None):
        d = prepare_tasks(_stream(), seed=seed, eval_seed=eval_seed, train_cap=10, eval_cap=9,
                          metric_for=lambda t, tr: "exact_match")["t"]
        return [e.id for e in d.train], [e.id for e in d.test]

    (train1, test1), (train2, test2) = draw(1, 42), draw(2, 42)
    assert test1 == test2 and train1 != train2  # seeds vary training only
    assert draw(1, 7)[1] != test1 and draw(1, 7)[0] == train1
    # eval_seed 42 draws what every earlier version drew with --seed 42 (the recorded fixtures' subset)
    old = [e.id for e in balanced_subsample(_stream().split("t", "test"), 9, "42-test-t")]
    assert draw(42, 42)[1] == old == draw(42)[1]


def test_eval_seed_option_and_old_run_configs():
    from aimmerging.config import build_config, result_options
    from aimmerging.errors import ConfigError

    cfg = build_config({"method": "seq", "seed": 43})
    assert cfg.eval_seed == 42
    assert "eval_seed" in cfg.fingerprint()  # another test subset than a pre-eval_seed run of seed 43
    # a run of seed 42 computes what a run written before eval_seed existed computed: it resumes
    assert "eval_seed" not in build_config({"method": "seq"}).fingerprint()
    assert result_options({"seed": 42, "eval_seed": 42}) == {"seed": 42}
    with pytest.raises(ConfigError, match="eval_seed"):
        build_config({"method": "seq", "eval_seed": -1})


def test_ids_for_some_cells_only_are_refused():
    ids = {"o1-s42": {t: list(range(10)) for t in "ab"}}  # none for o2-s42: its positions would be other keys
    with pytest.raises(ValueError, match="no example ids for task"):
        bs.bootstrap_study(RUNS, TASKS, SINGLES, ids=ids, reference="ref", B=5)
