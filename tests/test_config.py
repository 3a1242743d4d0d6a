"""Run configuration (config.py): coercion, precedence, validation, controller mapping, fingerprint."""

from __future__ import annotations

import pytest

from aimmerging.config import FIELDS, NON_RESULT_FIELDS, RunConfig, build_config, load_yaml
from aimmerging.settings import coerce
from aimmerging.controller import ControllerConfig
from aimmerging.errors import ConfigError


def config_error(yaml_values=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(yaml_values, overrides)
    return str(e.value)


# -- building and precedence -------------------------------------------------------------------------

def test_defaults():
    c = build_config()
    assert (c.method, c.lr, c.batch_size, c.micro_batch_size, c.grad_accum, c.tasks, c.seed) == \
        ("seq", 3e-4, 32, 8, 4, None, 42)


def test_yaml_values_are_coerced():
    c = build_config({"lr": "1e-3", "max_steps": 12, "epochs": "3", "adaptive": "false", "tasks": "a,b",
                      "lora_dropout": 0, "metric": {"t1": "rougeL"}, "method": "aimmerging"})
    assert c.lr == 1e-3 and isinstance(c.lr, float)
    assert c.max_steps == 12 and c.epochs == 3
    assert c.settings.adaptive is False
    assert c.tasks == ["a", "b"]
    assert c.lora_dropout == 0.0 and isinstance(c.lora_dropout, float)
    assert c.metric == {"t1": "rougeL"}


def test_flags_win_over_yaml():
    c = build_config({"lr": 0.1, "seed": 1, "method": "replay"}, {"lr": "0.2", "seed": "7"})
    assert (c.lr, c.seed, c.method) == (0.2, 7, "replay")


@pytest.mark.parametrize("key", ["lora-r", "lora_r"])
def test_dash_and_underscore_keys(key):
    assert build_config({key: 4}).lora_r == 4
    assert build_config(None, {key: "16"}).lora_r == 16


def test_dash_key_in_flags_overrides_underscore_key_in_yaml():
    assert build_config({"micro_batch_size": 4}, {"micro-batch-size": "2"}).micro_batch_size == 2


def test_unknown_key_suggests_close_names():
    msg = config_error({"lora-rank": 4})
    assert "unknown option 'lora-rank'" in msg
    assert "did you mean" in msg and "lora_r" in msg


def test_unknown_flag_names_its_origin():
    assert config_error(None, {"epoch_count": 3}).startswith("flags: unknown option 'epoch_count'")
    with pytest.raises(ConfigError, match=r"^my.yaml: unknown option 'bogus'"):
        build_config({"bogus": 1}, source="my.yaml")


@pytest.mark.parametrize("typo, intended", [("memory_ration", "memory_ratio"), ("initial-intervall", "initial_interval"),
                                            ("lora_dropuot", "lora_dropout")])
def test_unknown_key_suggestion_names_the_intended_option(typo, intended):
    msg = config_error({typo: 1})
    assert "did you mean" in msg
    assert intended in msg.split("did you mean", 1)[1]


# KNOWN BUG (config.build_config): the hint only lists the first 3 fields sharing the key's first
# 4 characters. A typo within the first 4 characters gets no hint at all ('mehtod', 'ecpohs'), and
# a close name further down the field list is cut off: 'max_new_token' is answered with
# "max_input_tokens, max_target_tokens, max_steps", not max_new_tokens.
@pytest.mark.parametrize("typo, intended", [("mehtod", "method"), ("ecpohs", "epochs"),
                                            ("max_new_token", "max_new_tokens")])
def test_unknown_key_with_typo_suggests_the_intended_name(typo, intended):
    msg = config_error({typo: 1})
    assert "did you mean" in msg
    assert intended in msg.split("did you mean", 1)[1]


@pytest.mark.parametrize("field, value, kind", [
    ("lr", "abc", "float"),
    ("lr", True, "float"),
    ("max_steps", 1.5, "int"),
    ("max_steps", "1.5", "int"),
    ("lora_r", True, "int"),
    ("epochs", "ten", "int"),
    ("adaptive", "maybe", "bool"),
    ("adaptive", 2, "bool"),
    ("model", ["a"], "str"),
    ("tasks", 5, "comma-separated list"),
    ("tasks", ["a", 1], "comma-separated list"),
    ("metric", "t1", "TASK=VALUE"),
    ("metric", 3, "TASK=VALUE"),
])
def test_ill_typed_values_name_the_field(field, value, kind):
    msg = config_error({field: value})
    assert msg.startswith(f"{field}: expected ")
    assert kind in msg


def test_required_value_cannot_be_none():
    assert config_error({"lr": None}) == "lr: a value is required"


def test_optional_value_may_be_none():
    assert build_config({"max_steps": None}).max_steps is None


def test_integral_float_is_accepted_for_int():
    assert build_config({"max_steps": 2.0}).max_steps == 2


@pytest.mark.parametrize("value", [["dbpedia", "amazon", "agnews"], "dbpedia,amazon,agnews",
                                   " dbpedia , amazon,agnews ,", "dbpedia,,amazon,agnews"])
def test_tasks_as_list_or_comma_string(value):
    assert build_config({"tasks": value}).tasks == ["dbpedia", "amazon", "agnews"]


def test_empty_task_list_is_none():
    assert build_config({"tasks": ""}).tasks is None
    assert build_config({"tasks": []}).tasks is None


def test_metric_pairs_string():
    assert build_config(None, {"metric": "a=exact_match, b = rougeL"}).metric == {"a": "exact_match", "b": "rougeL"}


def test_metric_value_validated():
    msg = config_error({"metric": "a=bleu"})
    assert "metric" in msg and "bleu" in msg


@pytest.mark.parametrize("value, expected", [("true", True), ("Yes", True), ("1", True), ("false", False),
                                             ("NO", False), ("0", False), (True, True), (False, False)])
def test_bool_values(value, expected):
    assert coerce(RunConfig, "progress", value) is expected


# -- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("dtype", "int8"), ("prompt_format", "xml"), ("eval_scope", "some"), ("mixed_precision", "fp8"),
    ("probe_mode", "test"), ("outer_optimizer", "sgd"), ("fusion", "average"),
])
def test_choices_validated(field, value):
    for method in ("seq", "aimmerging"):  # another method's option is checked too, then ignored
        msg = config_error({field: value, "method": method})
        assert f"{field}: '{value}' is not one of" in msg, msg


@pytest.mark.parametrize("field, value", [("schedule", "weekly"), ("signal_normalizer", "steps")])
def test_controller_choices_validated(field, value):
    assert value in config_error({field: value, "method": "aimmerging"})


def test_unknown_method_is_one_line():
    assert config_error({"method": "ewc-typo"}).startswith("unknown method 'ewc-typo'")


@pytest.mark.parametrize("method", ["seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end"])
def test_all_methods_accepted(method):
    assert build_config({"method": method}).method == method


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_all_dtypes_accepted(dtype):
    assert build_config({"dtype": dtype}).dtype == dtype


def test_batch_size_must_be_multiple_of_micro_batch_size():
    msg = config_error({"batch_size": 30, "micro_batch_size": 8})
    assert "batch_size (30)" in msg and "micro_batch_size (8)" in msg
    assert build_config({"batch_size": 32, "micro_batch_size": 16}).grad_accum == 2


@pytest.mark.parametrize("field, value", [
    ("order", 0), ("epochs", 0), ("batch_size", -8), ("micro_batch_size", 0), ("lora_r", 0),
    ("max_steps", 0), ("train_cap", -1), ("lr", 0.0), ("lora_dropout", 1.0), ("memory_ratio", 0.0),
    ("memory_ratio", 101.0), ("max_target_tokens", 1), ("replay_ratio", -0.1), ("warmup_steps", -1),
])
def test_out_of_range_values_name_the_field(field, value):
    assert field in config_error({field: value})


@pytest.mark.parametrize("values", [
    {"initial_interval": 1},  # below min_interval 2
    {"min_interval": 10, "max_interval": 5},
    {"trend_window": 1},
    {"threshold_factor": 0.0},
])
def test_invalid_merging_options(values):
    assert config_error({**values, "method": "aimmerging"}).startswith("aimmerging settings: ")
    assert config_error(values).startswith("MergingSettings options: ")  # checked even for another method


# -- controller config of the merging methods -----------------------------------------------------

def _controller(values: dict) -> ControllerConfig:
    c = build_config(values)
    return c.settings.controller_config(c.method_class.forced_schedule)


def test_controller_config_maps_merge_fixed_and_merge_end():
    assert _controller({"method": "merge-fixed"}).schedule == "fixed"
    assert _controller({"method": "merge-end"}).schedule == "end"
    assert _controller({"method": "merge-fixed", "schedule": "paper"}).schedule == "fixed"


def test_controller_config_uses_schedule_for_aimmerging():
    assert _controller({"method": "aimmerging"}).schedule == "reference"
    assert _controller({"method": "aimmerging", "schedule": "paper"}).schedule == "paper"
    assert _controller({"method": "aimmerging", "schedule": "fixed"}).schedule == "fixed"  # = merge-fixed


def test_controller_config_copies_merging_fields():
    c = _controller({"method": "aimmerging", "initial_interval": 4, "initial_outer_steps": 2, "min_interval": 3,
                     "max_interval": 64, "cold_start": 1, "threshold_factor": 1.5, "adaptive": False,
                     "signal_normalizer": "elapsed", "end_outer_steps": 9, "fixed_w_in": 0.7, "fixed_w_out": 0.3})
    assert c == ControllerConfig(
        schedule="reference", initial_interval=4, initial_outer_steps=2, min_interval=3, max_interval=64,
        cold_start=1, threshold_factor=1.5, adaptive=False, signal_normalizer="elapsed", end_outer_steps=9,
        fixed_w_in=0.7, fixed_w_out=0.3)


def test_default_controller_config_is_reference_default():
    assert _controller({"method": "aimmerging"}) == ControllerConfig()


def test_method_settings_are_declared_once_and_saved_flat():
    from dataclasses import fields

    c = build_config({"method": "aimmerging", "initial_interval": 4})
    saved = c.to_dict()
    for f in fields(ControllerConfig):  # the controller's options are the method's options
        assert f.name in saved and f.metadata["help"]
    assert saved["initial_interval"] == 4 and build_config(saved) == c
    assert "replay_ratio" not in saved and "initial_interval" not in build_config({"replay_ratio": 1}).to_dict()


# -- fingerprint ------------------------------------------------------------------------------------

def test_fingerprint_excludes_non_result_fields():
    # fsdp: sharding the base changes where the weights live, not what a run computes (to float
    # summation order, as the number of processes): a run may be resumed with or without it
    assert NON_RESULT_FIELDS == {"output_dir", "overwrite", "progress", "threads", "fwt_reference", "trust_remote_code",
                                 "fsdp"}
    fp = build_config().fingerprint()
    # eval_seed equal to the seed is left out: such a run computes what runs from before the option did
    assert set(fp) == set(FIELDS) - NON_RESULT_FIELDS - {"eval_seed"}
    assert set(build_config({"eval_seed": 7}).fingerprint()) == set(FIELDS) - NON_RESULT_FIELDS
    a = build_config({"output_dir": "runs/a", "overwrite": False, "progress": True, "threads": 1})
    b = build_config({"output_dir": "runs/b", "overwrite": True, "progress": False, "threads": 4,
                      "fwt_reference": "runs/single", "fsdp": True})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint_hash() == b.fingerprint_hash()


@pytest.mark.parametrize("values", [{"lr": 1e-3}, {"seed": 1}, {"method": "replay"}, {"tasks": "a,b"},
                                    {"mixed_precision": "bf16"}])
def test_fingerprint_changes_with_result_fields(values):
    assert build_config(values).fingerprint_hash() != build_config().fingerprint_hash()


def test_fingerprint_hash_is_stable():
    h = build_config({"lr": 1e-3}).fingerprint_hash()
    assert h == build_config(None, {"lr": "0.001"}).fingerprint_hash()
    assert len(h) == 16 and int(h, 16) >= 0


def test_run_dir_default_and_explicit():
    assert str(build_config({"method": "replay"}).run_dir) == "runs/replay"
    assert str(build_config({"output_dir": "out/x"}).run_dir) == "out/x"


def test_config_round_trips_through_to_dict():
    c = build_config({"method": "aimmerging", "tasks": "a,b", "metric": "a=rougeL", "max_steps": 5})
    assert build_config(c.to_dict()) == c
    assert isinstance(c, RunConfig)


# -- YAML files ------------------------------------------------------------------------------------

def test_load_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: aimmerging\nlora-r: 4\ntasks: [a, b]\n", encoding="utf-8")
    c = build_config(load_yaml(path), {"lora_r": "2"})
    assert (c.method, c.lora_r, c.tasks) == ("aimmerging", 2, ["a", "b"])


def test_load_yaml_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n", encoding="utf-8")
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    assert load_yaml(tmp_path / "empty.yaml") == {}
