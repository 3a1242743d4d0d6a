"""Helpers shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "long_sequence"
TASKS = "dbpedia,amazon,agnews"


def tiny_args(out: Path, data: Path, model: str = "tiny-causal", method: str = "seq", steps: int = 3, **extra) -> list[str]:
    """CLI arguments of a seconds-long run: 3 tasks, small caps, short prompts."""
    args = ["run", "--method", method, "--model", model, "--tasks", TASKS, "--data-dir", str(data),
            "--train-cap", "24", "--eval-cap", "8", "--max-steps", str(steps), "--batch-size", "4",
            "--micro-batch-size", "2", "--max-input-tokens", "64", "--memory-batch-size", "4",
            "--memory-ratio", "20", "--initial-interval", "2", "--initial-outer-steps", "1",
            "--eval-batch-size", "8", "--threads", "1", "--output-dir", str(out), "--no-progress"]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args
