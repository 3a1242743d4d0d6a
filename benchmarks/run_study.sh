#!/usr/bin/env bash
# The Standard CL study of BENCHMARKS.md (issue 31): seeds 42, 43, 44 x task orders 1, 2, 3 for
# AIMMerging, merge-fixed, replay, I-LoRA, MTL and FOREVER, plus one `single` run per seed (the FWT
# reference; the bench also runs `seq` in every cell, as the source of the shared first stage).
# Seeds vary training only: every cell scores the same test examples (drawn with eval_seed, 42).
# In shards, the closest comparison first (AIMMerging against fixed merging), so that an answer with
# intervals over seeds x orders comes as early as possible; then replay and I-LoRA; then MTL and
# FOREVER. Many hours on 2 CPU cores.
# Resumable: run it again after an interruption; finished runs (the seed-42 runs of an earlier
# study directory included) are kept. `aimmerging bench report --output-dir runs/study` rebuilds
# the report from whatever is finished, with AIMMerging minus each method on OP as the primary family.
set -euo pipefail
OUT=${OUT:-runs/study}
CONFIG=benchmarks/standard-cl-study.yaml
SEEDS=${SEEDS:-42,43,44}
PRIMARY=merge-fixed,replay,ilora,mtl,forever
aimmerging bench --config $CONFIG --orders 1,2,3 --seeds "$SEEDS" --output-dir "$OUT" --no-progress \
  --methods aimmerging,merge-fixed --primary $PRIMARY
aimmerging bench --config $CONFIG --orders 1,2,3 --seeds "$SEEDS" --output-dir "$OUT" --no-progress \
  --methods replay,ilora --primary $PRIMARY
aimmerging bench --config $CONFIG --orders 1,2,3 --seeds "$SEEDS" --output-dir "$OUT" --no-progress \
  --methods mtl,forever --primary $PRIMARY
aimmerging bench report --output-dir "$OUT" --primary $PRIMARY
