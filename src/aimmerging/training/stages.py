"""The stages of a run: one per task (one for all tasks of a ``joint`` method), and which tasks
are evaluated after each (its row of the accuracy matrix)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.stream import check_task_name


@dataclass
class Stage:
    """One training stage: ``index`` in the run, its name, and the tasks it trains on."""

    index: int
    name: str
    train_tasks: list[str]
    row: int  # row of the accuracy matrix this stage fills
    eval_tasks: list[str] = field(default_factory=list)

    @property
    def dirname(self) -> str:
        """The stage's folder under ``RUN_DIR/stages/`` (the one place this name is built)."""
        return stage_dirname(self.index, self.name)


def stage_dirname(index: int, name: str) -> str:
    """``NN-<name>``; a name that is a path is refused (one line), never joined into one."""
    return f"{index:02d}-{check_task_name(name)}"


def plan_stages(method, tasks: list[str], scope: str) -> list[Stage]:
    """The stages of a run and the tasks evaluated after each (its row of the matrix)."""
    T = len(tasks)
    if method.joint:
        return [Stage(0, "all", list(tasks), row=T - 1, eval_tasks=list(tasks))]
    stages = []
    for i, task in enumerate(tasks):
        if scope == "all":
            evals = tasks[: i + 1]
        elif method.fresh_adapter_per_task or i < T - 1:
            evals = [task]  # the diagonal (BWT, FWT) ...
        else:
            evals = list(tasks)  # ... and the last row (OP, BWT)
        stages.append(Stage(i, task, [task], row=i, eval_tasks=list(evals)))
    return stages
