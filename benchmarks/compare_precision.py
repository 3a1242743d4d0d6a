"""Quality of two bench directories of the same methods run in two precisions (fp32 and bf16):
per method, OP / BWT / FWT of each, and how many test answers are identical.

    python benchmarks/compare_precision.py runs/precision/no runs/precision/bf16/o1-s42
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def predictions(run: Path) -> dict[tuple[str, str, str], str]:
    out = {}
    for stage in sorted((run / "stages").glob("[0-9]*")):
        for f in sorted((stage / "predictions").glob("*.jsonl")):
            for line in f.read_text().splitlines():
                row = json.loads(line)
                out[(stage.name, f.stem, row["id"])] = row["prediction"]
    return out


def main(a: str, b: str) -> None:
    a_dir, b_dir = Path(a), Path(b)
    print(f"| method | OP {a_dir.name} | OP {b_dir.name} | BWT {a_dir.name} | BWT {b_dir.name} | "
          f"FWT {a_dir.name} | FWT {b_dir.name} | same answers |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sorted(p for p in a_dir.iterdir() if (p / "results.json").is_file()):
        other = b_dir / run.name
        if run.name == "single" and not (other / "results.json").is_file():
            other = b_dir.parent / "single-s42"  # a one-cell study keeps its FWT reference beside the cell
        if not (other / "results.json").is_file():
            continue
        ra, rb = (json.loads((d / "results.json").read_text())["metrics"] for d in (run, other))
        pa, pb = predictions(run), predictions(other)
        common = set(pa) & set(pb)
        same = sum(pa[k] == pb[k] for k in common)

        def f(x, signed=False):
            return "-" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")

        print(f"| {run.name} | {f(ra['op'])} | {f(rb['op'])} | {f(ra['bwt'], True)} | {f(rb['bwt'], True)} | "
              f"{f(ra['fwt'], True)} | {f(rb['fwt'], True)} | {same}/{len(common)} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
