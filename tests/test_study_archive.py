"""A study carried across work sessions by its archive (bench/study_archive.py): each finished run
as one small JSON file, the report built from the archive alone equal to the one built from the
run directories, an archived run never run again, damaged input refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from aimmerging.bench.study_archive import StudyDataError, archive_study, read_record, record_path
from aimmerging.bench.study_report import build_study_report
from aimmerging.cli.main import main
from aimmerging.errors import ConfigError
from test_study_stats import seq_rows, write_run, write_single

METHODS = ["seq", "aimmerging", "replay"]


def _numbers(report: dict) -> dict:
    """A report less where it was read from: what must not depend on it."""
    return json.loads(json.dumps({k: v for k, v in report.items() if k not in ("study_dir", "archive")}))


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Two seeds x two orders of seq, aimmerging and replay, a single per seed, a bench.yaml per
    cell (the report's order of methods)."""
    rng = np.random.default_rng(5)
    tasks = ["a", "b"]
    out = tmp_path / "study"
    for seed in (42, 43):
        write_single(out, seed, {t: (rng.random(20) < 0.6).astype(float).tolist() for t in tasks})
        for order in (1, 2):
            cell = out / f"o{order}-s{seed}"
            for method, q in (("aimmerging", 0.7), ("seq", 0.4), ("replay", 0.65)):
                final = {t: (rng.random(20) < q).astype(float).tolist() for t in tasks}
                diag = {t: (rng.random(20) < 0.7).astype(float).tolist() for t in tasks}
                order_tasks = tasks if order == 1 else tasks[::-1]
                write_run(cell / method, order_tasks, seq_rows(order_tasks, final, diag))
            (cell / "bench.yaml").write_text(yaml.safe_dump({"methods": METHODS}))
    return out


def test_report_from_the_archive_alone_equals_the_report_from_the_runs(study: Path, tmp_path: Path):
    archive = tmp_path / "archive"
    done = archive_study(study, archive)
    assert len(done["written"]) == 2 * 2 * 3 + 2 and done["unchanged"] == [] and done["unfinished"] == 0
    assert sorted(p.relative_to(archive).as_posix() for p in archive.glob("single-s*/*.json")) == \
        ["single-s42/single.json", "single-s43/single.json"]
    record = read_record(record_path(archive, "o2-s43", "replay"))
    assert record["tasks"] == ["b", "a"] and record["bench_methods"] == METHODS and len(record["ids"]["a"]) == 20
    assert "prompt" not in record_path(archive, "o2-s43", "replay").read_text()  # compact: scores, not texts

    from_runs = build_study_report(study, B=300)
    alone = build_study_report(tmp_path / "fresh-clone" / "study", B=300, archive=archive)
    both = build_study_report(study, B=300, archive=archive)
    assert _numbers(alone) == _numbers(from_runs) and not alone["missing"]
    assert list(alone["methods"]) == METHODS  # bench.yaml's order
    assert alone["methods"]["seq"]["fwt"]["cells"] == 4  # the single references, archived too
    assert _numbers(both) == _numbers(from_runs) and both["archive"]["conflicts"] == []

    # idempotent: nothing rewritten; an unfinished run is not archived
    write_run(study / "o1-s42" / "ewc", ["a", "b"], {0: {"a": [1.0] * 20}}, complete=False)
    before = {p: p.read_bytes() for p in archive.rglob("*.json")}
    again = archive_study(study, archive)
    assert again["written"] == [] and len(again["unchanged"]) == 14 and again["unfinished"] == 1
    assert {p: p.read_bytes() for p in archive.rglob("*.json")} == before

    # the CLI, from the archive alone: the report is written where the study directory would be
    fresh = tmp_path / "clone2" / "runs" / "study"
    assert main(["bench", "report", "--output-dir", str(fresh), "--archive", str(archive)]) == 0
    written = json.loads((fresh / "report.json").read_text())
    assert _numbers(written) == _numbers(build_study_report(tmp_path / "fresh-clone" / "study", archive=archive))


def test_a_run_directory_that_disagrees_with_its_archive_wins_and_is_named(study: Path, tmp_path: Path, capsys):
    archive = tmp_path / "archive"
    archive_study(study, archive)
    shutil.rmtree(study / "o1-s42" / "replay")
    write_run(study / "o1-s42" / "replay", ["a", "b"], seq_rows(["a", "b"], {"a": [1.0] * 20, "b": [1.0] * 20},
                                                                {"a": [1.0] * 20, "b": [1.0] * 20}))
    report = build_study_report(study, B=200, archive=archive)
    assert report["cells"]["o1-s42"]["methods"]["replay"]["op"] == 1.0  # the run directory's
    (line,) = report["archive"]["conflicts"]
    assert line.startswith("o1-s42/replay: the run directory and ") and "(stages)" in line
    assert main(["bench", "report", "--output-dir", str(study), "--archive", str(archive)]) == 0
    assert f"Archive disagreement: {line}" in capsys.readouterr().out
    # archiving it refuses to overwrite the committed result, in one line
    with pytest.raises(StudyDataError, match="holds another result of o1-s42/replay"):
        archive_study(study, archive)


def test_damaged_input_is_refused_in_one_line(study: Path, tmp_path: Path, capsys):
    archive = tmp_path / "archive"
    archive_study(study, archive)
    path = record_path(archive, "o2-s42", "seq")
    path.write_text(path.read_text().replace('"row":1', '"row":0', 1))  # a hand edit: the sha256 no longer matches
    assert main(["bench", "report", "--output-dir", str(study), "--archive", str(archive)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged archive file (its sha256 does not match its content)" in err[0]
    path.write_text("{not json")
    with pytest.raises(StudyDataError, match="damaged archive file"):
        build_study_report(study, archive=archive)
    path.unlink()
    (study / "o1-s43" / "seq" / "stages" / "01-b" / "predictions" / "b.jsonl").unlink()  # a damaged finished run
    assert main(["bench", "archive", "--output-dir", str(study), "--to", str(archive)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.jsonl: missing" in err[0]
    assert not path.exists()  # nothing written when any run is damaged
    assert main(["bench", "archive", "--output-dir", str(study)]) == 2
    assert main(["bench", "--archive", str(archive), "--output-dir", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--to DIR" in err[0] and "--archive: only for a study" in err[1]


# -- sessions: a real tiny study continued from its archive in a fresh directory ---------------------------------

def test_a_new_session_continues_the_study_from_the_archive(tmp_path: Path, monkeypatch):
    from aimmerging.bench import runner, study as study_mod
    from test_bench import STUDY_RUN

    config = tmp_path / "study.yaml"
    run = {**STUDY_RUN, "tasks": ["dbpedia", "amazon"]}
    config.write_text(yaml.safe_dump({"name": "tiny study", "run": run, "methods": ["seq"]}))
    archive = tmp_path / "repo" / "benchmarks" / "results" / "study"
    first = tmp_path / "session1" / "runs" / "study"
    study_mod.run_study(config, first, orders=[1], isolate=False, progress=False, archive=archive)
    assert {p.relative_to(archive).as_posix() for p in archive.rglob("*.json")} == \
        {"single-s42/single.json", "o1-s42/seq.json"}  # archived as each finished

    # the next session: a fresh clone, no runs/; o1 and the FWT reference are archived, o2 is new
    ran = []
    real = runner._run_module
    monkeypatch.setattr(runner, "_run_module", lambda args, *a: (ran.append(Path(args[1]).stem), real(args, *a)))
    second = tmp_path / "session2" / "runs" / "study"
    report = study_mod.run_study(config, second, orders=[1, 2], isolate=False, progress=False, archive=archive)
    assert ran == ["seq"] and not (second / "single-s42").exists() and not (second / "o1-s42" / "seq").exists()
    # what the runs of a cell read as their fwt_reference: the archived single's reference scores
    from aimmerging.runs.results import load_reference

    single = json.loads((first / "single-s42" / "results.json").read_text())["reference_scores"]
    assert load_reference(second / "configs" / "single-s42-reference.json", ["amazon", "dbpedia"]) == \
        [single["amazon"], single["dbpedia"]]
    assert record_path(archive, "o2-s42", "seq").is_file()
    assert report["methods"]["seq"]["op"]["cells"] == 2 and report["methods"]["seq"]["fwt"]["cells"] == 2
    alone = build_study_report(tmp_path / "session3" / "runs" / "study", archive=archive)
    assert _numbers(alone) == _numbers(report)

    # an archive of another study (other options) is refused before anything runs
    config.write_text(yaml.safe_dump({"name": "tiny study", "run": {**run, "lr": 1e-3}, "methods": ["seq"]}))
    with pytest.raises(ConfigError, match=r"archived with other options \(lr\)"):
        study_mod.run_study(config, tmp_path / "other", orders=[1], isolate=False, progress=False, archive=archive)
    assert ran == ["seq"]


def test_a_variant_study_is_reported_beside_the_main_archive(study: Path, tmp_path: Path, capsys):
    """The probe study (benchmarks/probe_study.py): variants' runs archived apart, reported with the
    main study's runs of the same cells (``--archive A,B``) and compared from the variant
    (``--reference``); a run in both archives, or an unknown reference, is refused in one line."""
    main_archive, variant_archive = tmp_path / "main-archive", tmp_path / "variant-archive"
    archive_study(study, main_archive)
    rng = np.random.default_rng(9)
    variants = tmp_path / "probe-study"
    for seed in (42, 43):
        for order in (1, 2):
            order_tasks = ["a", "b"] if order == 1 else ["b", "a"]
            final = {t: (rng.random(20) < 0.8).astype(float).tolist() for t in order_tasks}
            write_run(variants / f"o{order}-s{seed}" / "aimmerging-clean", order_tasks,
                      seq_rows(order_tasks, final, final))
    archive_study(variants, variant_archive)
    both = f"{main_archive},{variant_archive}"
    report = build_study_report(tmp_path / "clone" / "runs" / "probe-study", B=200, archive=both,
                                reference="aimmerging-clean", primary=["aimmerging", "replay"])
    assert report["reference"] == "aimmerging-clean"
    assert set(report["methods"]) == {*METHODS, "aimmerging-clean"}
    assert set(report["differences"]) == {"seq", "aimmerging", "replay"}
    assert report["differences"]["aimmerging"]["op"]["cells"] == 4
    out = tmp_path / "clone" / "report"
    assert main(["bench", "report", "--output-dir", str(out), "--archive", both, "--reference", "aimmerging-clean",
                 "--primary", "aimmerging"]) == 0
    assert "--reference aimmerging-clean" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(["bench", "report", "--output-dir", str(out), "--archive", both, "--reference", "nosuch"]) == 2
    assert capsys.readouterr().err.startswith("aimmerging: error: --reference: nosuch is not a method of the study")
    shutil.copytree(variant_archive / "o1-s42", main_archive / "o1-s42", dirs_exist_ok=True)
    assert main(["bench", "report", "--output-dir", str(out), "--archive", both]) == 2
    assert "the same run (o1-s42/aimmerging-clean) in two archives" in capsys.readouterr().err
