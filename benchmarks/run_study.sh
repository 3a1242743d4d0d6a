#!/usr/bin/env bash
# The three-order Standard CL study of BENCHMARKS.md, in three shards: AIMMerging, the sequential
# baseline and its closest comparator (fixed-interval merging) first, so that an answer with
# intervals over all three orders comes as early as possible; then the other ablations; then the
# peer methods.
# Resumable: run it again after an interruption; `aimmerging bench report --output-dir runs/study`
# rebuilds the report from whatever is finished.
set -euo pipefail
OUT=${OUT:-runs/study}
CONFIG=benchmarks/standard-cl-study.yaml
aimmerging bench --config $CONFIG --orders 1,2,3 --output-dir "$OUT" --no-progress \
  --methods aimmerging,seq,merge-fixed
aimmerging bench --config $CONFIG --orders 1,2,3 --output-dir "$OUT" --no-progress \
  --methods replay,merge-end
aimmerging bench --config $CONFIG --orders 1,2,3 --output-dir "$OUT" --no-progress \
  --methods ewc,lwf,ilora,olora,task-arithmetic,ties,dare,magmax,mtl
