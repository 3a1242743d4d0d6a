#!/usr/bin/env bash
# bf16 autocast against fp32 on the quick variant of the study config (BENCHMARKS.md, "bf16 or fp32"):
# the same methods, the same data and seeds, once in each precision. The fp32 pass is a bench, whose
# throughput study also times fp32 and bf16 alternately on identical steps (throughput.json:
# "precision"); the bf16 pass runs as a one-cell study (--orders 1), which skips the throughput study.
# Then: python benchmarks/compare_precision.py runs/precision/no runs/precision/bf16/o1-s42
set -euo pipefail
METHODS=${METHODS:-seq,replay,merge-fixed,aimmerging,ewc,lwf}
OUT=${OUT:-runs/precision}
aimmerging bench --config benchmarks/standard-cl-study.yaml --quick --mixed-precision no \
  --methods "$METHODS" --output-dir "$OUT/no" --no-progress
aimmerging bench --config benchmarks/standard-cl-study.yaml --quick --mixed-precision bf16 --orders 1 \
  --methods "$METHODS" --output-dir "$OUT/bf16" --no-progress
