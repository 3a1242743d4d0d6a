"""Any aimmerging method inside a Hugging Face ``Trainer`` / TRL ``SFTTrainer``: one
``TrainerCallback`` per task, a thin adapter from the trainer's events to the method's hooks
(``before_task`` at ``on_train_begin``, ``after_step`` after every optimizer step, ``after_task``
and ``task_end_adapter`` at ``on_train_end``) through a :class:`~aimmerging.hf.host.TrainerView`.

A method that mixes memory rows into the batches or adds a loss term (replay, EWC, LwF, O-LoRA,
I-LoRA, ...) needs the trainer itself: ``ContinualCallback.for_trainer(trainer, ...)`` or
``callback.attach(trainer)`` before ``trainer.train()`` (:func:`aimmerging.hf.host.install`). A
method's state between tasks (EWC's Fisher, task vectors) lives in the method object: give the
next task's callback the same one (``method=callback.method``), as ``train_stream`` does. The
memory: rows in the form of the trainer's own training rows (with ``labels``), empty on the
first task. The trace (``<output_dir or args.output_dir>/trace.jsonl``) gets the records of
aimmerging's own loop; ``write_results`` keeps a minimal ``results.json`` for ``aimmerging plot``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from ..data.memory import ReplayMemory
from ..errors import ConfigError
from ..io import json_safe
from ..methods.base import Method, StageInfo
from ..runs.layout import RunLayout
from ..training.engine import Timers
from ..training.loop import finish_stage, refuse_non_finite_adapter
from .host import TrainerView, as_rows, install, reduce_sum, _dist
from .results import write_callback_results
from .settings import make_method, settings_mapping


class ContinualCallback(TrainerCallback):
    """A registered method (a name, a ``Method`` class or instance, ``module:Class``) on one task
    inside a trainer; ``settings`` / keyword options are the method's own (``ewc_lambda=100``,
    ``initial_interval=8``, ``fusion="ties"``, ...), refused in one line when unknown or bad.
    ``n_tasks``: the stream's length, for a method whose adapter has one slot per task (O-LoRA)."""

    def __init__(self, method: Any = "aimmerging", memory: Any = (), *, task: str = "task", task_index: int = 0,
                 seed: int = 42, memory_batch_size: int = 32, output_dir: Optional[str] = None,
                 write_results: bool = True, n_tasks: Optional[int] = None, settings: Any = None, **options: Any):
        if not isinstance(memory_batch_size, int) or memory_batch_size < 1:
            raise ConfigError(f"memory_batch_size: must be a positive integer, got {memory_batch_size!r}")
        if not isinstance(task_index, int) or task_index < 0:
            raise ConfigError(f"task_index: must be an integer >= 0, got {task_index!r}")
        self.method: Method = make_method(method, settings, options, n_tasks)
        self.memory = ReplayMemory(as_rows(memory, "memory") if self.method.uses_memory else [])
        self.task, self.task_index, self.seed = str(task), task_index, seed
        self.memory_batch_size, self.output_dir, self.write_results = memory_batch_size, output_dir, write_results
        self.trainer = self.view = self.last_view = self.collate = None
        self.records: list[dict] = []  # every record this callback emitted (on every process)
        self.timers, self._kept, self._trace = Timers(), {}, None

    @classmethod
    def for_trainer(cls, trainer, *args: Any, **kwargs: Any) -> "ContinualCallback":
        """A callback attached to ``trainer`` and added to its callbacks."""
        trainer.add_callback(cb := cls(*args, **kwargs).attach(trainer))
        return cb

    def attach(self, trainer) -> "ContinualCallback":
        """Remember the trainer (the per-step training loss) and wrap its collator and ``compute_loss``
        for the method's batch rows and loss term (:func:`~aimmerging.hf.host.install`)."""
        self.trainer = trainer
        install(trainer, self)
        return self

    # -- what the wrapped collator and compute_loss hand each other -------------------------------------------
    def keep_rows(self, rows: list) -> int:
        self._kept[key := max(self._kept, default=0) + 1] = rows
        return key

    def take_rows(self, key: Optional[int]):
        return self._kept.pop(key, None)

    def _emit(self, record: dict) -> None:
        record = json_safe({"task": self.task, "task_index": self.task_index, **record})
        self.records.append(record)
        if self._trace is not None:
            self._trace.write(json.dumps(record, allow_nan=False) + "\n")
            self._trace.flush()

    def _running_loss(self) -> Optional[float]:
        return float(t) if (t := getattr(self.trainer, "_tr_loss", None)) is not None else None

    # -- TrainerCallback events ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        m = self.method
        needs_trainer = (type(m).extra_examples is not Method.extra_examples
                         or type(m).extra_loss is not Method.extra_loss)
        if needs_trainer and (self.trainer is None or args.dataloader_num_workers > 0):
            raise ConfigError(f"method '{m.name}' changes the trainer's batches or loss: attach the callback to its "
                              "trainer (ContinualCallback.for_trainer(trainer, ...) or callback.attach(trainer)) and "
                              "keep its collator in the training process (dataloader_num_workers=0)")
        self._dir = Path(self.output_dir or args.output_dir)
        self._start, self._last_step = state.global_step, 0
        view = TrainerView.for_trainer(args, state, model, optimizer, train_dataloader, self.collate or getattr(
            self.trainer, "data_collator", None), stage=StageInfo(self.task_index, self.task, (self.task,)), seed=self.seed,
            memory=self.memory, memory_batch_size=self.memory_batch_size, emit=self._emit, timers=self.timers)
        if state.is_world_process_zero:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._trace = open(RunLayout(self._dir).trace, "a", encoding="utf-8")
        self.view = view
        m.before_task(view)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.view is not None:
            self._lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
            self._loss_before = self._running_loss()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        view = self.view
        if view is None:
            return
        view.step = self._last_step = state.global_step - self._start
        after, train_loss = self._running_loss(), None
        if after is not None and self._loss_before is not None:
            world = _dist().get_world_size() if _dist() else 1
            train_loss = reduce_sum([after - self._loss_before], view.params[0].device)[0] / world
        record = {"event": "step", "step": view.step, "train_loss": train_loss, "lr": self._lr,
                  "history_loss": None, "delta_in_l1": None, **view.step_terms()}
        extra = self.method.after_step(view, record) or []
        for r in [record, *extra]:
            self._emit(r)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        view, self.view, self.last_view = self.view, None, self.view  # the wrappers pass through from now on
        try:
            if view is not None:
                finish_stage(self.method, view, self._emit, self._last_step)
                refuse_non_finite_adapter(view.model, view.params, self.task, self.method)
        finally:
            if self._trace is not None:
                self._trace.close()
                self._trace = None
        if self.write_results and state.is_world_process_zero:
            write_callback_results(self._dir, self.task_index, self.task, model, self.method.name)


class AIMMergingCallback(ContinualCallback):
    """AIMMerging inside a trainer: :class:`ContinualCallback` with ``method="aimmerging"``.
    ``config``: a :class:`~aimmerging.controller.ControllerConfig` or mapping of controller settings,
    under the keyword options (``initial_interval=2``, ``probe_mode="eval"``, ``fusion="ties"``, ...)."""

    def __init__(self, memory: Any = (), *, config: Any = None, **kwargs: Any):
        super().__init__("aimmerging", memory, settings=settings_mapping(config), **kwargs)

