"""The public Python API: aimmerging.run on in-memory streams and loaded models, the README's
example, user methods registered from outside the package, and the registries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aimmerging
from aimmerging.cli.main import main
from aimmerging.config import build_config
from aimmerging.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = dict(max_steps=4, batch_size=4, micro_batch_size=2, max_input_tokens=48, memory_ratio=50,
             initial_interval=2, initial_outer_steps=1, memory_batch_size=4, eval_batch_size=8, threads=1)


def _task(table: dict[str, str]) -> dict:
    rows = [{"input": f"Which code does the table give to {w}?", "output": c} for w, c in table.items()]
    return {"train": rows * 3, "test": rows}


STREAM = {"colours": _task({"cat": "red", "fir": "green", "oslo": "blue"}),
          "shapes": _task({"cat": "circle", "fir": "square", "oslo": "triangle"})}


def _python_api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_api_example(), "README.md (Python API)", "exec"), namespace)
    result = namespace["result"]
    assert result.tasks == list(namespace["stream"])
    T = len(result.tasks)
    assert len(result.accuracy_matrix) == T and all(len(r) == T for r in result.accuracy_matrix)
    assert set(result.metrics) == {"op", "bwt", "fwt"} and result.metrics["op"] is not None
    assert any(r["event"] == "merge" for r in result.trace)
    assert result.timings["inner"] > 0 and result.run_dir is None
    assert hasattr(result.model, "peft_config")
    assert list(tmp_path.iterdir()) == []  # output_dir=None: nothing on disk


def test_run_with_a_loaded_model_and_an_output_dir_behaves_like_the_cli(tmp_path):
    from aimmerging.models.loading import tiny_model

    out = tmp_path / "run"
    first = aimmerging.run(STREAM, method="aimmerging", model=tiny_model("tiny-causal"), output_dir=out, **SMALL)
    assert (out / "results.json").is_file() and (out / "trace.jsonl").is_file()
    assert json.loads((out / "results.json").read_text())["complete"] is True
    # the same call again resumes: nothing retrained, same results, the last adapter is loaded
    again = aimmerging.run(STREAM, method="aimmerging", model=tiny_model("tiny-causal"), output_dir=out, **SMALL)
    assert again.accuracy_matrix == first.accuracy_matrix and again.trace == first.trace
    saved = load_file(str(out / "stages" / "01-shapes" / "adapter" / "adapter_model.safetensors"))
    live = {n: p for n, p in again.model.named_parameters() if "lora_" in n}
    assert len(saved) == len(live)
    for name, t in saved.items():
        match = [p for n, p in live.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        assert match and torch.equal(match[0].detach(), t)


def test_in_memory_run_equals_the_run_directory_run(tmp_path):
    memory = aimmerging.run(STREAM, method="replay", model="tiny-seq2seq", **SMALL)
    disk = aimmerging.run(STREAM, method="replay", model="tiny-seq2seq", output_dir=tmp_path / "r", **SMALL)
    assert memory.accuracy_matrix == disk.accuracy_matrix and memory.trace == disk.trace
    for a, b in zip(memory.model.parameters(), disk.model.parameters()):
        assert torch.equal(a, b)


def test_datasets_and_task_stream_objects_are_accepted():
    datasets = pytest.importorskip("datasets")
    stream = {t: {s: datasets.Dataset.from_list(rows) for s, rows in splits.items()} for t, splits in STREAM.items()}
    result = aimmerging.run(stream, method="seq", model="tiny-causal", **SMALL)
    assert result.tasks == ["colours", "shapes"]
    result = aimmerging.run(aimmerging.TaskStream.synthetic(seed=1, tasks=["codes-a"]), model="tiny-causal",
                            **{**SMALL, "max_steps": 1}, train_cap=8, eval_cap=4)
    assert result.tasks == ["codes-a"]


@pytest.mark.parametrize("settings,message", [
    ({"max_stepz": 3}, "unknown option 'max_stepz' (did you mean max_steps?)"),
    ({"lr": "fast"}, "lr: expected float, got 'fast'"),
    ({"lr": float("nan")}, "lr: must be a finite number"),
    ({"data_dir": "x"}, "data_dir: the stream is given"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError) as e:
        aimmerging.run(STREAM, model="tiny-causal", **settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_method_and_bad_stream_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        aimmerging.run(STREAM, method="magic", model="tiny-causal")
    with pytest.raises(aimmerging.DataError, match="missing column 'output'"):
        aimmerging.run({"t": {"train": [{"input": "x"}], "test": [{"input": "x", "output": "y"}]}}, model="tiny-causal")


# -- a method from the user's own module ------------------------------------------------------------

def test_a_user_method_runs_through_the_api_and_the_cli(tmp_path, data_dir):
    import plugin_methods

    from helpers import tiny_args

    assert aimmerging.METHODS.get("pull-replay") is plugin_methods.PullReplay  # registered by the decorator
    before = plugin_methods.PullReplay.calls
    out = tmp_path / "cli"
    args = tiny_args(out, data_dir, method="plugin_methods:PullReplay", steps=3, pull_weight=5.0)
    assert main(args) == 0
    assert plugin_methods.PullReplay.calls > before  # the loss hook ran
    cli = load_file(str(out / "stages" / "02-agnews" / "adapter" / "adapter_model.safetensors"))
    # the same method and settings through the API (by class) give the same adapter
    stream = aimmerging.TaskStream.from_olora(data_dir, ["dbpedia", "amazon", "agnews"])
    settings = dict(train_cap=24, eval_cap=8, max_steps=3, batch_size=4, micro_batch_size=2, max_input_tokens=64,
                    memory_batch_size=4, memory_ratio=20, eval_batch_size=8, threads=1, pull_weight=5.0)
    api = aimmerging.run(stream, method=plugin_methods.PullReplay, model="tiny-causal", output_dir=tmp_path / "api",
                         **settings)
    saved = load_file(str(tmp_path / "api" / "stages" / "02-agnews" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(cli[k], saved[k]) for k in cli)
    assert api.results["method"] == "pull-replay"
    # and the pull changed what replay alone computes
    plain = tmp_path / "replay"
    assert main(tiny_args(plain, data_dir, method="replay", steps=3)) == 0
    replay = load_file(str(plain / "stages" / "02-agnews" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(cli[k], replay[k]) for k in cli)
    # a setting of the user method is a flag in --help once the method is named
    from aimmerging.cli.main import build_parser

    helptext = build_parser(["run", "--method", "plugin_methods:PullReplay"])._subparsers._group_actions[0].choices["run"].format_help()
    assert "--pull-weight" in helptext


def test_import_path_errors_are_one_line(tmp_path, data_dir, capsys):
    from helpers import tiny_args

    assert main(tiny_args(tmp_path / "o", data_dir, method="no_such_module:Thing")) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err
    assert main(tiny_args(tmp_path / "o", data_dir, method="plugin_methods:PullSettings")) == 2
    assert "is not a subclass of aimmerging.methods.Method" in capsys.readouterr().err


# -- registries ----------------------------------------------------------------------------------------

def test_every_builtin_method_module_registers_itself():
    import pkgutil

    import aimmerging.methods as methods

    names = methods.builtin_names()
    modules = [m.name for m in pkgutil.iter_modules(methods.__path__) if m.name != "base"]
    assert {"seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end"} <= set(names)
    for module in modules:  # each file registers at least one method
        assert any(methods.METHODS.get(n).__module__ == f"aimmerging.methods.{module}" for n in names), module
    for n in names:
        cls = methods.METHODS.get(n)
        assert cls.name == n and cls.summary and cls.paper


def test_readme_method_table_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in README.read_text(encoding="utf-8")


def test_cli_choices_read_the_registries(capsys):
    from aimmerging.cli.main import build_parser

    run = build_parser(["run"])._subparsers._group_actions[0].choices["run"]
    helptext = run.format_help()
    for name in aimmerging.METHODS.names():
        assert name in helptext
    from aimmerging.controller import SCHEDULES
    from aimmerging.fusion import FUSION_RULES

    assert "{" + ",".join(SCHEDULES) + "}" in helptext and "{" + ",".join(FUSION_RULES) + "}" in helptext


def test_a_schedule_and_a_fusion_rule_can_be_added_from_outside():
    from aimmerging.controller import ControllerConfig, MergeController, Schedule, Trigger
    from aimmerging.fusion import FUSION_RULES, fuse_in_place

    class EveryThird(Schedule):
        needs_history_loss = False

        def on_step(self, c, step, h):
            return Trigger("fixed", None, 1.0, 0.0) if step % 3 == 0 else None

    aimmerging.SCHEDULES.register("every-third", EveryThird)
    FUSION_RULES.register("keep-new", lambda base, deltas, weights: base + deltas[0])
    try:
        c = MergeController(ControllerConfig(schedule="every-third"))
        assert [s for s in range(1, 10) if c.observe(s, None, 1.0)] == [3, 6, 9]
        assert "every-third" in build_config({"method": "aimmerging", "schedule": "every-third"}).settings.schedule
        p, a, k = [torch.tensor([3.0])], [torch.tensor([1.0])], [torch.tensor([2.0])]
        fuse_in_place(p, a, k, 0.5, 0.5, "keep-new")
        assert p[0].item() == 2.0
        assert build_config({"method": "aimmerging", "fusion": "keep-new"}).settings.fusion == "keep-new"
    finally:
        aimmerging.SCHEDULES.unregister("every-third")
        FUSION_RULES.unregister("keep-new")
    p = [torch.tensor([3.0])]
    fuse_in_place(p, a, k, 0.6, 0.4)  # the reference's weighted sum: 1 + 0.6 * 1 + 0.4 * 1
    assert p[0].item() == pytest.approx(2.0)


def test_importing_aimmerging_is_cheap():
    import subprocess
    import sys

    code = "import sys, aimmerging; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


