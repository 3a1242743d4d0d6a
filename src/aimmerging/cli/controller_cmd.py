"""``aimmerging controller replay TRACE``: what a (possibly different) merge schedule would have
done on a recorded run. Prints one JSON object per merge on stdout."""

from __future__ import annotations

import argparse
import json


def register(sub, argv=None) -> None:
    from ..controller import SCHEDULES, ControllerConfig
    from .flags import add_option_flags
    from .main import Parser

    ctl = sub.add_parser("controller", help="merge-controller tools").add_subparsers(
        dest="controller_command", metavar="SUBCOMMAND", parser_class=Parser)
    ctl.required = True
    p = ctl.add_parser("replay", help="replay a trace.jsonl through the controller; one JSON line per merge")
    p.add_argument("trace", help="trace.jsonl of a run (or of one stage)")
    p.add_argument("--task", help="only this task (default: every task in the trace)")
    p.add_argument("--schedule", dest="schedule", default=argparse.SUPPRESS,
                   metavar="{" + ",".join(SCHEDULES) + "}", help="controller schedule (default: the one recorded in the trace)")
    add_option_flags(p, ControllerConfig, group="merging", skip={"schedule"})
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..controller import SCHEDULES, ControllerConfig, replay_records
    from ..errors import UserError
    from ..settings import coerce
    from ..trace import read_trace, split_tasks

    names = {f.name for f in fields(ControllerConfig)}
    records = read_trace(args.trace)
    for n, rec in enumerate(records, 1):
        step = rec.get("step")
        if rec.get("event", "step") in ("step", "merge") and (isinstance(step, bool) or not isinstance(step, (int, float))):
            raise UserError(f"{args.trace}: line {n}: 'step' must be a number, got {step!r}")
    traces = split_tasks(_index_tasks_by_name(records))
    if args.task:
        chosen = [t for t in traces if t.name == args.task]
        if not chosen:
            known = ", ".join(t.name for t in traces) or "none"
            raise UserError(f"{args.trace}: no records for task '{args.task}' (tasks: {known})")
        traces = chosen
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if "schedule" in overrides and overrides["schedule"] not in SCHEDULES:
        raise UserError(f"schedule: '{overrides['schedule']}' is not one of {', '.join(SCHEDULES)}")
    replayed = 0
    for trace in traces:
        base = dict(trace.controller or {})
        if not base and not overrides:
            continue  # a task without merging (e.g. the first task): nothing to replay
        base.update({k: (v if k == "schedule" else coerce(ControllerConfig, k, v)) for k, v in overrides.items()})
        try:
            config = ControllerConfig.from_dict(base)
        except (TypeError, ValueError) as e:
            raise UserError(f"controller options: {e}") from None
        try:
            decisions = replay_records(trace.steps, config)
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{args.trace}: task '{trace.name}': {e}") from None
        replayed += 1
        for d in decisions:
            print(json.dumps({"task": trace.name, **d.to_dict()}))
    if not replayed:
        raise UserError(f"{args.trace}: no task with merge-controller settings; pass --schedule to replay anyway")
    return 0


def _index_tasks_by_name(records: list[dict]) -> list[dict]:
    """The records, each with a ``task_index``: a record without one (a hand-made trace) gets the
    index of the first record of the same task name (a new one, after every index in use, for a
    name not seen yet), so that the records of one task form one trace instead of a task each."""
    def valid(index) -> bool:
        return isinstance(index, int) and not isinstance(index, bool)

    by_name: dict[str, int] = {}
    for rec in records:
        if rec.get("task") is not None and valid(rec.get("task_index")):
            by_name.setdefault(str(rec["task"]), rec["task_index"])
    following = max(by_name.values(), default=-1) + 1
    out = []
    for rec in records:
        name = rec.get("task")
        if name is not None and not valid(rec.get("task_index")):
            if str(name) not in by_name:
                by_name[str(name)] = following
                following += 1
            rec = {**rec, "task_index": by_name[str(name)]}
        out.append(rec)
    return out
