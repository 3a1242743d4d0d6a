"""A fixed tiny run of every method, recorded before the library redesign (issue 12) and checked
after it, on any CPU (issue 27): the accuracy matrices, every trace record and every stage's
adapter tensors must stay the same, the floats within the tolerances below.

``python tests/regression.py`` (from the repository root) records the fixture again into
``tests/data/regression/``; do that only for a change that is *meant* to alter what a run computes,
and say so in the commit.

What is exact and what has a tolerance (evidence: the docstring of ``tests/test_regression.py``):

* exact: the tasks, the accuracy matrices, the event sequence (task, task_index, event, step of
  every record), merge steps, reasons, forgetting counts, w_in/w_out, interval / next_interval /
  outer_steps / elapsed, memory size, the controller config, skips, fallbacks: every value that is
  not one of the float fields below. A last-bit difference may never change one of them.
* relative tolerance (``FLOAT_FIELDS``): losses, the forgetting threshold, the L1 move and the
  learning signal, the learning rate; ``None`` must stay ``None``.
* adapter tensors: ||got - recorded|| / ||recorded|| (Frobenius, per tensor) <= ``TENSOR_RTOL``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "data" / "regression"
MODELS = ("tiny-causal", "tiny-seq2seq")
METHODS = ("seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end")
STEPS = 6  # enough for aimmerging to merge on tasks 2 and 3 with S0 = 2

LOSS_RTOL = 1e-5  # losses and the threshold (2 x a mean of history losses)
MOVE_RTOL = 2e-4  # delta_in_l1 and learning_signal (= delta_in_l1 / S): sums of |adapter - anchor|
FLOAT_FIELDS = {"train_loss": LOSS_RTOL, "history_loss": LOSS_RTOL, "replay_loss": LOSS_RTOL, "val_loss": LOSS_RTOL,
                "threshold": LOSS_RTOL, "delta_in_l1": MOVE_RTOL, "learning_signal": MOVE_RTOL,
                "lr": 1e-12}  # lr: Python floats from the schedule, the same everywhere
TENSOR_RTOL = 3e-3  # ||got - recorded|| / ||recorded|| per adapter tensor


def run_case(out: Path, data_dir: Path, model: str, method: str, **extra) -> dict:
    """Run one case through the CLI entry point; return its matrix, trace and adapter tensors.
    ``extra``: more CLI options, as for ``helpers.tiny_args`` (e.g. ``threads=2``)."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from helpers import tiny_args

    from aimmerging.cli.main import main
    from aimmerging.io import read_jsonl

    assert main(tiny_args(out, data_dir, model=model, method=method, steps=STEPS, **extra)) == 0
    results = json.loads((out / "results.json").read_text())
    tensors = {}
    for stage in sorted((out / "stages").iterdir()):
        for name, t in load_file(str(stage / "adapter" / "adapter_model.safetensors")).items():
            tensors[f"{stage.name}/{name}"] = t
    return {"tasks": results["tasks"], "accuracy_matrix": results["accuracy_matrix"],
            "trace": read_jsonl(out / "trace.jsonl"), "tensors": tensors}


def load_fixture(model: str, method: str) -> dict:
    """A recorded case as :func:`run_case` returns it (``cpu_capability``, information only, dropped)."""
    from safetensors.torch import load_file

    stem = FIXTURE / f"{model}--{method}"
    case = json.loads(stem.with_suffix(".json").read_text())
    case.pop("cpu_capability", None)
    case["tensors"] = load_file(str(stem) + ".safetensors")
    return case


# -- comparison ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    """One compared value that differs: where, what, and how far as a multiple of its tolerance
    (``ratio`` > 1: a mismatch; ``inf`` for a value that must be exact)."""

    path: str
    recorded: object
    got: object
    kind: str  # "exact" | "float" | "tensor"
    error: float = math.inf  # relative difference (float, tensor)
    tolerance: float = 0.0

    @property
    def ratio(self) -> float:
        return math.inf if self.kind == "exact" else self.error / self.tolerance

    def __str__(self) -> str:
        if self.kind == "exact":
            return f"{self.path}: recorded {self.recorded!r}, got {self.got!r}"
        what = "relative difference" if self.kind == "float" else "||got - recorded|| / ||recorded||"
        return (f"{self.path}: recorded {self.recorded!r}, got {self.got!r} "
                f"({what} {self.error:.2e}, tolerance {self.tolerance:g})")


def differences(expected, got, path: str = "") -> Iterator[Difference]:
    """Every value of ``got`` that is not bit-identical to the recorded one, in record order, with
    its relative error (float fields and tensors) or as an exact mismatch (everything else)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if sorted(expected) != sorted(got):
            yield Difference(f"{path or '<top>'} keys", sorted(expected), sorted(got), "exact")
        for key in expected:
            if key not in got:
                continue
            sub = f"{path}.{key}" if path else key
            if not path and key == "tensors":
                yield from tensor_differences(expected[key], got[key])
            elif key in FLOAT_FIELDS and _is_number(expected[key]) and _is_number(got[key]):
                e, g = float(expected[key]), float(got[key])
                if e != g:
                    error = abs(g - e) / abs(e) if e != 0 else math.inf
                    yield Difference(sub, expected[key], got[key], "float", error, FLOAT_FIELDS[key])
            else:
                yield from differences(expected[key], got[key], sub)
    elif isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            yield Difference(f"{path} length", len(expected), len(got), "exact")
        for i, (e, g) in enumerate(zip(expected, got)):
            yield from differences(e, g, f"{path}[{i}]")
    elif type(expected) is not type(got) or expected != got:
        yield Difference(path, expected, got, "exact")


def tensor_differences(expected: dict, got: dict) -> Iterator[Difference]:
    if sorted(expected) != sorted(got):
        yield Difference("tensors names", sorted(expected), sorted(got), "exact")
    for name in sorted(set(expected) & set(got)):
        e, g = expected[name], got[name]
        path = f"tensors[{name}]"
        if e.shape != g.shape or e.dtype != g.dtype:
            yield Difference(path, f"{e.dtype} {tuple(e.shape)}", f"{g.dtype} {tuple(g.shape)}", "exact")
        elif not bool((e == g).all()):
            yield Difference(path, f"norm {float(e.norm()):.6g}", f"norm {float(g.norm()):.6g}", "tensor",
                             tensor_error(e, g), TENSOR_RTOL)


def tensor_error(expected, got) -> float:
    """||got - recorded|| / ||recorded|| in float64 (0 when equal, inf when only the recorded one is 0)."""
    diff = float((got.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def mismatches(expected: dict, got: dict) -> list[Difference]:
    """The differences beyond their tolerance (empty: the cases agree)."""
    return [d for d in differences(expected, got) if d.ratio > 1]


def first_mismatch(expected: dict, got: dict) -> str | None:
    """The first mismatch, readably, with a count of the others; None when the cases agree."""
    found = mismatches(expected, got)
    if not found:
        return None
    return str(found[0]) + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def worst_ratios(expected: dict, got: dict) -> dict[str, float]:
    """The largest error / tolerance per channel: each float field's name, ``tensors`` and
    ``exact`` (inf when any exact value differs)."""
    out: dict[str, float] = {}
    for d in differences(expected, got):
        channel = d.path.rsplit(".", 1)[-1] if d.kind == "float" else ("tensors" if d.kind == "tensor" else "exact")
        out[channel] = max(out.get(channel, 0.0), d.ratio)
    return out


# -- recording ---------------------------------------------------------------------------------------
def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def record(data_dir: Path) -> None:
    import tempfile

    from safetensors.torch import save_file

    FIXTURE.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                case = run_case(Path(tmp) / "run", data_dir, model, method)
            stem = FIXTURE / f"{model}--{method}"
            save_file({k: v.contiguous() for k, v in case.pop("tensors").items()}, str(stem) + ".safetensors")
            case["cpu_capability"] = cpu_capability()  # information only: the comparison ignores it
            stem.with_suffix(".json").write_text(json.dumps(case, indent=1) + "\n")
            print(stem)


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    record(HERE.parents[1] / "shared" / "data" / "long_sequence")
