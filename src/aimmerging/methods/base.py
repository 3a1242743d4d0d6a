"""What a continual-learning method is: a small class with settings, flags and hooks.

A method subclasses :class:`Method`, sets ``name`` (its registry name), optionally a ``Settings``
dataclass (its own options, declared with :func:`aimmerging.settings.option`: they become flags
and YAML keys), and overrides the hooks it needs. The training loop calls, per stage (one task,
or all tasks at once for a ``joint`` method):

* ``before_task(view)`` once before the first step;
* per inner optimizer step: ``extra_examples(view, micro_batch)`` for every micro-batch (replay
  mixing), ``extra_loss(view, inputs)`` for every micro-batch's forward pass (regularisers,
  distillation, orthogonality terms), then after the update ``after_step(view, record)``
  (probes, merges; may fill the step's trace record and return extra records);
* ``after_task(view)`` once after the last step and, under model selection
  (``--select-best-every``), after the selected checkpoint is restored, so that a task-end merge
  acts on the adapter that is scored (may return trace records), then
  ``task_end_adapter(view)``, which may return new adapter values (task-arithmetic style merges):
  those are evaluated, saved and carried on to the next task.

Methods see the training state only through the :class:`TrainingView` they are handed. A
method's state that must survive a resume (e.g. an accumulated Fisher matrix) goes in
``state_dict()``; it is saved with every stage and given back with ``load_state_dict()``.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

import torch

from ..data.memory import ReplayMemory
from ..data.olora import Example


@dataclass(frozen=True)
class StageInfo:
    index: int  # 0-based position in the run
    name: str  # the task's name ("all" for a joint stage)
    train_tasks: tuple[str, ...]  # the tasks this stage trains on


@dataclass
class LossInputs:
    """One micro-batch's forward pass on this process, for ``extra_loss``: the examples of this
    process's share, the logits of the answer positions and their labels (-100 where ignored)."""

    examples: Sequence[Example]
    logits: torch.Tensor  # (batch, positions, vocab)
    labels: torch.Tensor  # (batch, positions)
    scale: float  # what the micro-batch's loss is multiplied by (1 / accumulation steps)
    # hidden-state groups when the method asked for them (``Method.training_hidden_states``): per
    # group (the layer outputs after the embeddings, the mask of the tokens they cover); a causal
    # model has one group, an encoder-decoder two (encoder at the input tokens, decoder at the answer)
    hidden: Optional[list] = None


@dataclass
class ForwardOutput:
    """A forward pass a method asked for (``TrainingView.forward``): the logits of the answer
    positions and their labels (as ``LossInputs`` has them), the batch's mean answer-token loss
    (with gradients when asked) and the hidden-state groups when asked (see ``LossInputs.hidden``)."""

    logits: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor
    hidden: Optional[list] = None


class TrainingView(Protocol):
    """What a method may read and do while a stage trains (implemented by the training loop)."""

    stage: StageInfo
    step: int  # the inner step just taken (0 before the first)
    max_steps: int
    seed: int
    grad_accum: int  # micro-batches per optimizer step
    memory_batch_size: int  # examples per probe or replay batch (``--memory-batch-size``)
    params: list[torch.nn.Parameter]  # the trainable LoRA tensors, in a fixed order
    model: Any  # the PEFT model (for extra forward passes, e.g. a teacher's)
    memory: ReplayMemory  # examples of earlier tasks (empty unless the method ``uses_memory``)
    optimizer: torch.optim.Optimizer  # the stage's optimizer

    def rng(self, name: str) -> random.Random:
        """A random stream of this stage, seeded from the run seed, the stage and ``name``; the same
        on every process."""

    def mean_loss(self, examples: Sequence[Example], train_mode: bool) -> float:
        """Mean answer-token loss of ``examples``, no gradients (dropout on in train mode)."""

    def forward(self, examples: Sequence[Example], *, rows: Optional[Sequence[int]] = None,
                adapter: Optional[Sequence[torch.Tensor]] = None, train_mode: bool = False, grad: bool = False,
                hidden_states: bool = False) -> ForwardOutput:
        """A forward pass of ``examples`` on this process, collated as one batch (``rows``: only those
        rows of it, padded as the whole batch: e.g. some rows of ``LossInputs.examples``, whose
        positions then line up with the training forward's), with the LoRA tensors holding
        ``adapter`` for the pass (a teacher; put back bit for bit afterwards), dropout only in
        ``train_mode``, gradients only with ``grad``, under the run's autocast."""

    def log(self, name: str, value: float) -> None:
        """Add ``value`` to this step's ``name`` term: the step's trace record gets the mean of the
        values logged during the step (e.g. a regulariser's size per micro-batch)."""

    def update(self, examples: Sequence[Example], optimizer: torch.optim.Optimizer, loss_scale: float,
               penalty: Optional[Callable[[], torch.Tensor]] = None) -> Optional[float]:
        """One optimizer update on ``examples`` (as one batch, chunked into micro-batches), of
        ``loss_scale`` x (their mean answer loss + ``penalty()`` when given: a term of the LoRA
        tensors alone, added once); the stage's LR scheduler is not stepped. Returns the mean answer
        loss, None when the update was skipped."""

    def timed(self, category: str) -> AbstractContextManager:
        """Count the wall time of a block under ``category`` in the run's cost table."""

    def emit(self, record: dict) -> None:
        """Append a record to the stage's trace (``task`` and ``task_index`` are added)."""


class Method:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # where the method comes from (README table)
    summary: ClassVar[str] = ""  # one line on what it does (README table, --help)
    Settings: ClassVar[Optional[type]] = None  # dataclass of the method's own options
    uses_memory: ClassVar[bool] = False  # give every stage a replay memory of earlier tasks
    fresh_adapter_per_task: ClassVar[bool] = False  # start every task from the initial adapter (``single``)
    joint: ClassVar[bool] = False  # one stage on all tasks together (``mtl``)
    in_bench: ClassVar[bool] = True  # compared by ``aimmerging bench`` (reference runs such as ``single`` are not)
    # runs forward passes of its own (``view.forward``: a teacher, a Fisher pass) on each process's
    # share; not under --fsdp, where every forward pass needs every process (refused in one line)
    own_forward_passes: ClassVar[bool] = False
    # the training forward also returns hidden states (``LossInputs.hidden``); may be switched per
    # stage in ``before_task`` (an instance attribute)
    training_hidden_states: bool = False

    def __init__(self, settings: Any = None):
        if settings is None and self.Settings is not None:
            settings = self.Settings()
        self.settings = settings

    def adapter_rank_multiplier(self, n_tasks: int) -> int:
        """The run's adapter is built with rank ``lora_r`` x this and alpha ``lora_alpha`` x this (so
        PEFT's scaling alpha / r is unchanged). Called once, before the model is built, with the
        number of tasks of the stream. O-LoRA returns ``n_tasks``: one rank slot per task."""
        return 1

    def before_task(self, view: TrainingView) -> None:
        """Called once before the first step of a stage."""

    def extra_examples(self, view: TrainingView, micro_batch: list[Example]) -> list[Example]:
        """Examples to add to a training micro-batch (replay mixing)."""
        return []

    def extra_loss(self, view: TrainingView, inputs: LossInputs) -> Optional[torch.Tensor]:
        """A scalar added to the training loss of this micro-batch (before the accumulation
        scaling, which the loop applies), or None. Under several processes every process adds its
        own term and DDP averages the gradients."""
        return None

    def after_step(self, view: TrainingView, record: dict) -> list[dict] | None:
        """Called after every inner optimizer step; may fill ``record`` and return extra trace records."""
        return None

    def after_task(self, view: TrainingView) -> list[dict] | None:
        """Called once after the last step of a stage (and after model selection restored the
        selected checkpoint); may return trace records."""
        return None

    def task_end_adapter(self, view: TrainingView) -> Optional[list[torch.Tensor]]:
        """New values for ``view.params`` at the end of the stage (evaluated, saved and carried on),
        or None to keep the trained adapter."""
        return None

    def state_dict(self) -> dict:
        """State to keep across stages when a run resumes (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (called on resume before the next stage)."""
