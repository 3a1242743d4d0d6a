"""The finished runs of a study as small JSON files that git carries between work sessions
(``aimmerging bench archive``, ``--archive``).

A study takes many more hours than a session, and a session starts from a clone without ``runs/``
(git ignores it). Each finished run is therefore written, as a record, to
``ARCHIVE/<cell>/<method>.json`` (``o1-s42/aimmerging.json``; the FWT reference:
``single-s42/single.json``) holding what the study report reads from its run directory and no
more (no adapter, no prompt or generated text)::

    format            "aimmerging-study-run/1"
    cell, method      where the run lies in the study directory
    config            method, order, seed, eval_seed, model, benchmark, protocol (its config.yaml)
    options           every option that decides what the run computes (``config.result_options``):
                      a study continued from the archive skips a run only when they match
    bench_methods     the methods its cell's bench.yaml listed (the report's order of methods)
    tasks, accuracy_matrix
    ids               {task: the test example ids, in order}
    stages            [{"stage", "name", "row", "scores": {task: per-example scores}}] of every
                      stage that fills a row of the matrix (a zero-shot stage has none)
    reference_scores  a ``single`` run's FWT reference (what a run's ``fwt_reference`` reads)
    trace             {"merges": trace.merge_summary, "selection": [[best_step, steps] per stage]}
    timing            results.json's timing (seconds per category), wall seconds per stage, peak RSS
    sha256            of the record without this field (canonical JSON): a damaged file is refused

The report reads every run as such a record, built from its run directory (:func:`run_record`) or
read from the archive (:func:`read_record`): the same dict either way, so the report built from
the archive alone equals the one built from the run directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import result_options
from ..errors import DataError, UserError
from ..io import atomic_write_text, json_safe, read_json, read_jsonl, read_yaml_mapping
from ..runs.layout import BENCH_FILE, ZERO_SHOT, RunLayout, is_run_dir, predictions_file, scores_file
from ..runs.results import read_results
from ..trace import merge_summary

FORMAT = "aimmerging-study-run/1"
CELL_DIR = re.compile(r"^o(\d+)-s(\d+)$")
SINGLE_DIR = re.compile(r"^single-s(\d+)$")
ESSENTIALS = ("method", "order", "seed", "eval_seed", "model", "benchmark", "protocol")
# what two records of the same run must agree on (timings, options and traces aside)
NUMBERS = ("tasks", "accuracy_matrix", "ids", "stages", "reference_scores")
REQUIRED = ("format", "cell", "method", "config", "bench_methods", "tasks", "accuracy_matrix", "ids", "stages",
            "trace", "sha256")


class StudyDataError(DataError, ValueError):
    """The finished runs of a study disagree (other test examples, other tasks) or are damaged."""


# -- a run directory -------------------------------------------------------------------------------

def run_status(run_dir: Path) -> tuple[Optional[dict], str]:
    """(results, "complete") for a finished run, else (results or None, why it is not used)."""
    if not run_dir.is_dir():
        return None, "not started"
    if not RunLayout(run_dir).results.is_file():
        return None, "started, no results yet"
    try:
        results = read_results(run_dir)
    except (OSError, ValueError) as e:
        return None, f"unreadable results.json ({e})"
    if not isinstance(results, dict):
        return None, "unreadable results.json (not an object)"
    if results.get("complete") is not True:
        done, total = len(results.get("stages") or []), len(results.get("tasks") or [])
        return results, f"incomplete ({done}/{total} stages)"
    return results, "complete"


def _stage_dirs(run_dir: Path) -> list[tuple[Path, dict]]:
    """(directory, record) of every finished stage that fills a row of the accuracy matrix."""
    stages = RunLayout(run_dir).stages
    out = []
    for d in sorted(stages.iterdir()) if stages.is_dir() else []:
        if not d.is_dir() or d.name.startswith((".", ZERO_SHOT)) or not scores_file(d).is_file():
            continue
        try:
            record = read_json(scores_file(d))
        except (OSError, ValueError) as e:
            raise StudyDataError(f"{scores_file(d)}: unreadable ({e})") from None
        if isinstance(record, dict) and record.get("row") is not None:
            out.append((d, record))
    return out


def _predictions(path: Path) -> tuple[list, list[float]]:
    if not path.is_file():
        raise StudyDataError(f"{path}: missing (the stage's scores.json names this task)")
    try:
        records = read_jsonl(path)
        ids, scores = [r["id"] for r in records], [float(r["score"]) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyDataError(f"{path}: unreadable predictions ({type(e).__name__}: {e})") from None
    if not all(np.isfinite(scores)):
        raise StudyDataError(f"{path}: a score is not a finite number")
    return ids, scores


def id_problem(task: str, where: Any, other: Any) -> str:
    return (f"{where}: scored other test examples of task {task!r} than {other} (ids differ or are in "
            "another order); the runs compared must score the same examples")


def run_record(run_dir: str | os.PathLike, cell: str, method: str, bench_methods: list[str] | None = None,
               results: Optional[dict] = None) -> dict:
    """The record of the finished run in ``run_dir`` (see the module's docstring; no sha256),
    checking that every stage scored the same examples of a task. StudyDataError when a file the
    record needs is damaged."""
    run_dir = Path(run_dir)
    if results is None:
        results, status = run_status(run_dir)
        if status != "complete":
            raise StudyDataError(f"{run_dir}: not a finished run ({status})")
    layout = RunLayout(run_dir)
    try:
        cfg = read_yaml_mapping(layout.config, "run config") if layout.config.is_file() else {}
        trace = read_jsonl(layout.trace) if layout.trace.is_file() else []
    except (UserError, OSError, ValueError) as e:
        raise StudyDataError(f"{run_dir}: unreadable config.yaml or trace.jsonl ({e})") from None
    ids: dict[str, list] = {}
    where: dict[str, Path] = {}
    stages = []
    for d, record in _stage_dirs(run_dir):
        scores = {}
        for task in record.get("scores") or {}:
            path = predictions_file(d, task)
            task_ids, scores[task] = _predictions(path)
            if task in ids and ids[task] != task_ids:
                raise StudyDataError(id_problem(task, path, where[task]))
            ids.setdefault(task, task_ids)
            where.setdefault(task, path)
        stages.append({"stage": d.name, "name": record.get("name"), "row": int(record["row"]), "scores": scores})
    run_stages = results.get("stages") or []
    record = {
        "format": FORMAT, "cell": cell, "method": method,
        "config": {k: cfg.get(k, results.get(k)) for k in ESSENTIALS},
        "options": result_options(cfg) if cfg else None,
        "bench_methods": list(bench_methods or []),
        "tasks": results.get("tasks"), "accuracy_matrix": results.get("accuracy_matrix"),
        "ids": ids, "stages": stages,
        "trace": {"merges": merge_summary(trace), "selection": [[s.get("best_step"), s.get("steps")] for s in run_stages]},
        "timing": {"categories": results.get("timing"), "stage_wall_s": [s.get("wall_s") for s in run_stages],
                   "peak_rss_mb": results.get("peak_rss_mb")},
    }
    if results.get("reference_scores") is not None:
        record["reference_scores"] = results["reference_scores"]
    return _plain(record)


def _plain(obj: Any) -> Any:
    """``obj`` as JSON gives it back (lists for tuples, str keys): a record built from a run
    directory is then the very dict its archive file reads as."""
    return json.loads(json.dumps(json_safe(obj), allow_nan=False))


def record_rows(record: dict) -> dict[int, dict[str, np.ndarray]]:
    """{row: {task: per-example scores}} of a record (what the bootstrap resamples)."""
    rows: dict[int, dict[str, np.ndarray]] = {}
    for stage in record["stages"]:
        for task, scores in stage["scores"].items():
            rows.setdefault(int(stage["row"]), {})[task] = np.array(scores, dtype=float)
    return rows


def single_scores(record: dict) -> dict[str, np.ndarray]:
    """{task: scores} of a ``single`` run: each stage's score on its own task."""
    return {s["name"]: np.array(s["scores"][s["name"]], dtype=float) for s in record["stages"]
            if s.get("name") in s["scores"]}


def differs(a: dict, b: dict) -> Optional[str]:
    """The first field of :data:`NUMBERS` in which two records of a run differ, None when they agree."""
    return next((k for k in NUMBERS if a.get(k) != b.get(k)), None)


# -- the archive -----------------------------------------------------------------------------------

def _canonical(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def sealed(record: dict) -> dict:
    """``record`` with the sha256 of its content."""
    return {**record, "sha256": hashlib.sha256(_canonical(record).encode("utf-8")).hexdigest()}


def record_path(archive_dir: str | os.PathLike, cell: str, method: str) -> Path:
    return Path(archive_dir) / cell / f"{method}.json"


def read_record(path: str | os.PathLike) -> dict:
    """The verified record of an archive file; StudyDataError (one line) when it is damaged."""
    path = Path(path)

    def damaged(why: str) -> StudyDataError:
        return StudyDataError(f"{path}: damaged archive file ({why}); restore it from git or delete it "
                              "to run that run again")

    try:
        record = read_json(path)
    except (OSError, ValueError) as e:
        raise damaged(f"unreadable: {type(e).__name__}") from None
    if not isinstance(record, dict):
        raise damaged("not a JSON object")
    absent = [k for k in REQUIRED if k not in record]
    if absent:
        raise damaged(f"no {', '.join(absent)}")
    if record["format"] != FORMAT:
        raise damaged(f"format {record['format']!r}, expected {FORMAT!r}")
    if sealed(record)["sha256"] != record["sha256"]:
        raise damaged("its sha256 does not match its content")
    if (record["cell"], f"{record['method']}.json") != (path.parent.name, path.name):
        raise damaged(f"it holds {record['cell']}/{record['method']}")
    return record


def read_archive(archive_dir: str | os.PathLike) -> dict[tuple[str, str], tuple[dict, Path]]:
    """{(cell, method): (record, path)} of every archive file (none when the directory does not
    exist yet); StudyDataError when one is damaged."""
    root = Path(archive_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: not a directory (--archive)")
    out = {}
    for path in sorted(root.glob("*/*.json")) if root.is_dir() else []:
        if CELL_DIR.match(path.parent.name) or SINGLE_DIR.match(path.parent.name):
            record = read_record(path)
            out[record["cell"], record["method"]] = (record, path)
    return out


def read_archives(archive: str | os.PathLike) -> dict[tuple[str, str], tuple[dict, Path]]:
    """:func:`read_archive` of one directory, or of several given comma-separated (a report over
    the runs of two studies, e.g. the probe study beside the main one); a run archived in two of
    them is refused (StudyDataError)."""
    out: dict[tuple[str, str], tuple[dict, Path]] = {}
    for part in str(archive).split(","):
        for key, entry in read_archive(part.strip()).items():
            if key in out:
                raise StudyDataError(f"{entry[1]} and {out[key][1]}: the same run ({key[0]}/{key[1]}) in two archives")
            out[key] = entry
    return out


def option_differences(record: dict, options: dict) -> list[str]:
    """The options in which an archived run differs from a run with the config ``options`` ([]:
    it computed what that run would). Only the options both know are compared: one added since the
    run was archived keeps the old behaviour by default. Nor is ``data_dir``: where a clone keeps
    the data (an absolute path) is not what it holds (the record's tasks and example ids are)."""
    mine, theirs = _plain(result_options(options)), record.get("options")
    if not isinstance(theirs, dict):
        return ["options (none recorded)"]
    return sorted(k for k in (set(mine) & set(theirs)) - {"data_dir"} if mine[k] != theirs[k])


def archive_run(record: dict, archive_dir: str | os.PathLike) -> str:
    """Write the record of a finished run; "written", or "unchanged" when the archive holds it
    already (its timings may differ: the archived one is kept). StudyDataError when the archive
    holds other numbers for that run (refused: a committed result is never overwritten)."""
    path = record_path(archive_dir, record["cell"], record["method"])
    if path.is_file():
        field = differs(read_record(path), record)
        if field is None:
            return "unchanged"
        raise StudyDataError(f"{path}: holds another result of {record['cell']}/{record['method']} "
                             f"({field} differs); delete the file to archive the run directory's")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(sealed(record), sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n")
    return "written"


def study_runs(study_dir: str | os.PathLike) -> tuple[list[tuple[Path, str, str, list[str]]], int]:
    """([(run directory, cell, method, bench methods)] of the finished runs of a study directory,
    the number of runs not finished yet)."""
    study = Path(study_dir)
    if not study.is_dir():
        raise UserError(f"{study}: not a directory")
    finished, unfinished = [], 0
    for cell_dir in sorted(d for d in study.iterdir() if d.is_dir()):
        if SINGLE_DIR.match(cell_dir.name):
            runs, methods = [cell_dir], []
        elif CELL_DIR.match(cell_dir.name):
            runs, methods = sorted(r for r in cell_dir.iterdir() if is_run_dir(r)), bench_methods(cell_dir)
        else:
            continue
        for run in runs:
            method = "single" if run is cell_dir else run.name
            if run_status(run)[1] == "complete":
                finished.append((run, cell_dir.name, method, methods))
            else:
                unfinished += 1
    return finished, unfinished


def archive_study(study_dir: str | os.PathLike, archive_dir: str | os.PathLike) -> dict:
    """Archive every finished run of a study directory (idempotent): {"written": [cell/method],
    "unchanged": [...], "unfinished": count}. Every record is built (and every problem refused)
    before anything is written."""
    finished, unfinished = study_runs(study_dir)
    records = [run_record(run, cell, method, methods) for run, cell, method, methods in finished]
    out: dict[str, Any] = {"written": [], "unchanged": [], "unfinished": unfinished}
    for record in records:
        out[archive_run(record, archive_dir)].append(f"{record['cell']}/{record['method']}")
    return out


def bench_methods(cell_dir: Path) -> list[str]:
    """The methods the cell's bench.yaml lists (its order is the report's), [] without one."""
    path = cell_dir / BENCH_FILE
    if not path.is_file():
        return []
    try:
        methods = read_yaml_mapping(path, "bench file").get("methods") or []
    except UserError:
        return []
    return [str(m) for m in methods] if isinstance(methods, list) else []
