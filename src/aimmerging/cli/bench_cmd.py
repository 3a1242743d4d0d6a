"""``aimmerging bench``: every method side by side on one stream and model (``aimmerging.bench``);
with ``--orders`` (and ``--seeds``) a study over task orders with confidence intervals,
``aimmerging bench report`` rebuilds a study's report from what is finished, and ``aimmerging
bench archive`` writes its finished runs as small files git carries to the next session."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def register(sub, argv=None) -> None:
    b = sub.add_parser("bench", help="every method side by side on one stream and model: quality, speed, cost; "
                                     "'bench report' rebuilds a study's report")
    b.add_argument("action", nargs="?", choices=("run", "report", "archive"), default="run",
                   help="run (default); report: rebuild report.{md,json,png} of a study (--orders) from its finished "
                        "runs; archive: write each finished run of a study as a small JSON file into --to")
    b.add_argument("--config", default="benchmarks/standard-cl.yaml",
                   help="benchmark config (default: benchmarks/standard-cl.yaml)")
    b.add_argument("--quick", action="store_true", help="the config's quick variant (2 tasks, fewer steps)")
    b.add_argument("--output-dir", default=None,
                   help="default: runs/bench (runs/bench-quick with --quick, runs/study with --orders)")
    b.add_argument("--orders", default=None,
                   help="comma-separated task orders: a study over orders (and --seeds) with 95 %% confidence intervals")
    b.add_argument("--seeds", default=None, help="comma-separated seeds of a study (default: the config's seed)")
    b.add_argument("--data-dir", default=None, help="override the config's data directory")
    b.add_argument("--model", default=None, help="override the config's model")
    b.add_argument("--methods", default=None,
                   help="comma-separated methods to run (default: the config's); a study can be run in shards of methods")
    b.add_argument("--protocol", default=None, choices=("default", "reference"),
                   help="override the config's evaluation protocol (the bench configs use reference)")
    b.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                   help="override the config's training precision (autocast; LoRA weights and merges stay fp32)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--primary", default=None,
                   help="a study's primary comparisons: comma-separated methods compared with aimmerging on OP, "
                        "Holm-adjusted as one family (default: every other method); the rest are secondary, unadjusted")
    b.add_argument("--equivalence-margin", type=float, default=None,
                   help="a study's equivalence margin (two one-sided tests) for the verdict 'equivalent' (default: 0.02)")
    b.add_argument("--archive", default=None, metavar="DIR",
                   help="a study's archive of finished runs (e.g. benchmarks/results/study, committed to git): "
                        "the study skips archived runs and archives each run it finishes; the report reads it too "
                        "(bench report: several, comma-separated)")
    b.add_argument("--reference", default=None,
                   help="bench report: the method every other is compared with (default: aimmerging), e.g. a "
                        "variant's run directory name")
    b.add_argument("--to", default=None, metavar="DIR", help="bench archive: the archive directory to write")
    b.set_defaults(func=cmd_bench)


def _ints(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not values:
        raise ConfigError(f"{flag}: no value given")
    return values


def _comparisons(args: argparse.Namespace) -> dict:
    """The study report's primary family and equivalence margin, as given."""
    out: dict = {}
    if args.primary is not None:
        out["primary"] = [m.strip() for m in args.primary.split(",") if m.strip()]
        if not out["primary"]:
            raise ConfigError("--primary: no method given")
    if args.equivalence_margin is not None:
        if not 0 < args.equivalence_margin < 1:  # also refuses nan and inf
            raise ConfigError(f"--equivalence-margin: must be in (0, 1), got {args.equivalence_margin}")
        out["margin"] = args.equivalence_margin
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    orders, seeds = _ints("--orders", args.orders), _ints("--seeds", args.seeds)
    comparisons = _comparisons(args)
    if comparisons and args.action != "report" and orders is None:
        raise ConfigError("--primary / --equivalence-margin: only for a study (--orders, or 'bench report')")
    if args.archive is not None and (args.action == "archive" or (args.action == "run" and orders is None)):
        raise ConfigError("--archive: only for a study (--orders) or 'bench report'; 'bench archive' writes to --to")
    if (args.to is None) == (args.action == "archive"):
        raise ConfigError("--to DIR: give it with 'bench archive' (and only there), e.g. --to benchmarks/results/study")
    if args.action == "archive":
        from ..bench.study_archive import archive_study

        out = args.output_dir or "runs/study"
        done = archive_study(out, args.to)
        print(f"Archived {len(done['written']) + len(done['unchanged'])} finished run(s) of {out} in {args.to}: "
              f"{len(done['written'])} new, {len(done['unchanged'])} already there; {done['unfinished']} not finished")
        return 0
    if args.reference is not None and args.action != "report":
        raise ConfigError("--reference: only for 'bench report'")
    if args.action == "report":
        from ..bench.study_report import study_markdown, write_study_report

        out = args.output_dir or "runs/study"
        flags = "".join([f" --primary {','.join(comparisons['primary'])}" if "primary" in comparisons else "",
                         f" --equivalence-margin {comparisons['margin']:g}" if "margin" in comparisons else "",
                         f" --archive {args.archive}" if args.archive is not None else "",
                         f" --reference {args.reference}" if args.reference is not None else ""])
        report = write_study_report(out, command=f"aimmerging bench report --output-dir {out}{flags}",
                                    archive=args.archive, reference=args.reference or "aimmerging", **comparisons)
        print(study_markdown(report))
        print(f"Report: {out}/report.md, {out}/report.json, {out}/report.png")
        return 0
    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("model", args.model), ("threads", args.threads),
                                   ("protocol", args.protocol), ("mixed_precision", args.mixed_precision))
                 if v is not None}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if orders is None and seeds is not None:
        raise ConfigError("--seeds: only with --orders (a study), e.g. --orders 1,2,3 --seeds 42,43")
    if orders is not None:
        from ..bench.study import run_study
        from ..bench.study_report import study_markdown

        out = args.output_dir or "runs/study"
        command = " ".join(["aimmerging bench", *([f"--config {args.config}"] if args.config != "benchmarks/standard-cl.yaml" else []),
                            *(["--quick"] if args.quick else []), f"--orders {args.orders}",
                            *([f"--seeds {args.seeds}"] if args.seeds else []), f"--output-dir {out}",
                            *([f"--archive {args.archive}"] if args.archive is not None else [])])
        report = run_study(args.config, out, orders, seeds, quick=args.quick, overrides=overrides,
                           progress=not args.no_progress, methods=methods, command=command, archive=args.archive,
                           **comparisons)
        print(study_markdown(report))
        print(f"Report: {out}/report.md, {out}/report.json, {out}/report.png")
        return 0
    from ..bench import bench_markdown, run_bench

    out = args.output_dir or ("runs/bench-quick" if args.quick else "runs/bench")
    report = run_bench(args.config, out, quick=args.quick, overrides=overrides, progress=not args.no_progress,
                       methods=methods)
    print(bench_markdown(report, command=f"aimmerging bench{' --quick' if args.quick else ''}"))
    print(f"Report: {out}/report.md, {out}/report.json, {out}/report.png")
    return 0
