"""A fixed tiny run of every method, recorded before the library redesign (issue 12) and checked
after it: accuracy matrices, trace records and every stage's adapter tensors must stay the same.

``python tests/regression.py`` (from the repository root) records the fixture again into
``tests/data/regression/``; do that only for a change that is *meant* to alter what a run computes,
and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "data" / "regression"
MODELS = ("tiny-causal", "tiny-seq2seq")
METHODS = ("seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end")
STEPS = 6  # enough for aimmerging to merge on tasks 2 and 3 with S0 = 2


def run_case(out: Path, data_dir: Path, model: str, method: str) -> dict:
    """Run one case through the CLI entry point; return its matrix, trace and adapter tensors."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from helpers import tiny_args

    from aimmerging.cli.main import main
    from aimmerging.io import read_jsonl

    assert main(tiny_args(out, data_dir, model=model, method=method, steps=STEPS)) == 0
    results = json.loads((out / "results.json").read_text())
    tensors = {}
    for stage in sorted((out / "stages").iterdir()):
        for name, t in load_file(str(stage / "adapter" / "adapter_model.safetensors")).items():
            tensors[f"{stage.name}/{name}"] = t
    return {"tasks": results["tasks"], "accuracy_matrix": results["accuracy_matrix"],
            "trace": read_jsonl(out / "trace.jsonl"), "tensors": tensors}


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
            case["cpu_capability"] = cpu_capability()
            stem.with_suffix(".json").write_text(json.dumps(case, indent=1) + "\n")
            print(stem)


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    record(HERE.parents[1] / "shared" / "data" / "long_sequence")
