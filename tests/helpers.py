"""Helpers shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "long_sequence"
TASKS = "dbpedia,amazon,agnews"


def stage_adapters(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter every finished stage of a run directory saved, by stage folder (``01-amazon``)."""
    return {d.name: load_file(str(d / "adapter" / "adapter_model.safetensors"))
            for d in sorted((run / "stages").iterdir()) if (d / "adapter").is_dir()}


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

def one_line_error(rc: int, err: list[str], *expected: str) -> str:
    """The one error line of a refused command (exit 2), holding every ``expected`` text."""
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("aimmerging: error: ")
    for text in expected:
        assert text in err[0], err[0]
    return err[0]
