"""``aimmerging data validate PATH``: per-task counts and label sets, every problem found, and one
example per task exactly as a run tokenizes it.

``PATH`` is an O-LoRA data directory (``train/dev/test/<task>.json``) or a task-stream YAML file
(what ``--data`` takes). For each task the first training example is shown as the model sees it:
the prompt text and the answer text (``repr``, so spaces and newlines show), and their token ids
with each token's text, formatted by the run's rules (``--model``, ``--prompt-format``,
``--max-input-tokens``). A stream file's examples are shown with the run's default model unless
``--model`` names another (``--model none``: texts only); an O-LoRA directory's with ``--model``.
"""

from __future__ import annotations

import argparse

NO_MODEL = "none"
SHOWN_TOKENS = 48  # a longer prompt shows its first and last tokens


def register(sub, argv=None) -> None:
    from .main import Parser

    data = sub.add_parser("data", help="inspect task data").add_subparsers(dest="data_command", metavar="SUBCOMMAND",
                                                                         parser_class=Parser)
    data.required = True
    v = data.add_parser("validate", help="per-task counts and labels, every problem found, and one example per task "
                                         "as a run tokenizes it")
    v.add_argument("dir", metavar="PATH", help="O-LoRA data directory (train/dev/test/<task>.json) or task-stream "
                                               "YAML file (what run --data takes)")
    v.add_argument("--model", default=None, help="tokenizer of this model (alias, directory or hub id; as run "
                                                 "--model) for the example tokens; default: the run's default for a "
                                                 "stream file, none for an O-LoRA directory; 'none': texts only")
    v.add_argument("--prompt-format", default="plain", choices=("plain", "chat"), help="as run --prompt-format")
    v.add_argument("--max-input-tokens", type=int, default=None, help="as run --max-input-tokens")
    v.add_argument("--input-field", default=None, help="as run --input-field (stream files)")
    v.add_argument("--output-field", default=None, help="as run --output-field (stream files)")
    v.add_argument("--trust-remote-code", action="store_true", help="as run --trust-remote-code")
    v.set_defaults(func=cmd_data_validate)


def cmd_data_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.dir)
    if path.is_file():
        return _validate_stream_file(args, path)
    from ..data.olora import read_task, validate_dir

    report, errors, warns = validate_dir(args.dir)
    _print_table({task: {split: (r.count, r.labels) for split, r in splits.items()} for task, splits in report.items()})
    for w in warns:
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}")
    if args.model and args.model != NO_MODEL and report:
        examples = {}
        for task in report:
            try:
                examples[task] = read_task(args.dir, "train", task)[0]
            except Exception:  # a broken split is one of the errors above
                continue
        errors += _show_examples(args, args.model, examples)
    print(f"{len(report)} tasks, {len(errors)} problems, {len(warns)} warnings")
    return 1 if errors else 0


def _print_table(report: dict) -> None:
    if not report:
        return
    print(f"{'task':<14} {'split':<6} {'count':>6}  labels")
    for task, splits in report.items():
        for split, (count, labels) in splits.items():
            if len(labels) <= 15:
                shown = ", ".join(f"{k} {v}" for k, v in sorted(labels.items()))
            else:
                shown = f"free text ({len(labels)} distinct outputs)"
            print(f"{task:<14} {split:<6} {count:>6}  {shown}")


def _validate_stream_file(args: argparse.Namespace, path) -> int:
    from collections import Counter

    from ..config import RunConfig
    from ..data.files import load_stream_file, stream_file_plan
    from ..errors import UserError

    model = args.model or RunConfig.model
    tokenizer = _tokenizer_loader(args, model) if model != NO_MODEL else None
    plans = stream_file_plan(path, input_field=args.input_field, output_field=args.output_field)
    stream = load_stream_file(path, input_field=args.input_field, output_field=args.output_field,
                              tokenizer=tokenizer)
    report: dict = {}
    examples = {}
    errors: list[str] = []
    for task, plan in plans.items():
        for split in plan["files"]:
            try:
                rows = stream.split(task, split)
            except UserError as e:
                errors.append(str(e))
                continue
            report.setdefault(task, {})[split] = (len(rows), dict(Counter(e.output for e in rows)))
            if split == "train" and rows:
                examples[task] = rows[0]
    _print_table(report)
    for e in errors:
        print(f"error: {e}")
    if model != NO_MODEL and examples:
        errors += _show_examples(args, model, examples, tokenizer)
    elif examples:
        _show_examples(args, None, examples)
    print(f"{len(plans)} tasks, {len(errors)} problems, 0 warnings")
    return 1 if errors else 0


def _tokenizer_loader(args: argparse.Namespace, model: str):
    loaded: dict = {}

    def load():
        from ..models.loading import load_base_model

        if "tok" not in loaded:
            loaded["tok"], loaded["kind"] = load_base_model(model, trust_remote_code=args.trust_remote_code)[1:]
        return loaded["tok"]

    load.loaded = loaded  # type: ignore[attr-defined]
    return load


def _show_examples(args: argparse.Namespace, model: str | None, examples: dict, loader=None) -> list[str]:
    """Print each task's example as the run formats it; the problems found (a tokenizer that cannot
    be loaded, chat format without a chat template) are returned and printed as errors."""
    from ..config import RunConfig
    from ..data.formatting import Formatter
    from ..errors import UserError

    if model is None:
        for task, ex in examples.items():
            print(f"\nexample of {task} (train, id {ex.id}; no tokenizer: pass --model to see the tokens)")
            print(f"  prompt text: {ex.input!r}")
            print(f"  answer text: {ex.output!r}")
        return []
    loader = loader or _tokenizer_loader(args, model)
    try:
        tokenizer = loader()
        kind = loader.loaded["kind"]
        budget = args.max_input_tokens or RunConfig.max_input_tokens
        formatter = Formatter(tokenizer, kind, budget, RunConfig.max_target_tokens, args.prompt_format)
    except UserError as e:
        print(f"error: {e}")
        return [str(e)]
    for task, ex in examples.items():
        prompt = formatter.prompt_ids(ex)
        answer = formatter.answer_ids(ex.output, ex) if kind == "causal" else formatter.encode(ex).labels
        print(f"\nexample of {task} (train, id {ex.id}; model {model}, prompt format {args.prompt_format}"
              f"{', chat template applied' if ex.templated else ''})")
        print(f"  prompt text: {formatter.prompt_text(ex)!r}")
        print(f"  answer text: {(formatter.answer_text(ex) if kind == 'causal' else ex.output)!r} + EOS")
        print(f"  prompt tokens ({len(prompt)}): {_tokens(tokenizer, prompt)}")
        print(f"  answer tokens ({len(answer)}): {_tokens(tokenizer, answer)}")
    return []


def _tokens(tokenizer, ids: list[int]) -> str:
    """``id 'text'`` per token (the first and last ones of a long list)."""
    def one(i: int) -> str:
        return f"{i} {tokenizer.decode([i])!r}"

    if len(ids) <= SHOWN_TOKENS:
        return ", ".join(map(one, ids))
    head, tail = ids[:8], ids[-(SHOWN_TOKENS - 8):]
    return ", ".join(map(one, head)) + f", ... ({len(ids) - len(head) - len(tail)} more) ..., " + ", ".join(map(one, tail))
