"""Reliability of file I/O and loading: file modes, strict JSON, user-supplied files (trace, YAML,
task files) and model directories turned into one-line errors, no hub retries without network."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

import pytest

from aimmerging import io as io_mod
from aimmerging.data.olora import read_task, task_file, validate_dir
from aimmerging.errors import ConfigError, DataError, UserError
from aimmerging.io import atomic_write, atomic_write_json, atomic_write_jsonl, atomic_write_text
from aimmerging.trace import read_trace


def json_safe(obj):
    return io_mod.json_safe(obj)


def read_yaml_mapping(*args):
    return io_mod.read_yaml_mapping(*args)


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one is restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line_error(exc_type, call, *args) -> str:
    with pytest.raises(exc_type) as e:
        call(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# -- 1. file modes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_mode_follows_umask(tmp_path, umask, mask, expected):
    umask(mask)
    path = atomic_write(tmp_path / "results.json", lambda f: f.write(b"{}\n"))
    assert mode(path) == expected
    assert path.read_bytes() == b"{}\n"


@pytest.mark.parametrize("writer", [lambda p: atomic_write_text(p, "x"), lambda p: atomic_write_json(p, {"a": 1}),
                                    lambda p: atomic_write_jsonl(p, [{"a": 1}])])
def test_every_writer_makes_team_readable_files(tmp_path, umask, writer):
    umask(0o022)
    path = tmp_path / "sub" / "out"
    writer(path)
    assert mode(path) == 0o644


def test_rewriting_an_owner_only_file_gives_the_umask_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "config.yaml"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert mode(path) == 0o644 and path.read_text() == "new"


def test_atomic_write_leaves_the_umask_and_no_temp_file(tmp_path, umask):
    umask(0o027)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert os.umask(0o027) == 0o027
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_current_umask_without_proc(monkeypatch, umask):
    """Where /proc is missing, the umask is read by setting and restoring it."""
    umask(0o037)

    def no_proc(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(io_mod, "open", no_proc, raising=False)
    assert io_mod.current_umask() == 0o037
    assert os.umask(0o037) == 0o037


def test_current_umask_reads_proc(umask):
    umask(0o026)
    assert io_mod.current_umask() == 0o026


# -- 2. strict JSON --------------------------------------------------------------------------------

def test_json_safe_replaces_only_non_finite_floats():
    obj = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "ok": 1.5, "int": 3, "bool": True,
           "none": None, "str": "NaN", "list": [1.0, math.nan, {"deep": [math.inf, 0.0]}], "tuple": (math.nan, 2)}
    safe = json_safe(obj)
    assert safe == {"nan": None, "inf": None, "-inf": None, "ok": 1.5, "int": 3, "bool": True, "none": None,
                    "str": "NaN", "list": [1.0, None, {"deep": [None, 0.0]}], "tuple": (None, 2)}
    assert type(safe["int"]) is int and type(safe["bool"]) is bool
    assert math.isnan(obj["nan"]) and math.isinf(obj["list"][2]["deep"][0])  # the input is not changed


def test_json_safe_handles_float_subclasses():
    np = pytest.importorskip("numpy")

    class Score(float):
        pass

    assert json_safe([np.float64("nan"), np.float64(2.0), Score(math.inf), Score(1.0)]) == [None, 2.0, None, 1.0]


def test_atomic_write_json_is_strict_json(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"acc": math.nan, "bwt": [math.inf, -math.inf, 0.25]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert strict_loads(text) == {"acc": None, "bwt": [None, None, 0.25]}


def test_atomic_write_jsonl_is_strict_json(tmp_path):
    path = tmp_path / "trace.jsonl"
    atomic_write_jsonl(path, [{"loss": math.nan}, {"loss": 1.0, "grad": [math.inf]}])
    assert [strict_loads(line) for line in path.read_text().splitlines()] == [{"loss": None},
                                                                            {"loss": 1.0, "grad": [None]}]


def test_atomic_write_json_refuses_a_nan_that_slips_through(tmp_path, monkeypatch):
    """allow_nan=False: should json_safe ever miss a value, the write fails instead of writing NaN."""
    monkeypatch.setattr(io_mod, "json_safe", lambda obj: obj)
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "r.json", {"x": math.nan})
    with pytest.raises(ValueError):
        atomic_write_jsonl(tmp_path / "r.jsonl", [{"x": math.inf}])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.jsonl").exists()


# -- 3. read_trace ---------------------------------------------------------------------------------

def test_read_trace_binary_file(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\x80\x81\xff\x00")
    msg = one_line_error(UserError, read_trace, path)
    assert str(path) in msg and "UTF-8" in msg


def test_read_trace_directory(tmp_path):
    msg = one_line_error(UserError, read_trace, tmp_path)
    assert str(tmp_path) in msg and "cannot read" in msg


def test_read_trace_missing_file(tmp_path):
    msg = one_line_error(UserError, read_trace, tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in msg and "cannot read" in msg


def test_read_trace_line_that_is_a_list(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"event": "step"}\n[1, 2]\n')
    msg = one_line_error(UserError, read_trace, path)
    assert str(path) in msg and "line 2" in msg and "expected a JSON object" in msg


def test_read_trace_reads_objects(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"a": 1}\n\n{"b": null}\n')
    assert read_trace(path) == [{"a": 1}, {"b": None}]


# -- 4. read_yaml_mapping --------------------------------------------------------------------------

def test_read_yaml_mapping_reads_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: replay\ntasks: [a, b]\n")
    assert read_yaml_mapping(path) == {"method": "replay", "tasks": ["a", "b"]}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_read_yaml_mapping_empty_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert read_yaml_mapping(path) == {}


def test_read_yaml_mapping_missing_file(tmp_path):
    msg = one_line_error(ConfigError, read_yaml_mapping, tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in msg and "cannot read config file" in msg


def test_read_yaml_mapping_directory(tmp_path):
    msg = one_line_error(ConfigError, read_yaml_mapping, tmp_path)
    assert str(tmp_path) in msg and "cannot read" in msg


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_read_yaml_mapping_unreadable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    path.chmod(0)
    try:
        msg = one_line_error(ConfigError, read_yaml_mapping, path)
    finally:
        path.chmod(0o644)
    assert str(path) in msg and "Permission denied" in msg


def test_read_yaml_mapping_binary_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x80\x81\xff\x00")
    msg = one_line_error(ConfigError, read_yaml_mapping, path)
    assert str(path) in msg and "UTF-8" in msg


def test_read_yaml_mapping_control_characters(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: \x00\x01\n")  # valid UTF-8, but not YAML
    msg = one_line_error(ConfigError, read_yaml_mapping, path)
    assert str(path) in msg and "invalid YAML" in msg


@pytest.mark.parametrize("text, where", [("a: 1\n b: 2\nc: [\n", "line"), ("a: [1, 2\n", "line"),
                                         ("key: value: other\n", "line 1"), ("a: !!python/name:os.system\n", "")])
def test_read_yaml_mapping_syntax_error(tmp_path, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    msg = one_line_error(ConfigError, read_yaml_mapping, path, "bench file")
    assert str(path) in msg and "invalid YAML in bench file" in msg and where in msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_read_yaml_mapping_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    msg = one_line_error(ConfigError, read_yaml_mapping, path)
    assert str(path) in msg and "mapping" in msg and kind in msg


# -- 5. O-LoRA task files --------------------------------------------------------------------------

def write_task(root: Path, split: str, name: str, n: int = 2) -> Path:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps([{"id": f"x{i}", "input": f"q {i}\nAnswer:", "output": "yes"} for i in range(n)]))
    return path


def test_read_task_refuses_both_spellings(tmp_path):
    plain = write_task(tmp_path, "test", "t.json")
    t5 = write_task(tmp_path, "test", "t_T5.json")
    msg = one_line_error(DataError, read_task, tmp_path, "test", "t")
    assert str(plain) in msg and str(t5) in msg


def test_task_file_single_spelling_still_found(tmp_path):
    t5 = write_task(tmp_path, "train", "t_T5.json")
    assert task_file(tmp_path, "train", "t") == t5
    assert task_file(tmp_path, "dev", "t") is None


def test_validate_dir_reports_both_spellings(tmp_path):
    write_task(tmp_path, "train", "t.json")
    write_task(tmp_path, "dev", "t.json")
    plain = write_task(tmp_path, "test", "t.json")
    t5 = write_task(tmp_path, "test", "t_T5.json")
    report, errors, warnings = validate_dir(tmp_path)
    assert len(errors) == 1 and str(plain) in errors[0] and str(t5) in errors[0]
    assert "\n" not in errors[0]
    assert set(report["t"]) == {"train", "dev"} and warnings == []


def test_validate_dir_missing_test_is_an_error(tmp_path):
    write_task(tmp_path, "train", "t.json")
    write_task(tmp_path, "dev", "t.json")
    _, errors, warnings = validate_dir(tmp_path)
    assert errors == ["t: no test file"]
    assert warnings == []


def test_validate_dir_missing_dev_stays_a_warning(tmp_path):
    write_task(tmp_path, "train", "t.json")
    write_task(tmp_path, "test", "t.json")
    _, errors, warnings = validate_dir(tmp_path)
    assert errors == [] and warnings == ["t: no dev file"]


def test_validate_dir_task_only_in_dev(tmp_path):
    write_task(tmp_path, "train", "a.json")
    write_task(tmp_path, "test", "a.json")
    write_task(tmp_path, "dev", "b.json")
    _, errors, _ = validate_dir(tmp_path)
    assert errors == ["b: no train file", "b: no test file"]


# -- 6. models/loading.py --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    from aimmerging.models.loading import tiny_model

    d = tmp_path_factory.mktemp("tiny-causal")
    model, tok = tiny_model("tiny-causal")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_saved_tiny_model_loads(saved_tiny):
    from aimmerging.models.loading import load_base_model

    model, tok, kind = load_base_model(str(saved_tiny))
    assert kind == "causal" and tok.pad_token_id is not None


@pytest.mark.parametrize("corrupt", ["half", "empty", "garbage"])
def test_corrupt_weights_are_a_user_error(saved_tiny, tmp_path, corrupt):
    from aimmerging.models.loading import load_base_model

    d = copy_dir(saved_tiny, tmp_path / "model")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"half": data[: len(data) // 2], "empty": b"", "garbage": b"\xff" * 64}[corrupt])
    msg = one_line_error(UserError, load_base_model, str(d))
    assert str(d) in msg and "corrupt or truncated" in msg


def test_corrupt_config_is_a_user_error(saved_tiny, tmp_path):
    from aimmerging.models.loading import load_base_model

    d = copy_dir(saved_tiny, tmp_path / "model")
    (d / "config.json").write_bytes(b"\x80\x81\xff\x00")
    msg = one_line_error(UserError, load_base_model, str(d))
    assert str(d / "config.json") in msg


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    from aimmerging.models import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_unreachable", lambda: pytest.fail("probed the hub while offline"))
    start = time.monotonic()
    msg = one_line_error(UserError, loading.load_base_model, "no-such-org/no-such-model")
    assert time.monotonic() - start < 5
    assert "'no-such-org/no-such-model'" in msg
    assert "not a local directory" in msg and "not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE" in msg


@pytest.fixture
def hub_not_offline(monkeypatch):
    """HF_HUB_OFFLINE unset, as for a user; every test using this also stubs the network probe."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_unknown_hub_id_with_hub_unreachable_fails_fast(monkeypatch, hub_not_offline):
    from aimmerging.models import loading

    monkeypatch.setattr(loading, "hub_unreachable", lambda: "hub unreachable: huggingface.co:443: no route")
    start = time.monotonic()
    msg = one_line_error(UserError, loading.load_base_model, "foo")
    assert time.monotonic() - start < 5
    assert "not in the local Hugging Face cache" in msg and "hub unreachable" in msg


def test_hub_offline_is_read_at_call_time(monkeypatch, hub_not_offline):
    from aimmerging.models.loading import hub_offline

    assert not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


def test_hub_unreachable_reports_the_connection_error(monkeypatch):
    import socket

    from aimmerging.models import loading

    calls = []

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise OSError(111, "Connection refused")

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    reason = loading.hub_unreachable()
    assert reason is not None and "hub unreachable" in reason and "Connection refused" in reason
    assert calls and calls[0][1] == loading.HUB_PROBE_TIMEOUT_S


def test_hub_reachable_when_a_connection_opens(monkeypatch):
    import socket

    from aimmerging.models import loading

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Conn())
    assert loading.hub_unreachable() is None
