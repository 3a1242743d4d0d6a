"""Scoring a model on tasks: greedy predictions, per-example scores and the task's mean."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.formatting import Formatter
from ..data.stream import TaskData
from .generate import generate_predictions
from .scoring import SCORERS


@dataclass
class TaskEvaluation:
    task: str
    score: float  # mean of the per-example scores
    rows: list[dict]  # {id, prompt, gold, prediction, score} per evaluated example (prompt: the text the model read)


def evaluate_tasks(model, formatter: Formatter, data: dict[str, TaskData], tasks: list[str], *, batch_size: int,
                   max_new_tokens: int | None = None, accelerator=None, label: str = "",
                   progress: bool = True, autocast_dtype=None, deal_batches: bool = True) -> dict[str, TaskEvaluation]:
    """Score ``model`` on the evaluation split of each of ``tasks`` with the task's metric;
    ``max_new_tokens`` defaults to the task's longest training answer (EOS included);
    ``autocast_dtype`` (e.g. ``torch.bfloat16``): generate under autocast to that dtype;
    ``deal_batches``: see :func:`generate_predictions`."""
    out: dict[str, TaskEvaluation] = {}
    for task in tasks:
        d = data[task]
        needed = formatter.max_new_tokens(d.outputs)  # the longest training answer and EOS
        max_new = max_new_tokens or needed
        preds = generate_predictions(model, formatter, d.test, batch_size=batch_size, max_new_tokens=max_new,
                                     accelerator=accelerator, desc=f"{label} eval {task}", progress=progress,
                                     autocast_dtype=autocast_dtype, first_pass_tokens=needed,
                                     deal_batches=deal_batches)
        scorer = SCORERS[d.metric]
        per = [scorer(p, e.output) for p, e in zip(preds, d.test)]
        rows = [{"id": e.id, "prompt": formatter.prompt_text(e), "gold": e.output, "prediction": p, "score": s}
                for e, p, s in zip(d.test, preds, per)]
        out[task] = TaskEvaluation(task, sum(per) / len(per), rows)
    return out
