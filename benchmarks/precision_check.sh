#!/usr/bin/env bash
# bf16 autocast against fp32 on the quick variant of the study config (BENCHMARKS.md, "bf16 or fp32"):
# the same methods, the same data and seeds, once in each precision; the fp32 bench's throughput
# study also times fp32 and bf16 alternately on identical steps (throughput.json: "precision").
set -euo pipefail
METHODS=${METHODS:-seq,replay,merge-fixed,aimmerging,ewc,lwf}
OUT=${OUT:-runs/precision}
for precision in no bf16; do
  aimmerging bench --config benchmarks/standard-cl-study.yaml --quick --mixed-precision "$precision" \
    --methods "$METHODS" --output-dir "$OUT/$precision" --no-progress
done
