"""EWC, LwF and I-LoRA: their terms on hand-computed cases and on the tiny models' real forward
passes (through the engine, as the training loop runs them), and each method end to end through
the CLI on both tiny models, with a resume of the last stage that must end bit for bit where the
uninterrupted run ended (method state through state_dict / load_state_dict)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import aimmerging
from aimmerging.cli.main import main
from aimmerging.config import build_config
from aimmerging.data.memory import ReplayMemory
from aimmerging.data.olora import Example
from aimmerging.methods.base import StageInfo
from aimmerging.methods.ewc import EWC, EWCSettings
from aimmerging.methods.ilora import ILoRA, ILoRASettings
from aimmerging.methods.lwf import LwF, LwFSettings, distillation_kl
from aimmerging.models.loading import tiny_model
from aimmerging.models.lora import lora_parameters, snapshot
from aimmerging.runs.process import make_accelerator
from aimmerging.runs.runner import build_engine
from aimmerging.training.engine import Timers
from aimmerging.training.loop import StageView, TrainSettings
from aimmerging.training.stages import Stage

from helpers import stage_adapters, tiny_args

MODELS = ("tiny-causal", "tiny-seq2seq")


# -- a real engine on a tiny model and a stand-in for the training loop's view ---------------------------------
CFG = dict(max_input_tokens=48, micro_batch_size=4, threads=1)


@pytest.fixture(scope="module", params=MODELS)
def engine(request):
    return build_engine(build_config(overrides=dict(model=request.param, **CFG)), make_accelerator("no")).engine


def _view(engine, index: int = 1, task: str = "b", memory=()) -> StageView:
    """The training loop's own view of a stage (its forward, log, timers), outside the loop."""
    settings = TrainSettings.from_config(build_config(overrides=CFG))
    stage = Stage(index, task, [task], row=index)
    return StageView(engine, settings, stage, ReplayMemory(memory), 1, None, Timers(), lambda r: None)


def _examples(task: str, n: int) -> list[Example]:
    words = ["cat", "fir", "oslo", "owl", "elm", "rome"]
    return [Example(f"{task}-{i}", f"Which code does table {task} give to {words[i % 6]}? Answer:", f"c{i % 3}", task)
            for i in range(n)]


def _backward(engine, examples, method, view) -> list:
    """One micro-batch's backward as the loop runs it (scale 1), with the method's extra loss;
    returns the terms the hook produced."""
    terms = []

    def hook(inputs):
        term = method.extra_loss(view, inputs)
        terms.append(term)
        return term

    engine.backward(examples, 1.0, sync=True, extra_loss=hook, hidden_states=bool(method.training_hidden_states))
    return terms


@torch.no_grad()
def _nudge(params, seed: int, size: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(size * torch.randn(p.shape, generator=g))


def _zero_grads(params) -> None:
    for p in params:
        p.grad = None


# -- the view's forward pass -------------------------------------------------------------------------------------
def test_view_forward_rows_adapter_modes_and_gradients(engine):
    """``view.forward``: some rows line up with the whole batch's; another adapter's values hold for
    the pass only and the trained ones come back bit for bit; the model's mode comes back; gradients
    only when asked; per-step terms are averaged by the view."""
    view = _view(engine)
    examples = _examples("b", 4)
    params, start = engine.params, snapshot(engine.params)
    engine.model.train()
    try:
        full = view.forward(examples)
        part = view.forward(examples, rows=[1, 3])
        assert engine.model.training and not full.logits.requires_grad
        torch.testing.assert_close(part.logits, full.logits[[1, 3]], rtol=1e-5, atol=1e-6)
        assert torch.equal(part.labels, full.labels[[1, 3]])
        _nudge(params, seed=3)
        moved = snapshot(params)
        again = view.forward(examples, adapter=start)
        assert torch.equal(again.logits, full.logits)  # the same values, the same batch: the same bits
        assert all(torch.equal(p, m) for p, m in zip(params, moved))
        assert not torch.equal(view.forward(examples).logits, full.logits)
        out = view.forward(examples, rows=[0], grad=True)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert all(p.grad is None for p in params)
        hidden = view.forward(examples, hidden_states=True).hidden
        assert hidden and all(len(states) == 2 for states, _ in hidden)  # two layers after the embeddings
        view.log("term", 1.0)
        view.log("term", 3.0)
        assert view.step_terms() == {"term": 2.0} and view.step_terms() == {}
    finally:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)


# -- EWC -------------------------------------------------------------------------------------------------------
def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_ewc_penalty_is_zero_at_the_anchor_and_the_fisher_weighted_distance_elsewhere():
    ewc = EWC(EWCSettings(ewc_lambda=2.0))
    ewc.fishers = [[_t(1.0, 2.0), _t([3.0])]]
    ewc.anchors = [[_t(0.0, 1.0), _t([2.0])]]
    assert float(ewc.penalty([_t(0.0, 1.0), _t([2.0])])) == 0.0
    # lambda/2 * (1 * 1^2 + 2 * 2^2 + 3 * (-2)^2) = 1 * (1 + 8 + 12)
    assert float(ewc.penalty([_t(1.0, 3.0), _t([0.0])])) == pytest.approx(21.0)
    # quadratic: twice the distance, four times the penalty; a zero-Fisher entry costs nothing
    assert float(ewc.penalty([_t(2.0, 5.0), _t([-2.0])])) == pytest.approx(84.0)
    ewc.fishers[0][0] = _t(0.0, 2.0)
    assert float(ewc.penalty([_t(100.0, 1.0), _t([2.0])])) == 0.0
    # a second task's penalty adds its own anchor's term
    ewc.fishers.append([_t(1.0, 1.0), _t([0.0])])
    ewc.anchors.append([_t(1.0, 1.0), _t([0.0])])
    assert float(ewc.penalty([_t(1.0, 1.0), _t([2.0])])) == 0.0  # at both anchors where their Fisher is not 0
    assert float(ewc.penalty([_t(0.0, 1.0), _t([2.0])])) == pytest.approx(1.0)  # the second's: 1 * (0 - 1)^2


def test_ewc_accumulates_one_penalty_per_task_and_online_ewc_decays_the_fisher():
    f1, a1, f2, a2 = [_t(1.0, 4.0)], [_t(0.0, 0.0)], [_t(2.0, 2.0)], [_t(1.0, 1.0)]
    separate = EWC(EWCSettings())
    separate.consolidate(f1, a1)
    separate.consolidate(f2, a2)
    assert len(separate.fishers) == 2 and separate.anchors == [a1, a2]
    online = EWC(EWCSettings(ewc_online=True, ewc_gamma=0.5))
    online.consolidate(f1, a1)
    online.consolidate(f2, a2)
    assert len(online.fishers) == 1 and torch.equal(online.fishers[0][0], _t(2.5, 4.0))  # 0.5 F1 + F2
    assert online.anchors == [a2]  # the latest adapter
    online.consolidate(f2, a1)
    assert torch.equal(online.fishers[0][0], _t(3.25, 4.0)) and online.anchors == [a1]


def test_ewc_state_dict_round_trips_through_a_file(tmp_path):
    ewc = EWC(EWCSettings(ewc_lambda=3.0))
    ewc.consolidate([_t(1.0, 2.0), _t([0.5])], [_t(0.1, 0.2), _t([0.3])])
    ewc.consolidate([_t(4.0, 0.0), _t([1.5])], [_t(1.1, 1.2), _t([1.3])])
    path = tmp_path / "method_state.pt"
    torch.save(ewc.state_dict(), path)  # as the run directory stores it
    again = EWC(EWCSettings(ewc_lambda=3.0))
    again.load_state_dict(torch.load(path, weights_only=True))
    for a, b in zip(ewc.fishers + ewc.anchors, again.fishers + again.anchors):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    probe = [_t(0.7, -0.4), _t([2.0])]
    assert torch.equal(ewc.penalty(probe), again.penalty(probe))
    assert EWC(EWCSettings()).state_dict() == {}


def test_ewc_fisher_is_the_mean_squared_gradient_of_each_examples_answer_loss(engine):
    ewc = EWC(EWCSettings(ewc_fisher_examples=3))
    view = _view(engine, index=0, task="a")
    examples = _examples("a", 4)
    ewc.before_task(view)
    engine.model.train()
    _backward(engine, examples, ewc, view)  # the training forward: the method keeps its examples
    _zero_grads(engine.params)
    assert [k[1] for k in ewc.kept] == ["a-1", "a-2", "a-3"]  # the last 3
    fisher, n = ewc.estimate_fisher(view)
    assert n == 3 and engine.model.training and all(p.grad is None for p in engine.params)
    want = [torch.zeros_like(p) for p in engine.params]
    engine.model.eval()
    for e in examples[1:]:  # each example alone, through the engine's own forward
        loss_sum, _, labels, _ = engine._local_forward([e])
        grads = torch.autograd.grad(loss_sum / (labels != -100).sum(), engine.params, allow_unused=True)
        for w, g in zip(want, grads):
            if g is not None:
                w.add_(g ** 2 / 3)
    engine.model.train()
    assert sum(float(f.sum()) for f in fisher) > 0
    for f, w in zip(fisher, want):
        torch.testing.assert_close(f, w, rtol=1e-3, atol=1e-10)
    ewc.task_end_adapter(view)
    assert not ewc.kept and len(ewc.fishers) == 1


# -- LwF -------------------------------------------------------------------------------------------------------
def test_distillation_kl_by_hand():
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    mask = torch.tensor([[True, False]])
    assert float(distillation_kl(student, teacher, mask, 2.0)) == 0.0  # the masked-out position differs
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)  # teacher at T = 2
    q = torch.softmax(torch.tensor([0.5, 0.0]), 0)
    want = float((p * (p.log() - q.log())).sum())
    assert float(distillation_kl(student, teacher, torch.tensor([[False, True]]), 2.0)) == pytest.approx(want)


def test_lwf_term_is_zero_for_the_teacher_itself_positive_once_the_student_moved_and_leaves_the_params_alone(engine):
    params = engine.params
    start = snapshot(params)
    lwf = LwF(LwFSettings(lwf_alpha=0.7, lwf_temperature=2.0))
    view = _view(engine, index=1, task="b")
    examples = _examples("b", 3)
    try:
        lwf.before_task(view)
        engine.model.eval()  # no dropout: the student computes exactly what the teacher does
        (term,) = _backward(engine, examples, lwf, view)
        assert abs(float(term.detach())) < 1e-6
        _nudge(params, seed=1)
        moved = snapshot(params)
        _zero_grads(params)
        engine.model.train()
        (term,) = _backward(engine, examples, lwf, view)
        assert float(term.detach()) > 1e-6
        assert all(torch.equal(p, m) for p, m in zip(params, moved))  # the teacher pass restored them bit for bit
        assert all(torch.equal(t, s) for t, s in zip(lwf.teacher, start))  # the teacher is still the old adapter
        # dropout off, the loss and its gradient against a computation by hand: the teacher's
        # logits from a forward with the teacher's values written into the adapter, then the student's
        engine.model.eval()
        _zero_grads(params)
        (term,) = _backward(engine, examples, lwf, view)
        got = [p.grad.clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
            _, teacher_logits, _, _ = engine._local_forward(examples)
            for p, m in zip(params, moved):
                p.copy_(m)
        loss_sum, logits, labels, _ = engine._local_forward(examples)
        mask = labels != -100
        want_term = 0.7 * distillation_kl(logits, teacher_logits, mask, 2.0)
        assert float(term.detach()) == pytest.approx(float(want_term.detach()), rel=1e-5)
        grads = torch.autograd.grad(loss_sum / mask.sum() + want_term, params, allow_unused=True)
        for g, w in zip(got, grads):
            torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), rtol=1e-4, atol=1e-8)
    finally:
        lwf.task_end_adapter(view)
        engine.model.train()
        _zero_grads(params)
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    assert not engine.peft_model._forward_pre_hooks  # no hooks: the teacher pass is view.forward


def test_lwf_does_nothing_on_the_first_task(engine):
    lwf = LwF(LwFSettings())
    view = _view(engine, index=0, task="a")
    lwf.before_task(view)
    assert lwf.teacher is None
    assert _backward(engine, _examples("a", 2), lwf, view) == [None]
    _zero_grads(engine.params)


# -- I-LoRA ----------------------------------------------------------------------------------------------------
def test_ilora_slow_adapter_is_the_ema_of_the_fast_one():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    view = SimpleNamespace(params=params, model=None, memory=ReplayMemory(), stage=StageInfo(0, "a", ("a",)))
    ilora = ILoRA(ILoRASettings(ilora_ema=0.9))
    ilora.before_task(view)
    want = [p.detach().double().clone() for p in params]
    for k in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        skipped = k == 2  # a skipped step does not move the slow adapter (the fast one did not step)
        ilora.after_step(view, {"skipped": "non-finite loss"} if skipped else {})
        if not skipped:
            want = [0.9 * w + 0.1 * p.detach().double() for w, p in zip(want, params)]
    for s, w in zip(ilora.slow, want):
        torch.testing.assert_close(s.double(), w, rtol=0, atol=1e-6)
    end = ilora.task_end_adapter(view)
    assert all(torch.equal(e, s) for e, s in zip(end, ilora.slow))
    assert not any(torch.equal(e, p) for e, p in zip(end, params))


def test_ilora_consistency_is_zero_when_slow_equals_fast_and_positive_after_the_fast_one_moved(engine):
    params = engine.params
    start = snapshot(params)
    memory = _examples("a", 4)
    ilora = ILoRA(ILoRASettings(ilora_beta=2.0))
    view = _view(engine, index=1, task="b", memory=memory)
    batch = _examples("b", 2) + memory[:2]  # two current-task and two replay examples
    try:
        ilora.before_task(view)
        engine.model.eval()
        (term,) = _backward(engine, batch, ilora, view)
        assert abs(float(term.detach())) < 1e-10
        _nudge(params, seed=2)
        moved = snapshot(params)
        _zero_grads(params)
        (term,) = _backward(engine, batch, ilora, view)
        assert float(term.detach()) > 0 and all(p.grad is not None for p in params)
        assert all(torch.equal(p, m) for p, m in zip(params, moved))
        assert all(torch.equal(s, t) for s, t in zip(ilora.slow, start))
        _zero_grads(params)
        assert _backward(engine, _examples("b", 2), ilora, view) == [None]  # no replay rows, no term
    finally:
        ilora.task_end_adapter(view)
        engine.model.train()
        _zero_grads(params)
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    assert not engine.peft_model._forward_hooks and not engine.peft_model._forward_pre_hooks


class RecordingILoRA(ILoRA):
    """I-LoRA that keeps the adapter each task starts from and the fast adapter after every step."""

    def before_task(self, view):
        super().before_task(view)
        self.start, self.fast = snapshot(view.params), []

    def after_step(self, view, record):
        self.fast.append(snapshot(view.params))
        return super().after_step(view, record)


def _task(table: dict[str, str]) -> dict:
    rows = [{"input": f"Which code does the table give to {w}? Answer:", "output": c} for w, c in table.items()]
    return {"train": rows * 3, "test": rows}


def test_ilora_through_the_training_loop_carries_the_slow_adapter_on():
    stream = {"colours": _task({"cat": "red", "fir": "green", "oslo": "blue"}),
              "shapes": _task({"cat": "circle", "fir": "square", "oslo": "triangle"})}
    method = RecordingILoRA(ILoRASettings(ilora_ema=0.5))
    result = aimmerging.run(stream, method=method, model=tiny_model("tiny-causal"), max_steps=3, batch_size=4,
                            micro_batch_size=2, max_input_tokens=48, memory_ratio=50, eval_batch_size=8, threads=1,
                            lr=1e-2, warmup_steps=0)
    final = lora_parameters(result.model)
    assert all(torch.equal(p, s) for p, s in zip(final, method.slow))  # evaluated and returned: the slow adapter
    want = [s.double() for s in method.start]
    for fast in method.fast:
        want = [0.5 * w + 0.5 * f.double() for w, f in zip(want, fast)]
    for s, w in zip(method.slow, want):
        torch.testing.assert_close(s.double(), w, rtol=0, atol=1e-6)
    assert not all(torch.equal(f, s) for f, s in zip(method.fast[-1], method.slow))  # the fast one is elsewhere
    steps = [r for r in result.trace if r["event"] == "step" and r["task"] == "shapes"]
    assert len(steps) == 3 and all(math.isfinite(r["consistency"]) for r in steps)


# -- end to end through the CLI, and a resume of the last stage -------------------------------------------------
def _final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return stage_adapters(out)["02-agnews"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["ewc", "lwf", "ilora"])
def test_end_to_end_and_resume_of_the_last_stage(tmp_path, data_dir, method, model):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, model=model, method=method, steps=4)
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    assert results["complete"] is True and len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(matrix[i][j] is not None for i in range(3) for j in range(i + 1))
    assert isinstance(results["metrics"]["op"], float) and isinstance(results["metrics"]["bwt"], float)
    stages = sorted(d for d in (out / "stages").iterdir() if d.is_dir())
    assert [d.name[:2] for d in stages] == ["00", "01", "02"]
    for d in stages:
        tensors = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    if method in ("ewc", "ilora"):  # their state goes with every stage
        assert all((d / "method_state.pt").is_file() for d in stages)
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    extra = {"ewc": "ewc_penalty", "lwf": "distillation", "ilora": "consistency"}[method]
    later = [r for r in trace if r.get("event") == "step" and r["task_index"] > 0]
    assert later and all(math.isfinite(r[extra]) for r in later)
    if method == "ewc":
        assert sum(r.get("event") == "fisher" for r in trace) == 3

    want = _final_adapter(out)
    (last,) = sorted((out / "stages").glob("02-*"))
    shutil.rmtree(last)
    for name in ("results.json", "summary.md"):
        (out / name).unlink(missing_ok=True)
    assert main(args) == 0  # resumes at the last stage from the saved adapter and method state
    got = _final_adapter(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    again = json.loads((out / "results.json").read_text())
    assert again["accuracy_matrix"] == matrix and again["complete"] is True
