"""Merging task vectors at the end of every task: task arithmetic, TIES, DARE and MagMax.

One implementation, :class:`TaskMerging`, and four registered variants. Every task trains the
run's one LoRA adapter as ``seq`` does; at the end of the task, ``task_end_adapter`` returns a
*merged* adapter, and that adapter is evaluated, saved (``stages/NN-task/adapter``, plain PEFT
format) and carried on. A variant is four choices:

* ``chain``: where a task starts. ``"merged"``: from the merged adapter of the previous tasks
  (what the loop carries on). ``"trained"``: from the previous task's *trained* adapter
  (sequential fine-tuning); the merged adapter is then only evaluated and saved, and the trained
  one is kept in the method state and put back in ``before_task``.
* ``vectors``: what the rule merges. ``"latest"``: ``merged_t = rule(merged_{t-1}, [tau_t])``.
  ``"all"``: ``merged_t = rule(theta_0, [tau_1, ..., tau_t])`` over every task so far, with
  ``theta_0`` the initial adapter (PEFT's initialisation: B = 0, so its weight update is 0).
* ``cumulative``: ``tau_i = theta_i - theta_0`` (relative to the initial adapter) instead of
  ``tau_i = theta_i - s_i`` (relative to the adapter task i started from: its own update).
* ``rule``: a fusion rule of ``FUSION_RULES`` (``aimmerging.fusion.task_vectors``), with weights
  and its parameters from the method's settings. The merge itself is
  ``aimmerging.fusion.lora.merge_adapters``; this module keeps only the method logic.

=================  =========  ========  ==========  =========================================  =============
method             chain      vectors   tau_i       merged_t                                   defaults
=================  =========  ========  ==========  =========================================  =============
task-arithmetic    merged     latest    own update  merged_{t-1} + alpha * tau_t                alpha 0.5
ties               merged     all       own update  theta_0 + TIES_k(tau_1..tau_t) * lambda     k 0.2, lambda 1
dare               merged     latest    own update  merged_{t-1} + w * DARE_p(tau_t)            p 0.5, w 1
magmax             trained    all       cumulative  theta_0 + lambda * MaxMag(tau_1..tau_t)     lambda 0.5
=================  =========  ========  ==========  =========================================  =============

Papers, and the choices made where they are silent about this setting (a stream of tasks, one
LoRA adapter, merge after every task):

* ``task-arithmetic`` (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic"): the
  merged model is the base plus lambda times the sum of task vectors. Here incrementally: task t
  trains from merged_{t-1} and merged_t = merged_{t-1} + alpha * (theta_t - merged_{t-1}), which
  unrolls to theta_0 + alpha * sum_i tau_i. The paper picks lambda on validation data; alpha = 0.5
  is our default (alpha = 1 is ``seq``, alpha = 0 never learns).
* ``ties`` (Yadav et al., NeurIPS 2023): trim each task vector to its top-k % magnitudes, elect a
  sign per entry (sign of the summed mass), disjoint mean of the agreeing entries, scale by
  lambda. The paper's defaults, k = 20 % and lambda = 1 (its suggestion without validation data).
  Here each task trains from the merged adapter (as task arithmetic) and its task vector is its own
  update; the rule runs over the task vectors of all tasks so far, from theta_0. Trimming is per
  tensor (per layer in the ``delta`` space), as PEFT does; the paper trims the whole flattened
  task vector.
* ``dare`` (Yu et al., ICML 2024): drop each entry of the task vector with probability p, rescale
  the rest by 1 / (1 - p), then add with task arithmetic. Here: merged_t = merged_{t-1} + w *
  DARE_p(tau_t), i.e. theta_0 + w * sum_i DARE_p(tau_i) with a fixed mask per task. The paper
  shows drop rates up to 0.9 for full fine-tuning deltas; a LoRA update is low-rank and dense, so
  our default is the milder p = 0.5, with w = 1. The masks are seeded: one seed per layer, drawn
  from the stage's random stream ``view.rng("dare")`` (run seed, stage index), so a run and its
  resume draw the same masks, on every process and device.
* ``magmax`` (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual
  Learning"): sequential fine-tuning, then, per parameter, the task vector of largest magnitude
  among tau_1..tau_t, tau_i = theta_i - theta_0 with theta_i the sequentially fine-tuned model after
  task i: theta_0 + lambda * tau_MagMax. lambda = 0.5 as in the MagMax code (``merge_splitted.py``).
  The merged adapter is what is evaluated and saved after every task; training continues from the
  trained adapter (the sequential chain), which the method state keeps for a resume.

**Which space the rules work in** (``--merge-space``, one option for the whole family).

A LoRA adapter's effect on a layer is its weight update ``dW = (alpha / r) * B @ A``, so the task
vector of a LoRA fine-tune lives in ``B @ A``, not in A and B separately: averaging or selecting
entries of A and of B is not averaging or selecting entries of B @ A (``(B + dB)(A + dA)`` has the
cross term ``dB dA``, and entrywise selection mixes rows of A from one task with columns of B from
another). The merged update must be handed back as A and B of the same rank r.

* ``delta`` (default): per adapted layer, the base and every task vector are taken as weight
  updates ``B @ A`` (float64; PEFT's constant scaling alpha / r is left out, which changes nothing
  since every rule is positively homogeneous), the rule runs on them entrywise exactly as the
  papers define it on weights, and the merged update M is factored back into rank r by truncated
  SVD: ``A = V_r^T`` (orthonormal rows), ``B = U_r S_r``. This is exact when rank(M) <= r and
  otherwise the best rank-r approximation in Frobenius norm (Eckart-Young); the relative residual
  ||M - BA|| / ||M|| (the largest over the layers) is in the ``task_merge`` trace record. A
  one-task MagMax or DARE with p = 0 merge, or a task-arithmetic merge whose new update shares the
  previous adapter's row space, is exact; TIES, DARE and MagMax over several tasks select or drop
  entries, which makes M full-rank in general, and the projection keeps its r strongest directions.
  A is orthonormal rather than the balanced ``sqrt(S)`` split so that no direction is dead for the
  next task: a zero singular value leaves a zero column of B but a unit row of A, which still
  receives gradient (with both zero, neither would).
* ``params``: the rules run on the A and B tensors themselves (the task vector is the difference
  of the LoRA parameters). Always representable and cheap, but it is the rule applied to the
  factors, not to the weight update (see above), which we document as an approximation: it is
  well-defined because all adapters of a run descend from one initialisation, so their A and B
  share coordinates, just as fine-tuned models share the coordinates of their pre-trained model in
  full-model merging. For task arithmetic, merged_t = merged_{t-1} + alpha * tau_t holds for A and
  B, while the weight update gets alpha^2 dB dA.

LoRA tensors that are not a (lora_A, lora_B) weight pair of one layer (none with the default
targets) are merged entrywise as in ``params``. A merge whose result is not finite is handed to
the loop as is, and the loop keeps the trained adapter (trace: ``task_end_adapter`` fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from ..fusion import resolve_params
from ..fusion.lora import SPACES, merge_adapters, refactor
from ..fusion.task_vectors import SIGN_METHODS
from ..models.lora import LoraLayers, lora_layers, restore, snapshot
from ..settings import Bounded, option
from . import register_method
from .base import Method


# -- settings -----------------------------------------------------------------------------------------
@dataclass
class TaskMergingSettings(Bounded):
    merge_space: str = option("delta", "merging methods: merge the weight updates B@A of each layer and re-factor "
                              "them into rank r by SVD ('delta'), or merge the A and B tensors ('params')", SPACES)


@dataclass
class TaskArithmeticSettings(TaskMergingSettings):
    merge_alpha: float = option(0.5, "task-arithmetic: merged = previous merged + alpha x task vector", finite=True)


@dataclass
class TiesSettings(TaskMergingSettings):
    ties_density: float = option(0.2, "ties: fraction of each task vector's entries kept (largest magnitudes)",
                                  gt=0, le=1)
    ties_lambda: float = option(1.0, "ties: scaling of the merged task vector")
    ties_sign: str = option("total", "ties: sign election by the summed mass ('total', the paper's) or by counting "
                            "signs ('frequency')", SIGN_METHODS)


@dataclass
class DareSettings(TaskMergingSettings):
    dare_rate: float = option(0.5, "dare: probability of dropping each entry of the task vector (the rest are "
                              "rescaled by 1/(1-p))", ge=0, lt=1)
    dare_weight: float = option(1.0, "dare: weight of the dropped-and-rescaled task vector when it is added")


@dataclass
class MagMaxSettings(TaskMergingSettings):
    magmax_lambda: float = option(0.5, "magmax: scaling of the maximum-magnitude task vector")


# -- the method ------------------------------------------------------------------------------------------
class TaskMerging(Method):
    """The merging family (module docstring). A variant sets ``rule``, ``chain``, ``vectors``,
    ``cumulative``, its ``Settings`` and :meth:`rule_weights` (and :meth:`rule_params`, the
    rule's declared parameters from the settings, or :meth:`rule_kwargs`, per call).

    State (``state_dict``; kept across a resume): ``initial`` (theta_0, when the rule merges all
    task vectors), ``trained`` and ``starts`` (theta_i and s_i of every finished task, when needed),
    ``last_trained`` (the chain's adapter, for ``chain = "trained"``). Tensors are stored on the CPU.
    """

    rule: ClassVar[str] = "weighted-sum"
    chain: ClassVar[str] = "merged"  # "merged" | "trained"
    vectors: ClassVar[str] = "latest"  # "latest" | "all"
    cumulative: ClassVar[bool] = False  # tau_i relative to theta_0 instead of the task's start

    def __init__(self, settings=None):
        super().__init__(settings)
        self._reset()

    def _reset(self) -> None:
        self.initial: Optional[list[torch.Tensor]] = None
        self.trained: list[list[torch.Tensor]] = []
        self.starts: list[list[torch.Tensor]] = []
        self.last_trained: Optional[list[torch.Tensor]] = None
        self.start: Optional[list[torch.Tensor]] = None

    # what a variant chooses
    def rule_weights(self, n: int) -> list[float]:
        raise NotImplementedError

    def rule_params(self) -> dict:
        return {}

    def rule_kwargs(self, view, calls: int) -> Callable[[int], dict]:
        values = resolve_params(self.rule, self.rule_params())
        return lambda call: values

    # hooks
    def before_task(self, view) -> None:
        device = view.params[0].device
        if view.stage.index == 0:
            self._reset()  # a new run (the first stage starts from the initial adapter)
            if self.vectors == "all":
                self.initial = snapshot(view.params)
        else:
            self._to(device)
            if self.vectors == "all" and self.initial is None:
                raise RuntimeError(f"{self.name}: the method state (initial adapter) of the previous stage is missing")
            if self.chain == "trained":
                if self.last_trained is None:
                    raise RuntimeError(f"{self.name}: the method state (trained adapter) of the previous stage is "
                                       "missing")
                restore(view.params, self.last_trained)  # sequential fine-tuning goes on from the trained adapter
        # the first task starts from theta_0 itself (one tensor set, saved once)
        self.start = self.initial if view.stage.index == 0 and self.initial is not None else snapshot(view.params)

    def task_end_adapter(self, view) -> list[torch.Tensor]:
        with view.timed("bookkeeping"):
            trained = snapshot(view.params)
            if self.chain == "trained":
                self.last_trained = trained
            if self.vectors == "latest":
                base, vectors = self.start, [(trained, self.start)]
            else:
                self.trained.append(trained)
                if not self.cumulative:
                    self.starts.append(self.start)
                base = self.initial
                starts = [self.initial] * len(self.trained) if self.cumulative else self.starts
                vectors = list(zip(self.trained, starts))
            layers = lora_layers(view.model, view.params)
            space = self.settings.merge_space
            calls = len(layers.pairs) + len(layers.others) if space == "delta" else len(view.params)
            weights = self.rule_weights(len(vectors))
            merged, residual = merge_adapters(self.rule, base, vectors, weights, layers, space,
                                              self.rule_kwargs(view, calls))
        view.emit({"event": "task_merge", "step": view.step, "rule": self.rule, "space": space, "chain": self.chain,
                   "task_vectors": len(vectors), "weights": list(weights), "refactor_residual": residual})
        return merged

    def state_dict(self) -> dict:
        def cpu(ts):
            return [t.detach().cpu() for t in ts]

        state: dict = {}
        if self.initial is not None:
            state["initial"] = cpu(self.initial)
        if self.trained:
            state["trained"] = [cpu(t) for t in self.trained]
        if self.starts:
            state["starts"] = [cpu(t) for t in self.starts]
        if self.last_trained is not None:
            state["last_trained"] = cpu(self.last_trained)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self.initial = state.get("initial")
        self.trained = list(state.get("trained", []))
        self.starts = list(state.get("starts", []))
        self.last_trained = state.get("last_trained")

    def _to(self, device) -> None:
        def move(ts):
            return None if ts is None else [t.to(device) for t in ts]

        self.initial = move(self.initial)
        self.trained = [move(t) for t in self.trained]
        self.starts = [move(t) for t in self.starts]
        self.last_trained = move(self.last_trained)


@register_method
class TaskArithmetic(TaskMerging):
    """``task-arithmetic``: each task trains from the merged adapter; then merged = previous merged
    + alpha * (trained - previous merged). See the module docstring."""

    name = "task-arithmetic"
    paper = "Task arithmetic (Ilharco et al., ICLR 2023), merged after every task"
    summary = ("each task trains from the merged adapter; then merged = previous merged + alpha x task vector "
               "(--merge-alpha)")
    Settings = TaskArithmeticSettings
    rule = "weighted-sum"

    def rule_weights(self, n: int) -> list[float]:
        return [self.settings.merge_alpha] * n


@register_method
class Ties(TaskMerging):
    """``ties``: each task trains from the merged adapter; then merged = theta_0 + TIES over the
    task vectors of all tasks so far (trim, elect sign, disjoint mean, scale). Module docstring."""

    name = "ties"
    paper = "TIES-Merging (Yadav et al., NeurIPS 2023), merged after every task"
    summary = ("each task trains from the merged adapter; then TIES over all task vectors so far: trim to the top "
               "k %, elect signs, disjoint mean, scale (--ties-density, --ties-lambda)")
    Settings = TiesSettings
    rule = "ties"
    vectors = "all"

    def rule_weights(self, n: int) -> list[float]:
        return [self.settings.ties_lambda] * n

    def rule_params(self) -> dict:
        return {"density": self.settings.ties_density, "majority_sign": self.settings.ties_sign}


@register_method
class Dare(TaskMerging):
    """``dare``: each task trains from the merged adapter; then merged = previous merged + w *
    DARE_p(task vector), the drop masks seeded per stage and layer. Module docstring."""

    name = "dare"
    paper = "DARE (Yu et al., ICML 2024), merged after every task"
    summary = ("each task trains from the merged adapter; then its task vector is dropped with rate p, rescaled by "
               "1/(1-p) and added (--dare-rate, --dare-weight)")
    Settings = DareSettings
    rule = "dare"

    def rule_weights(self, n: int) -> list[float]:
        return [self.settings.dare_weight] * n

    def rule_params(self) -> dict:
        return {"rate": self.settings.dare_rate}

    def rule_kwargs(self, view, calls: int) -> Callable[[int], dict]:
        rng = view.rng("dare")  # seeded from the run seed and the stage: the same on every process and on resume
        seeds = [rng.getrandbits(63) for _ in range(calls)]
        values = resolve_params(self.rule, self.rule_params())
        return lambda call: {**values, "seed": seeds[call]}


@register_method
class MagMax(TaskMerging):
    """``magmax``: sequential fine-tuning; after each task the evaluated adapter is theta_0 + lambda
    * (per parameter, the task vector theta_i - theta_0 of largest magnitude over all tasks so far).
    Module docstring."""

    name = "magmax"
    paper = "MagMax (Marczak et al., ECCV 2024)"
    summary = ("sequential fine-tuning; after each task, per parameter the task vector of largest magnitude over all "
               "tasks so far, scaled (--magmax-lambda)")
    Settings = MagMaxSettings
    rule = "magmax"
    chain = "trained"
    vectors = "all"
    cumulative = True

    def rule_weights(self, n: int) -> list[float]:
        return [self.settings.magmax_lambda] * n


__all__ = ["Dare", "LoraLayers", "MagMax", "SPACES", "TaskArithmetic", "TaskMerging", "Ties", "lora_layers",
           "merge_adapters", "refactor"]
