"""Bad input ends in one line on stderr naming what is wrong, exit status 2, and no run output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aimmerging.cli.main import main

GOOD = [{"id": f"t_{i}", "input": f"Is {i} even? Option: yes, no.\nAnswer:", "output": "yes" if i % 2 == 0 else "no"}
        for i in range(12)]


def make_data(root: Path, tasks=("alpha", "beta"), broken: dict[str, str] | None = None) -> Path:
    """A small O-LoRA data dir; ``broken`` maps 'split/task' to raw file content."""
    for split in ("train", "dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for task in tasks:
            records = [{**r, "id": f"{task}_{split}_{i}"} for i, r in enumerate(GOOD)]
            (root / split / f"{task}.json").write_text(json.dumps(records))
    for key, content in (broken or {}).items():
        (root / f"{key}.json").write_text(content)
    return root


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[aimmerging]")]
    return rc, err


def base_args(data: Path, out: Path, tasks: str = "alpha,beta") -> list[str]:
    return ["run", "--model", "tiny-causal", "--tasks", tasks, "--data-dir", str(data), "--max-steps", "1",
            "--batch-size", "2", "--micro-batch-size", "2", "--output-dir", str(out), "--no-progress"]


BROKEN_FILES = {
    "malformed JSON": ('[{"id": "a", "input": "x", "output": "y"', "malformed JSON"),
    "not an array": ('{"id": "a"}', "expected a JSON array"),
    "empty task file": ("[]", "empty"),
    "missing field": ('[{"id": "a", "input": "x"}]', "missing field 'output'"),
    "non-string field": ('[{"id": "a", "input": "x", "output": 3}]', "field 'output' is not a string"),
    "empty input": ('[{"id": "a", "input": "  ", "output": "y"}]', "field 'input' is empty"),
    "duplicate ids": ('[{"id": "a", "input": "x", "output": "y"}, {"id": "a", "input": "z", "output": "y"}]',
                      "duplicate id 'a'"),
    "item not an object": ('["just a string"]', "expected an object"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_bad_task_file(tmp_path, capsys, case):
    content, expected = BROKEN_FILES[case]
    data = make_data(tmp_path / "data", broken={"train/beta": content})
    out = tmp_path / "out"
    rc, err = run_cli(base_args(data, out), capsys)
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("aimmerging: error: ") and "beta.json" in err[0] and expected in err[0]
    assert not out.exists()  # nothing written before the data was checked


@pytest.mark.parametrize("flags, expected", [
    (["--tasks", "alpha,nope"], "no train file for task 'nope'"),
    (["--benchmark", "no-such-bench", "--tasks", ""], "unknown benchmark 'no-such-bench'"),
    (["--model", "/no/such/model"], "unknown model '/no/such/model'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--lr", "fast"], "lr: expected float, got 'fast'"),
    (["--batch-size", "3"], "batch_size (3) must be a multiple of micro_batch_size (2)"),
    (["--metric", "alpha=bleu"], "metric: 'bleu' for task 'alpha'"),
    (["--metric", "gamma=rougeL"], "override for task(s) not in the stream: gamma"),
    (["--fwt-reference", "/no/such/results.json"], "fwt_reference: cannot read"),
])
def test_bad_option(tmp_path, capsys, flags, expected):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    rc, err = run_cli(base_args(data, out) + flags, capsys)
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert not (out / "results.json").exists()


def test_missing_data_dir_option(tmp_path, capsys):
    rc, err = run_cli(["run", "--tasks", "alpha", "--model", "tiny-causal", "--output-dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "data_dir: required" in err[0]


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --no-such-flag" in err[0]


def test_bad_yaml_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: [unclosed\n")
    rc, err = run_cli(["run", "--config", str(cfg)], capsys)
    assert rc == 2 and len(err) == 1 and "invalid YAML" in err[0] and "c.yaml" in err[0]
    cfg.write_text("learning_rate: 0.1\n")
    rc, err = run_cli(["run", "--config", str(cfg)], capsys)
    assert rc == 2 and len(err) == 1 and "unknown option 'learning_rate'" in err[0]


def test_yaml_config_with_flags_winning(tmp_path, data_dir, capsys):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"method: replay\nmodel: tiny-causal\ntasks: [dbpedia, amazon]\ndata-dir: {data_dir}\n"
                   f"train_cap: 8\neval_cap: 4\nmax_steps: 1\nbatch_size: 2\nmicro_batch_size: 2\nlr: 0.5\n"
                   f"output_dir: {out}\nprogress: false\n")
    assert main(["run", "--config", str(cfg), "--lr", "0.002"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.002" in saved and "method: replay" in saved and "- amazon" in saved


def test_data_validate_reports_every_problem(tmp_path, capsys):
    data = make_data(tmp_path / "data", tasks=("alpha", "beta", "gamma"), broken={
        "train/beta": "[]", "test/gamma": '[{"id": "a", "input": "x", "output": 1}]', "dev/alpha": '[{"id": 1'})
    (data / "dev" / "gamma.json").unlink()
    assert main(["data", "validate", str(data)]) == 1
    out = capsys.readouterr().out
    assert "beta.json: the task file is empty" in out
    assert "gamma.json: item 0: field 'output' is not a string" in out
    assert "alpha.json: malformed JSON" in out
    assert "warning: gamma: no dev file" in out
    assert "3 tasks, 3 problems, 1 warnings" in out


def test_data_validate_on_the_benchmark_folder(data_dir, capsys):
    assert main(["data", "validate", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "dbpedia        train    1000" in out
    assert "15 tasks, 0 problems" in out
    assert "mnli: dev labels never seen in train: '-'" in out
