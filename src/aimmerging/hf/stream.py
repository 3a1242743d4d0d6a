"""A task stream through Hugging Face trainers: one fresh ``Trainer`` per task on the same PEFT
model, any registered method through :class:`~aimmerging.hf.callback.ContinualCallback` (one
method object for the whole stream), the replay memory built with the reference rule, every seen
task evaluated after each task, OP and BWT."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ..data.memory import ReplayMemory
from ..data.olora import Example
from ..errors import ConfigError, UserError
from ..evaluation.metrics import all_metrics
from ..models.lora import lora_parameters, restore, snapshot
from ..runs.layout import RunLayout
from .callback import ContinualCallback
from .data import as_examples, label_of
from .host import Row, as_rows, row_id
from .results import write_stream_results
from .settings import make_method, settings_mapping
Evaluate = Callable[[Any, str, list], float]  # (model, task name, examples) -> score in [0, 1]


@dataclass
class StreamResult:
    """What :func:`train_stream` returns (``a[i][j]``: score on task j after training task i)."""

    tasks: list[str]
    accuracy_matrix: list[list[Optional[float]]]
    metrics: dict[str, Optional[float]]  # op, bwt, fwt (fwt is None: no single-task reference)
    trace: list[dict]  # the callbacks' trace records, in order
    model: Any  # the trained PEFT model
    output_dir: Optional[Path]
    merges: list[int] = field(default_factory=list)  # merges per task


def _tokenizer_of(trainer, tokenizer):
    tok = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
    return getattr(tok, "tokenizer", tok)  # a processor holds its tokenizer


def generation_score(model, tokenizer, task: str, examples: Sequence[Example], *, batch_size: int = 16,
                     max_new_tokens: Optional[int] = None, max_input_tokens: int = 1024, accelerator=None) -> float:
    """Greedy generation and the task's metric (exact match, or ROUGE-L for free text, as
    aimmerging's runner: ``aimmerging.evaluation``). ``max_new_tokens`` defaults to the longest
    gold answer (+ EOS); prompts are the examples' ``input`` text, tokenised as the runner does."""
    from ..data.formatting import Formatter
    from ..evaluation.generate import generate_predictions
    from ..evaluation.scoring import SCORERS, choose_metric
    from ..models.loading import model_kind

    examples = list(examples)
    if not examples:
        raise UserError(f"task '{task}': no evaluation examples")
    formatter = Formatter(tokenizer, model_kind(model.config), max_input_tokens)
    max_new = max_new_tokens or formatter.max_new_tokens([e.output for e in examples])
    preds = generate_predictions(model, formatter, examples, batch_size=batch_size, max_new_tokens=max_new,
                                 accelerator=accelerator, desc=f"eval {task}", progress=False)
    scorer = SCORERS[choose_metric(task, (e.output for e in examples))]
    return sum(scorer(p, e.output) for p, e in zip(preds, examples)) / len(examples)


def _rows(dataset: Any) -> list:
    return list(dataset) if not isinstance(dataset, list) else dataset


def train_stream(tasks: Sequence[tuple[str, Any, Any]], trainer_factory: Callable[[Any, Any, list], Any], *,
                 model: Any, tokenizer: Any = None, method: Any = "aimmerging", memory_ratio: float = 2.0,
                 memory_cap_per_task: Optional[int] = None, memory_rows: Optional[Sequence[Any]] = None,
                 seed: int = 42, evaluate: Optional[Evaluate] = None, output_dir: Optional[str] = None,
                 memory_batch_size: int = 32, config: Any = None, settings: Optional[Mapping[str, Any]] = None,
                 eval_batch_size: int = 16, max_new_tokens: Optional[int] = None, max_input_tokens: int = 1024,
                 **options: Any) -> StreamResult:
    """Train ``tasks`` one after another with Hugging Face trainers and a continual-learning method
    (any registered one but ``mtl``: a name, a ``Method`` class or object, ``module:Class``);
    evaluate every seen task after each.

    ``tasks``: ``(name, train_dataset, eval_examples)`` triples in stream order. ``train_dataset``
    is what the factory's trainer trains on (tokenised rows for a ``Trainer``, raw or chat rows
    for an ``SFTTrainer``: anything the trainer accepts, without packing). ``eval_examples`` are
    :class:`~aimmerging.data.olora.Example` objects or rows ``{"input", "output"}`` / chat rows
    ``{"messages": [...]}`` (prompts rendered with the tokenizer's chat template).

    ``trainer_factory(model, train_dataset, callbacks)`` returns a fresh trainer for one task,
    which must pass ``callbacks`` on (``Trainer(..., callbacks=callbacks)``). ``model`` is the PEFT
    model of the first task; each later task gets the model the previous trainer trained.

    The loop, per task k::

        memory = ReplayMemory.reference(training rows of tasks < k, memory_ratio, seed)   # reference rule
        callback = ContinualCallback(method, memory rows, task=name, task_index=k, seed=seed, ...)
        trainer = trainer_factory(model, train_dataset, [callback]); callback.attach(trainer)
        trainer.train()                       # the method's hooks, its batches and loss terms, trace
        row k of the accuracy matrix = evaluate(model, task j, eval examples j) for j <= k

    The memory rows (only for a method that uses a memory) are the rows the earlier trainers
    trained on (``trainer.train_dataset``, as the trainer prepared them), chosen per class
    (:func:`aimmerging.hf.data.label_of`: the answer text, else the label tokens) with
    ``memory_ratio`` percent of each task (at least one per class; ``memory_cap_per_task`` caps a
    task's share); ``memory_rows`` (one sequence of rows per task) replaces that rule.
    ``evaluate(model, task_name, examples) -> score`` defaults to greedy generation with exact match
    (ROUGE-L for free-text tasks), sharded over the processes. The method's options come as
    ``settings`` (a mapping) and keyword ``options`` (``initial_interval=8``, ``ewc_lambda=100``,
    ``fusion="ties"``, ...; for AIMMerging also ``config``, a ControllerConfig); a method that
    starts every task afresh (``single``) gets the initial adapter back before each task.

    Writes ``trace.jsonl`` (started afresh) and ``results.json`` (tasks, accuracy matrix, metrics,
    ``complete``) into ``output_dir`` (default: the first trainer's ``args.output_dir``), so
    ``aimmerging plot DIR`` and ``aimmerging controller replay DIR/trace.jsonl`` work on it.
    Returns a :class:`StreamResult`.

    Example::

        from transformers import Trainer, TrainingArguments
        from aimmerging.hf import PadCollator, tokenize_examples, train_stream

        def factory(model, train_dataset, callbacks):
            args = TrainingArguments("runs/hf", max_steps=100, per_device_train_batch_size=8,
                                     learning_rate=3e-4, report_to="none")
            return Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=callbacks,
                           data_collator=PadCollator(tok.pad_token_id))

        result = train_stream([(name, tokenize_examples(train, tok), test) for name, train, test in data],
                              factory, model=peft_model, tokenizer=tok, method="ewc", ewc_lambda=100)
        print(result.accuracy_matrix, result.metrics)
    """
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("train_stream: no tasks")
    for item in tasks:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ConfigError("train_stream: every task is a (name, train_dataset, eval_examples) triple")
    names = [str(t[0]) for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"train_stream: a task name is listed twice in {names}")
    if not 0 < memory_ratio <= 100:
        raise ConfigError("memory_ratio: a percentage in (0, 100]")
    T = len(tasks)
    if memory_rows is not None and len(memory_rows) != T:
        raise ConfigError(f"memory_rows: one sequence of rows per task ({T}), got {len(memory_rows)}")
    values = {**dict(settings_mapping(config) or {}), **dict(settings or {})}
    method_obj = make_method(method, values, options, n_tasks=T)  # checked once, before any training
    matrix: list[list[Optional[float]]] = [[None] * T for _ in range(T)]
    history: list[tuple[str, Any, list[str]]] = []  # (task, rows the trainer trained on, their classes)
    evals: dict[str, list[Example]] = {}
    records: list[dict] = []
    merges: list[int] = []
    out: Optional[Path] = Path(output_dir) if output_dir is not None else None
    initial = None

    for k, (name, train_dataset, eval_items) in enumerate(tasks):
        memory: list = []
        if method_obj.uses_memory and k > 0:
            memory = (as_rows(memory_rows[k], "memory") if memory_rows is not None
                      else _memory_rows(history, memory_ratio, seed, memory_cap_per_task))
        callback = ContinualCallback(method_obj, memory, task=names[k], task_index=k, seed=seed,
                                     memory_batch_size=memory_batch_size,
                                     output_dir=str(out) if out is not None else None, write_results=False)
        trainer = trainer_factory(model, train_dataset, [callback])
        if callback not in trainer.callback_handler.callbacks:
            raise ConfigError("train_stream: the trainer_factory must pass `callbacks` on to the trainer "
                              "(Trainer(..., callbacks=callbacks))")
        callback.attach(trainer)
        model = trainer.model
        try:
            params = lora_parameters(model)
        except RuntimeError:
            raise UserError("train_stream: the trainer's model has no trainable LoRA parameters (pass a PEFT model)") from None
        if method_obj.fresh_adapter_per_task:  # every task starts from the initial adapter
            if initial is None:
                initial = snapshot(params)
            else:
                restore(params, initial)
        main = trainer.is_world_process_zero()
        if out is None:
            out = Path(trainer.args.output_dir)
            callback.output_dir = str(out)
        if k == 0 and main:
            out.mkdir(parents=True, exist_ok=True)
            RunLayout(out).trace.unlink(missing_ok=True)  # a fresh trace: the callbacks append
            RunLayout(out).results.unlink(missing_ok=True)
        tok = _tokenizer_of(trainer, tokenizer)
        evals[names[k]] = as_examples(eval_items, names[k], tok)

        trainer.train()
        records.extend(callback.records)
        merges.append(sum(r["event"] == "merge" for r in callback.records))

        trained_rows = trainer.train_dataset
        raw = _rows(train_dataset)
        if method_obj.uses_memory and memory_rows is None and len(trained_rows) != len(raw):
            raise UserError(f"task '{names[k]}': the trainer trained on {len(trained_rows)} rows made from "
                            f"{len(raw)} (packing?); the replay memory needs one trained row per example")
        history.append((names[k], trained_rows, [label_of(r) for r in raw]))

        for j in range(k + 1):
            if evaluate is not None:
                score = float(evaluate(model, names[j], evals[names[j]]))
            else:
                score = generation_score(model, tok, names[j], evals[names[j]], batch_size=eval_batch_size,
                                         max_new_tokens=max_new_tokens, max_input_tokens=max_input_tokens,
                                         accelerator=trainer.accelerator)
            matrix[k][j] = score if math.isfinite(score) else None
        if main:
            write_stream_results(out, names, matrix, model, method_obj.name, complete=k == T - 1)

    return StreamResult(tasks=names, accuracy_matrix=matrix, metrics=all_metrics(matrix), trace=records,
                        model=model, output_dir=out, merges=merges)


def _memory_rows(history: list[tuple[str, Any, list[str]]], ratio: float, seed: int, cap: Optional[int]) -> list[Row]:
    """The reference memory over the earlier tasks' trained rows (``ReplayMemory.reference`` on
    stand-in examples that carry each row's index and class), as rows of their tasks."""
    if not history:
        return []
    stand_ins = [[Example(id=str(i), input="", output=label, task=name) for i, label in enumerate(labels)]
                 for name, _, labels in history]
    memory = ReplayMemory.reference(stand_ins, ratio, seed, cap)
    rows = {name: trained for name, trained, _ in history}
    return [Row(dict(row), e.task, row_id(row)) for e in memory for row in [rows[e.task][int(e.id)]]]
