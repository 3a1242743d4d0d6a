"""``--protocol reference``, item by item: the preset, model selection and its validation loss,
the single runs' held-out split, truncation, generation length and precision, SuperNI scoring,
and dev examples that are test examples."""

from __future__ import annotations

import json

import pytest
import torch

from aimmerging.config import build_config
from aimmerging.data.formatting import Formatter
from aimmerging.data.olora import Example
from aimmerging.data.stream import TaskStream, prepare_tasks, split_holdout
from aimmerging.evaluation.generate import generate_predictions, half_precision_dtype
from aimmerging.evaluation.scoring import choose_metric, use_scores
from aimmerging.models.loading import byte_tokenizer
from aimmerging.protocol import REFERENCE, preset, single_overrides
from aimmerging.runs.process import make_accelerator
from aimmerging.runs.results import build_results, load_reference
from aimmerging.runs.runner import build_engine

from helpers import stage_adapters, tiny_args


# -- the preset -------------------------------------------------------------------------------------------------
def test_reference_preset_sets_each_item_and_default_sets_none():
    cfg = build_config(overrides={"protocol": "reference"})
    assert cfg.select_best_every == 40 and cfg.val_per_task == 25
    assert cfg.val_loss == "batch-mean" and cfg.val_batch_size == 8
    assert cfg.truncation == "right" and cfg.max_input_tokens == 1024 and cfg.truncate_eval_prompts is False
    assert cfg.max_new_tokens == 128 and cfg.max_target_tokens == 128
    assert cfg.eval_precision == "half" and cfg.scoring == "reference"
    assert cfg.validation == "dev"  # a continual run validates on the seen tasks' dev examples
    default = build_config()
    assert default.protocol == "default" and default.select_best_every is None and default.truncation == "middle"
    assert default.max_new_tokens is None and default.eval_precision == "train" and default.scoring == "default"
    assert preset("default", "seq") == {}


def test_explicit_options_win_over_the_preset():
    cfg = build_config({"protocol": "reference", "select_best_every": 10}, {"max_input_tokens": 200})
    assert cfg.select_best_every == 10 and cfg.max_input_tokens == 200 and cfg.val_loss == "batch-mean"


def test_reference_single_runs_hold_out_ten_percent_with_twice_the_batch():
    assert build_config(overrides={"protocol": "reference", "method": "single"}).validation == "train-holdout"
    run = build_config(overrides={"protocol": "reference", "batch_size": 4, "micro_batch_size": 4,
                                  "max_steps": 96}).to_dict()
    assert single_overrides(run) == {"batch_size": 8, "micro_batch_size": 8, "max_steps": 48}
    assert single_overrides(build_config().to_dict()) == {}


def test_unknown_protocol_is_one_clear_error():
    from aimmerging.errors import ConfigError

    with pytest.raises(ConfigError, match="protocol"):
        build_config(overrides={"protocol": "paper"})


# -- the FWT split ------------------------------------------------------------------------------------------------
def _examples(task: str, n: int, outputs=("a", "b")) -> list[Example]:
    return [Example(f"{task}-{i}", f"question {task} {i}? Answer:", outputs[i % len(outputs)], task) for i in range(n)]


def test_holdout_is_int_ten_percent_disjoint_and_seeded():
    ex = _examples("t", 105)
    kept, held = split_holdout(ex, 0.1, "s")
    assert len(held) == 10 and len(kept) == 95 and not set(map(id, kept)) & set(map(id, held))
    assert split_holdout(ex, 0.1, "s") == (kept, held)
    rows = [{"id": e.id, "input": e.input, "output": e.output} for e in ex]
    stream = TaskStream.from_examples({"t": {"train": rows, "test": rows[:4]}})
    data = prepare_tasks(stream, seed=42, holdout=0.1, metric_for=lambda t, tr: "exact_match")["t"]
    assert len(data.train) == 95 and len(data.holdout) == 10
    assert {e.id for e in data.train}.isdisjoint(e.id for e in data.holdout)


# -- dev examples that are test examples ----------------------------------------------------------------------------
def test_dev_examples_that_are_scored_are_never_used_for_selection(data_dir):
    tasks = ["dbpedia", "yahoo", "cb", "copa", "rte", "amazon"]
    stream = TaskStream.from_olora(data_dir, tasks)
    data = prepare_tasks(stream, seed=42, train_cap=100, need_dev=True, metric_for=lambda t, tr: "exact_match")
    for task in tasks[:5]:  # copies of test (dbpedia, yahoo) or the test examples reordered (cb, copa, rte)
        d = data[task]
        assert d.dev_source == "unused-train", task
        scored = {(e.input, e.output) for e in stream.split(task, "test")}
        assert not any((e.input, e.output) in scored for e in d.dev)
        assert {e.id for e in d.dev}.isdisjoint(e.id for e in d.train)
    # amazon's dev file shares 161 of its 500 examples with the test file: those are dropped
    amazon = data["amazon"]
    scored = {(e.input, e.output) for e in stream.split("amazon", "test")}
    assert amazon.dev_source == "dev-minus-overlap" and len(amazon.dev) == 500 - 161
    assert not any((e.input, e.output) in scored for e in amazon.dev)
    kept = prepare_tasks(stream, seed=42, train_cap=100, need_dev=True, dev_test_overlap="keep",
                         metric_for=lambda t, tr: "exact_match")
    assert {t for t, d in kept.items() if d.dev_source == "dev-overlap-kept"} == set(tasks)


def test_a_task_without_unused_training_examples_holds_some_out(data_dir):
    stream = TaskStream.from_olora(data_dir, ["cb"])
    data = prepare_tasks(stream, seed=42, need_dev=True, metric_for=lambda t, tr: "exact_match")["cb"]
    assert data.dev_source == "train-holdout" and len(data.dev) == 25 and len(data.train) == 225


# -- truncation -------------------------------------------------------------------------------------------------
LONG = Example("x", "Instruction. " + "word " * 60 + "\nAnswer:", "yes", "x")


def test_right_truncation_in_training_and_whole_prompts_at_test():
    tok = byte_tokenizer()
    full = tok(LONG.input, add_special_tokens=True)["input_ids"]
    fmt = Formatter(tok, "causal", max_input_tokens=40, truncation="right", truncate_eval_prompts=False)
    assert fmt.prompt_ids(LONG.input) == full[:40]
    assert fmt.encode(LONG).input_ids[:-fmt.encode(LONG).answer_len] == full[:40]
    assert fmt.eval_prompt_ids(LONG.input) == full
    assert fmt.collate_prompts([LONG])["input_ids"].shape[1] == len(full)
    middle = Formatter(tok, "causal", max_input_tokens=40)  # the default: the end (Answer:) is kept
    assert middle.prompt_ids(LONG.input)[-3:] == full[-3:] and middle.eval_prompt_ids(LONG.input) == middle.prompt_ids(LONG.input)
    seq2seq = Formatter(tok, "seq2seq", max_input_tokens=40, truncation="right")
    assert seq2seq.encode(LONG).input_ids == full[:40]


# -- validation loss, selection, generation length and precision on a tiny model ------------------------------------
@pytest.fixture(scope="module")
def engine():
    cfg = build_config(overrides=dict(model="tiny-causal", max_input_tokens=48, micro_batch_size=4, threads=1))
    return build_engine(cfg, make_accelerator("no")).engine


def test_batch_mean_loss_is_hf_trainers_eval_loss(engine):
    ex = [Example(f"v{i}", f"q {i}? Answer:", "x" * (1 + 3 * i), "t") for i in range(5)]
    per_batch = []
    for chunk in (ex[:2], ex[2:4], ex[4:]):  # batches of 2, in order; the last one is smaller
        per_batch.append((engine.mean_loss(chunk, train_mode=False, chunk=len(chunk)), len(chunk)))
    hf = sum(loss * n for loss, n in per_batch) / len(ex)
    assert engine.batch_mean_loss(ex, 2) == pytest.approx(hf, rel=1e-6)
    token_mean = engine.mean_loss(ex, train_mode=False)
    assert abs(token_mean - hf) > 1e-4  # the answers differ in length: the two losses differ


def test_probe_in_passes_of_similar_lengths_has_the_same_loss(engine):
    """The probe's memory batch goes in micro-batches sorted by length (less padding): the loss of
    any chunking and order is the same token-weighted mean."""
    from types import SimpleNamespace

    from aimmerging.training.loop import StageView

    ex = [Example(f"m{i}", f"memory {i} {'z' * (7 * (i % 3))}? Answer:", "y" * (1 + i), "t") for i in range(6)]
    cfg = SimpleNamespace(micro_batch_size=2, memory_batch_size=6, seed=0, grad_accum=1)
    stage = SimpleNamespace(index=0, name="t", train_tasks=["t"])
    view = StageView(engine, cfg, stage, memory=None, max_steps=1, optimizer=None, timers=None, emit=None)
    reference = engine.mean_loss(ex, train_mode=False, chunk=6)
    assert view.mean_loss(ex, train_mode=False) == pytest.approx(reference, rel=1e-5)
    assert engine.mean_loss(ex, train_mode=False, chunk=2) == pytest.approx(reference, rel=1e-5)


def test_generation_runs_to_the_requested_length_under_half_precision(engine):
    assert half_precision_dtype("cpu") == torch.bfloat16 and half_precision_dtype("cuda") == torch.float16
    model = engine.peft_model
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        ex = [Example("g", "q? Answer:", "a", "t")]
        fmt = engine.formatter
        text = generate_predictions(model, fmt, ex, batch_size=1, max_new_tokens=9, progress=False,
                                    autocast_dtype=torch.bfloat16)[0]
    finally:
        model.generation_config.eos_token_id = eos
    assert isinstance(text, str)


def test_reference_run_selects_the_best_checkpoint_and_scores_it(tmp_path, data_dir):
    """A run under the preset (selection every 2 steps here, so the test stays short): every
    candidate step is validated, the select_best record names the lowest validation loss, and the
    stage's saved adapter is that checkpoint's (the last step's differs)."""
    from aimmerging.cli.main import main
    from aimmerging.io import read_jsonl

    out = tmp_path / "run"
    args = tiny_args(out, data_dir, method="seq", steps=6, protocol="reference", select_best_every=2,
                     max_input_tokens=64, max_new_tokens=4, lr=0.05)
    assert main(args) == 0
    trace = read_jsonl(out / "trace.jsonl")
    for task in ("dbpedia", "amazon", "agnews"):
        vals = {r["step"]: r["val_loss"] for r in trace if r.get("task") == task and r.get("val_loss") is not None}
        assert sorted(vals) == [2, 4, 6]
        best = [r for r in trace if r.get("task") == task and r["event"] == "select_best"]
        assert len(best) == 1 and best[0]["val_loss"] == min(vals.values()) and vals[best[0]["step"]] == min(vals.values())
    cfg = json.loads(json.dumps(build_config(overrides={"protocol": "reference"}).to_dict()))
    assert cfg["truncate_eval_prompts"] is False


def test_task_end_merge_acts_on_the_selected_adapter(tmp_path, data_dir):
    """merge-end under model selection: the checkpoint is restored first and the end-of-task merge
    is applied to it (it used to run before the restore, which threw it away and made merge-end
    compute exactly what seq computes). The last step (5) is never a candidate here."""
    from aimmerging.cli.main import main
    from aimmerging.io import read_jsonl

    adapters = {}
    for method in ("seq", "merge-end"):
        out = tmp_path / method
        assert main(tiny_args(out, data_dir, method=method, steps=5, protocol="reference", select_best_every=2,
                              max_input_tokens=64, max_new_tokens=4, lr=0.05)) == 0
        adapters[method] = stage_adapters(out)["01-amazon"]
        if method == "merge-end":
            events = [r["event"] for r in read_jsonl(out / "trace.jsonl")
                      if r.get("task_index") == 1 and r["event"] in ("select_best", "merge")]
            assert events == ["select_best", "merge"]
    assert adapters["seq"].keys() == adapters["merge-end"].keys()
    assert any(not torch.equal(adapters["seq"][k], adapters["merge-end"][k]) for k in adapters["seq"])


def test_single_under_the_reference_protocol_validates_on_its_holdout(tmp_path, data_dir):
    from aimmerging.cli.main import main
    from aimmerging.io import read_jsonl

    out = tmp_path / "single"
    assert main(tiny_args(out, data_dir, method="single", steps=4, protocol="reference", select_best_every=2,
                          max_new_tokens=4)) == 0
    trace = read_jsonl(out / "trace.jsonl")
    assert sum(r["event"] == "select_best" for r in trace) == 3
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["reference_scores"]


# -- SuperNI scoring ---------------------------------------------------------------------------------------------
def test_task363_pos_neg_count_as_p_n_in_op_only():
    rows = [{"prediction": "pos", "gold": "P"}, {"prediction": "NEG", "gold": "N"}, {"prediction": "P", "gold": "P"},
            {"prediction": "neg", "gold": "P"}]
    assert choose_metric("task363", ["P", "N"]) == "exact_match"
    assert use_scores("task363", "exact_match", rows, "reference") == {"op": 0.75}
    assert use_scores("task363", "exact_match", rows, "default") == {}


def test_task1687_is_scored_by_rouge_l_in_fwt():
    rows = [{"prediction": "p is the answer", "gold": "p"}, {"prediction": "n", "gold": "n"}]
    out = use_scores("task1687", "exact_match", rows, "reference")
    assert set(out) == {"fwt"} and 0.5 < out["fwt"] < 1.0  # ROUGE-L gives partial credit, exact match 0.5


def test_results_use_the_variant_matrices_for_op_and_fwt(tmp_path):
    tasks = ["task363", "task1687"]
    rows = {0: {"task363": 0.5}, 1: {"task363": 0.5, "task1687": 0.6}}
    stages = [{"index": 0, "row": 0}, {"index": 1, "row": 1, "use_scores": {"op": {"task363": 0.75}}}]
    cfg = {"method": "seq", "model": "m", "benchmark": "superni", "order": 1}
    r = build_results(cfg_dict=cfg, tasks=tasks, rows=rows, task_metrics={}, reference=[0.4, 0.7],
                      zero_shot=None, stages=stages, complete=True, single=False)
    assert r["metrics"]["op"] == pytest.approx((0.75 + 0.6) / 2)  # OP reads the mapped task363 score
    assert r["metrics"]["bwt"] == pytest.approx(0.0)  # BWT reads the plain scores
    single_stages = [{"index": 0, "row": 0}, {"index": 1, "row": 1, "use_scores": {"fwt": {"task1687": 0.9}}}]
    single = build_results(cfg_dict={**cfg, "method": "single"}, tasks=tasks, rows={0: {"task363": 0.5}, 1: {"task1687": 0.6}},
                           task_metrics={}, reference=None, zero_shot=None, stages=single_stages, complete=True, single=True)
    assert single["reference_scores"] == {"task363": 0.5, "task1687": 0.9}  # FWT's reference: ROUGE-L for task1687
    (tmp_path / "results.json").write_text(json.dumps(single))
    assert load_reference(tmp_path, tasks) == [0.5, 0.9]


def test_reference_keys_are_real_options():
    from aimmerging.config import FIELDS

    assert set(REFERENCE) <= set(FIELDS)


@pytest.mark.parametrize("model_name", ["tiny-causal", "tiny-seq2seq"])
def test_two_pass_generation_gives_the_text_of_one_long_pass(model_name):
    """Rows without EOS after the first pass go on from where they stopped: the same greedy text."""
    cfg = build_config(overrides=dict(model=model_name, max_input_tokens=48, micro_batch_size=4, threads=1))
    eng = build_engine(cfg, make_accelerator("no")).engine
    torch.manual_seed(3)
    with torch.no_grad():  # a random adapter, so the answers differ in length
        for p in eng.params:
            p.add_(torch.randn_like(p) * 0.5)
    ex = [Example(f"g{i}", f"question {i} about {'x' * i}? Answer:", "a", "t") for i in range(7)]
    one = generate_predictions(eng.peft_model, eng.formatter, ex, batch_size=4, max_new_tokens=12, progress=False)
    two = generate_predictions(eng.peft_model, eng.formatter, ex, batch_size=4, max_new_tokens=12, progress=False,
                               first_pass_tokens=3)
    assert one == two and any(len(t) > 3 for t in one)
