"""``aimmerging controller replay TRACE``: what a (possibly different) merge schedule would have
done on a recorded run. Prints one JSON object per merge on stdout."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..controller import SCHEDULES, ControllerConfig
from ..errors import UserError
from ..io import read_trace

CONTROLLER_FLAGS = {f.name for f in fields(ControllerConfig)}


def register(sub) -> None:
    from .main import _Parser, add_config_flags

    ctl = sub.add_parser("controller", help="merge-controller tools").add_subparsers(
        dest="controller_command", metavar="SUBCOMMAND", parser_class=_Parser)
    ctl.required = True
    p = ctl.add_parser("replay", help="replay a trace.jsonl through the controller; one JSON line per merge")
    p.add_argument("trace", help="trace.jsonl of a run (or of one stage)")
    p.add_argument("--task", help="only this task (default: every task in the trace)")
    p.add_argument("--schedule", dest="schedule", default=argparse.SUPPRESS,
                   metavar="{reference,paper,fixed,end}", help="controller schedule (default: the one recorded in the trace)")
    add_config_flags(p, only_groups={"merging"}, skip={"schedule", "probe_mode", "outer_optimizer", "outer_lr"})
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from ..config import coerce
    from ..controller import replay_records

    records = read_trace(args.trace)
    tasks: dict[str, list[dict]] = {}
    settings: dict[str, dict] = {}
    for rec in records:
        task = rec.get("task")
        if task is None:
            continue
        if rec.get("event") == "task_start" and isinstance(rec.get("controller"), dict):
            settings[task] = rec["controller"]
        elif rec.get("event", "step") == "step" and "step" in rec:
            tasks.setdefault(task, []).append(rec)
    if args.task:
        if args.task not in tasks:
            raise UserError(f"{args.trace}: no records for task '{args.task}' (tasks: {', '.join(tasks) or 'none'})")
        tasks = {args.task: tasks[args.task]}
    overrides = {k: v for k, v in vars(args).items() if k in CONTROLLER_FLAGS}
    if "schedule" in overrides and overrides["schedule"] not in SCHEDULES:
        raise UserError(f"schedule: '{overrides['schedule']}' is not one of {', '.join(SCHEDULES)}")
    replayed = 0
    for task, recs in tasks.items():
        base = dict(settings.get(task, {}))
        if not base and not overrides:
            continue  # a task without merging (e.g. the first task): nothing to replay
        base.update({k: (v if k == "schedule" else coerce(k, v)) for k, v in overrides.items()})
        try:
            config = ControllerConfig.from_dict(base)
        except (TypeError, ValueError) as e:
            raise UserError(f"controller options: {e}") from None
        try:
            decisions = replay_records(recs, config)
        except ValueError as e:
            raise UserError(f"{args.trace}: task '{task}': {e}") from None
        replayed += 1
        for d in decisions:
            print(json.dumps({"task": task, **d.to_dict()}))
    if not replayed:
        raise UserError(f"{args.trace}: no task with merge-controller settings; pass --schedule to replay anyway")
    return 0
