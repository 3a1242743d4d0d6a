"""Fusion rules in one place (issue 29, item 3; issue 30's importance-masked merge): every rule
registered when ``aimmerging.fusion`` is imported, each against a hand example on tiny tensors
through :func:`aimmerging.fusion.fuse_in_place`, declared parameters reaching the rule (and bad
ones refused in one line), and AIMMerging with ``--fusion importance-mask`` / ``--fusion dare
--fusion-params ...`` end to end on ``tiny-causal``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from aimmerging.errors import ConfigError
from aimmerging.fusion import (FUSION_RULES, Param, derive_seed, fuse_in_place, fusion_rule, optimizer_hook,
                               resolve_params, rule_params)
from aimmerging.fusion.importance import ImportanceTracker
from aimmerging.fusion.task_vectors import dare_masks

from helpers import one_line_error, stage_adapters, tiny_args

T = torch.tensor
BUILTIN = ("weighted-sum", "ties", "dare", "magmax", "importance-mask")


def _fuse(rule, params=None, **kw):
    """One fusion of a single 4-entry tensor: anchor 1, theta_k = anchor + d_in, theta = theta_k + d_out."""
    anchor = T([1.0, 1.0, 1.0, 1.0])
    d_in, d_out = T([3.0, -1.0, 0.5, -4.0]), T([-2.0, 2.0, 1.0, -0.1])
    p = [anchor + d_in + d_out]
    assert fuse_in_place(p, [anchor], [anchor + d_in], kw.pop("w_in", 0.5), kw.pop("w_out", 0.5), rule, params, **kw)
    return p[0]


# -- registration ------------------------------------------------------------------------------------------
def test_every_rule_is_registered_by_importing_the_fusion_package_and_seen_by_hf():
    """A fresh interpreter: ``import aimmerging.fusion`` alone registers every built-in rule, and
    ``aimmerging.hf`` offers TIES, DARE and MagMax (with parameters). Catches the old registration
    as a side effect of importing ``methods/task_merging.py``."""
    code = (
        "import sys\n"
        "from aimmerging.fusion import FUSION_RULES\n"
        f"assert tuple(FUSION_RULES) == {BUILTIN!r}, list(FUSION_RULES)\n"
        "assert not any(m.startswith('aimmerging.methods') for m in sys.modules)\n"
        "from aimmerging.hf import AIMMergingCallback\n"
        "for rule in ('ties', 'dare', 'magmax'):\n"
        "    AIMMergingCallback([], fusion=rule)\n"
        "cb = AIMMergingCallback([], fusion='dare', fusion_params={'rate': '0.3'})\n"
        "assert cb.method.settings.fusion_params == {'rate': 0.3}, cb.method.settings.fusion_params\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_rules_declare_their_parameters():
    declared = {name: [(p.name, p.type, p.default) for p in rule_params(name)] for name in BUILTIN}
    assert declared == {
        "weighted-sum": [], "magmax": [],
        "ties": [("density", float, 0.2), ("majority_sign", str, "total")],
        "dare": [("rate", float, 0.5), ("seed", int, 0)],
        "importance-mask": [("keep", float, 0.2), ("beta1", float, 0.85), ("beta2", float, 0.85)],
    }
    assert [p.name for p in rule_params("dare") if p.seed] == ["seed"]


# -- each rule against a hand example -------------------------------------------------------------------------
def test_weighted_sum_by_hand():
    # 1 + 0.6 d_in + 0.4 d_out = 1 + (1.8, -0.6, 0.3, -2.4) + (-0.8, 0.8, 0.4, -0.04)
    assert torch.allclose(_fuse("weighted-sum", w_in=0.6, w_out=0.4), T([2.0, 1.2, 1.7, -1.44]))


def test_ties_by_hand_and_its_density_reaches_it():
    """density 0.5 keeps 2 of 4: d_in -> (3, 0, 0, -4), d_out -> (-2, 2, 0, 0); signs of the mass
    (1, 2, 0, -4): +, +, + (zero), -; disjoint mean (3, 2, 0, -4) x weight 2, plus anchor 1. The
    default density 0.2 keeps int(0.8) = 0 entries: the anchor alone. Catches a density that does
    not reach the rule."""
    assert torch.equal(_fuse("ties", {"density": "0.5"}, w_in=2.0, w_out=2.0), T([7.0, 5.0, 1.0, -7.0]))
    assert torch.equal(_fuse("ties", w_in=2.0, w_out=2.0), T([1.0, 1.0, 1.0, 1.0]))
    # counting signs instead: at density 1 entry 4 has two negatives (-4, -0.1): -(4 + 0.1) / 2 x 2
    assert _fuse("ties", {"density": 1.0, "majority_sign": "frequency"}, w_in=2.0, w_out=2.0)[3].item() == \
        pytest.approx(1 - 4.1)


def test_dare_by_hand_with_its_rate_and_a_seed_per_tensor_and_merge():
    """rate 0 is the plain weighted sum; rate 0.5 keeps each entry with its mask (drawn with the
    seed derived from the user's seed, the merge's salt and the tensor's index) and rescales by 2.
    Catches: the rate or seed not reaching the rule, one seed shared by every tensor or merge."""
    assert torch.allclose(_fuse("dare", {"rate": 0}, w_in=0.6, w_out=0.4), T([2.0, 1.2, 1.7, -1.44]))
    d_in, d_out = T([3.0, -1.0, 0.5, -4.0]), T([-2.0, 2.0, 1.0, -0.1])
    m_in, m_out = dare_masks(torch.Size([4]), 2, 0.5, derive_seed(7, 3, 0))
    want = 1 + (0.6 * m_in * d_in + 0.4 * m_out * d_out) / 0.5
    got = _fuse("dare", {"rate": 0.5, "seed": 7}, w_in=0.6, w_out=0.4, salt=3)
    assert torch.allclose(got, want)
    # two equal-shaped tensors in one merge, and two merges, draw different masks
    z = torch.zeros(64)
    p = [torch.ones(64), torch.ones(64)]
    fuse_in_place(p, [z, z], [z, z], 1.0, 1.0, "dare", {"rate": 0.5}, salt=1)
    q = [torch.ones(64)]
    fuse_in_place(q, [z], [z], 1.0, 1.0, "dare", {"rate": 0.5}, salt=2)
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[0], q[0])
    assert set(torch.cat([p[0], p[1], q[0]]).tolist()) <= {0.0, 2.0}


def test_magmax_by_hand():
    # the delta of larger magnitude per entry (the later on a tie), times its weight:
    # d_in wins entries 1 and 4 (3, -4), d_out entries 2 and 3 (2, 1)
    assert torch.equal(_fuse("magmax", w_in=0.5, w_out=2.0), T([2.5, 5.0, 3.0, -1.0]))


def test_importance_mask_by_hand_through_its_tracker():
    """Two tensors of two entries; |w * g| of one inner step (2, 0 | 0, 0) and of one outer step
    (0, 0 | 0, 3), beta 0.5: scores s * u = 0.25 |w g|^2, so with keep 0.25 over the four entries
    the inner mask selects entry 1 of tensor 1 and the outer mask entry 2 of tensor 2; the
    neither-case weights are the merge's (0.3, 0.7). After the fusion the inner EMA is emptied,
    the outer kept. Catches: the phases swapped, the masks swapped, the merge's weights ignored
    where neither mask selects, the inner EMA not emptied, a rule with state run without one."""
    tracker = ImportanceTracker(keep=0.25, beta1=0.5, beta2=0.5)
    w = [torch.nn.Parameter(T([1.0, 1.0])), torch.nn.Parameter(T([1.0, 1.0]))]
    opt = torch.optim.SGD(w, lr=0.0)
    handle = opt.register_step_post_hook(optimizer_hook(tracker, w))
    for phase, grads in (("inner", (T([2.0, 0.0]), T([0.0, 0.0]))), ("outer", (T([0.0, 0.0]), T([0.0, 3.0])))):
        tracker.phase = phase
        for p, g in zip(w, grads):
            p.grad = g
        opt.step()
    handle.remove()
    assert tracker.inner.updates == 1 and tracker.outer.updates == 1
    anchor, theta_k = [torch.zeros(2), torch.zeros(2)], [T([1.0, 1.0]), T([1.0, 1.0])]
    params = [T([11.0, 11.0]), T([11.0, 11.0])]  # d_in = 1, d_out = 10 everywhere
    assert fuse_in_place(params, anchor, theta_k, 0.3, 0.7, "importance-mask", state=tracker)
    m_in, m_out = tracker.last_masks
    assert [m.tolist() for m in m_in] == [[1, 0], [0, 0]] and [m.tolist() for m in m_out] == [[0, 0], [0, 1]]
    assert params[0].tolist() == pytest.approx([1.0, 7.3]) and params[1].tolist() == pytest.approx([7.3, 10.0])
    assert tracker.inner.updates == 0 and tracker.outer.updates == 1
    with pytest.raises(ConfigError, match="needs state"):
        fuse_in_place(params, anchor, theta_k, 0.5, 0.5, "importance-mask")


# -- parameters ------------------------------------------------------------------------------------------------
def test_declared_parameters_reach_a_rule_and_bad_ones_are_one_line():
    @fusion_rule("test-scaled", Param("factor", float, 1.0, "scales the sum", lambda v: v > 0, "be > 0"))
    def scaled(base, deltas, weights, *, factor):
        return base + factor * sum(w * d for w, d in zip(weights, deltas))

    def keyword_only(base, deltas, weights, *, shift: float = 0.0, label: str = "x"):
        return base + shift

    FUSION_RULES.register("test-kw", keyword_only)
    try:
        p = [T([3.0])]
        assert fuse_in_place(p, [T([1.0])], [T([2.0])], 0.5, 0.5, "test-scaled", {"factor": "3"})
        assert p[0].item() == 1 + 3 * (0.5 + 0.5)
        assert [(q.name, q.type, q.default) for q in rule_params("test-kw")] == [("shift", float, 0.0),
                                                                                ("label", str, "x")]
        assert resolve_params("test-kw", {"shift": "2.5"}) == {"shift": 2.5, "label": "x"}
        for rule, given, text in (
                ("test-scaled", {"facter": 2}, "unknown parameter facter of fusion rule 'test-scaled' (its parameters: "
                                               "factor)"),
                ("test-scaled", {"factor": -1}, "factor of fusion rule 'test-scaled': must be > 0, got -1.0"),
                ("test-scaled", {"factor": "inf"}, "must be a finite number"),
                ("test-kw", {"shift": "abc"}, "shift of fusion rule 'test-kw': expected float, got 'abc'"),
                ("weighted-sum", {"rate": 1}, "unknown parameter rate of fusion rule 'weighted-sum' (it has no "
                                              "parameters)"),
                ("dare", {"rate": 1.0}, "rate of fusion rule 'dare': must be in [0, 1), got 1.0"),
                ("ties", {"majority_sign": "mass"}, "'mass' is not one of total, frequency"),
                ("importance-mask", {"keep": 0}, "keep of fusion rule 'importance-mask': must be in (0, 1]")):
            with pytest.raises(ConfigError) as e:
                resolve_params(rule, given)
            assert text in str(e.value) and "\n" not in str(e.value)
    finally:
        FUSION_RULES.unregister("test-scaled")
        FUSION_RULES.unregister("test-kw")


def test_fusion_params_in_a_config_and_the_callback():
    from aimmerging.config import build_config
    from aimmerging.hf import AIMMergingCallback

    cfg = build_config({"method": "aimmerging", "fusion": "dare", "fusion_params": {"rate": 0.3, "seed": "7"}})
    assert cfg.settings.fusion_params == {"rate": 0.3, "seed": 7}
    assert cfg.to_dict()["fusion_params"] == {"rate": 0.3, "seed": 7}
    assert build_config({"method": "aimmerging", "fusion": "dare"}).settings.fusion_params is None
    with pytest.raises(ConfigError, match="fusion_params: expected NAME=VALUE pairs"):
        build_config({"method": "aimmerging", "fusion": "dare"}, {"fusion_params": "rate"})
    with pytest.raises(ConfigError, match="unknown parameter bogus of fusion rule 'ties'"):
        AIMMergingCallback([], fusion="ties", fusion_params={"bogus": 1})
    # a rule with state runs inside a trainer too (the Trainer host runs the method's own hooks)
    assert AIMMergingCallback([], fusion="importance-mask").method.settings.fusion == "importance-mask"


def test_an_unknown_fusion_parameter_is_one_line_on_the_command_line(tmp_path, capsys):
    from aimmerging.cli.main import main

    rc = main(["run", "--method", "aimmerging", "--model", "tiny-causal", "--tasks", "a,b", "--data-dir",
               str(tmp_path), "--output-dir", str(tmp_path / "run"), "--fusion", "dare", "--fusion-params", "rat=0.3"])
    one_line_error(rc, capsys.readouterr().err.strip().splitlines(),
                   "unknown parameter rat of fusion rule 'dare' (its parameters: rate, seed)")
    assert not (tmp_path / "run").exists()


def test_run_help_lists_the_rules_parameters(capsys):
    from aimmerging.cli.main import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fusion-params" in text and "dare(rate=0.5, seed=0)" in text
    assert "importance-mask(keep=0.2, beta1=0.85, beta2=0.85)" in text


# -- AIMMerging end to end -------------------------------------------------------------------------------------
TWO_TASKS = {"tasks": "dbpedia,amazon", "max_steps": 4}


def _merges(out):
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "merge"]


def test_aimmerging_with_importance_mask_runs_and_gathers_importance(tmp_path, data_dir, monkeypatch):
    """The rule's state is created for the memory task, fed by the task steps (inner) and the replay
    steps (outer), and each merge fuses through its masks; the run completes with finite adapters,
    which differ from those of the reference's weighted sum."""
    from aimmerging.cli.main import main

    seen = []
    merged = ImportanceTracker.merged

    def record(self):
        seen.append((self.inner.updates, self.outer.updates, self.keep, self.last_masks is not None))
        merged(self)

    monkeypatch.setattr(ImportanceTracker, "merged", record)
    out = tmp_path / "mask"
    assert main(tiny_args(out, data_dir, method="aimmerging", fusion="importance-mask", fusion_params="keep=0.3",
                          **TWO_TASKS)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["accuracy_matrix"]) == 2
    merges = _merges(out)
    assert len(merges) == len(seen) >= 1 and all(m["fallback"] is None for m in merges)
    outer = 0
    for (inner_n, outer_n, keep, masked), m in zip(seen, merges):
        outer += m["outer_steps"]
        assert inner_n >= 1 and outer_n == outer and keep == 0.3 and masked
    adapters = stage_adapters(out)["01-amazon"]
    assert all(bool(torch.isfinite(t).all()) for t in adapters.values())
    plain = tmp_path / "plain"
    monkeypatch.undo()
    assert main(tiny_args(plain, data_dir, method="aimmerging", **TWO_TASKS)) == 0
    other = stage_adapters(plain)["01-amazon"]
    assert any(not torch.equal(adapters[k], other[k]) for k in adapters)


def test_aimmerging_passes_fusion_params_to_the_rule(tmp_path, data_dir):
    """``--fusion dare --fusion-params rate=0.3,seed=5``: every call of the rule gets rate 0.3 and a
    seed derived per tensor and per merge (all different). Catches the old fixed rate 0.5 / seed 0."""
    from aimmerging.cli.main import main

    real = FUSION_RULES.get("dare")
    calls = []

    def spy(base, deltas, weights, **kw):
        calls.append(kw)
        return real(base, deltas, weights, **kw)

    spy.fusion_params, spy.fusion_state = real.fusion_params, None
    FUSION_RULES.register("dare", spy, replace=True)
    try:
        out = tmp_path / "run"
        assert main(tiny_args(out, data_dir, method="aimmerging", fusion="dare", fusion_params="rate=0.3,seed=5",
                              **TWO_TASKS)) == 0
    finally:
        FUSION_RULES.register("dare", real, replace=True)
    merges = _merges(out)
    assert merges and len(calls) % len(merges) == 0
    assert {kw["rate"] for kw in calls} == {0.3}
    assert len({kw["seed"] for kw in calls}) == len(calls) and 5 not in {kw["seed"] for kw in calls}
    assert json.loads((out / "results.json").read_text())["complete"]
    assert not math.isnan(merges[0]["w_in"])


def test_a_rule_parameter_from_the_flag_of_the_method_of_the_same_name():
    """``--fusion dare --dare-rate 0.3`` sets DARE's rate for AIMMerging (it used to be checked as the
    ``dare`` method's option and then ignored); with --fusion-params for the same parameter: one line."""
    from aimmerging.config import build_config
    from aimmerging.errors import ConfigError

    assert build_config({"method": "aimmerging", "fusion": "dare"}, {"dare_rate": "0.3"}).settings.fusion_params == {"rate": 0.3}
    cfg = build_config({"method": "merge-fixed", "fusion": "ties"}, {"ties_density": 0.4, "fusion_params": "majority_sign=frequency"})
    assert cfg.settings.fusion_params == {"density": 0.4, "majority_sign": "frequency"}
    assert build_config({"method": "aimmerging"}, {"dare_rate": "0.3"}).settings.fusion_params is None  # weighted-sum
    with pytest.raises(ConfigError, match="rate given twice"):
        build_config({"method": "aimmerging", "fusion": "dare"}, {"dare_rate": "0.3", "fusion_params": "rate=0.2"})
    assert build_config({"method": "dare"}, {"dare_rate": "0.3"}).settings.dare_rate == 0.3  # the method's own
