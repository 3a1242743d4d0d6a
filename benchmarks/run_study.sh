#!/usr/bin/env bash
# The Standard CL study of BENCHMARKS.md (issue 31): seeds 42, 43, 44 x task orders 1, 2, 3 for
# AIMMerging, merge-fixed, replay, I-LoRA, MTL and FOREVER, plus one `single` run per seed (the FWT
# reference; the bench also runs `seq` in every cell, as the source of the shared first stage);
# VBM and Recurrent-KIF on seed 42 (issue 30). Seed 42 is finished first.
# Seeds vary training only: every cell scores the same test examples (drawn with eval_seed, 42).
# In shards, the closest comparison first (AIMMerging against fixed merging), so that an answer with
# intervals over seeds x orders comes as early as possible; then replay and I-LoRA; then MTL and
# FOREVER (on seed 42: FOREVER, VBM and Recurrent-KIF second). Many hours on 2 CPU cores.
# Resumable: run it again after an interruption; finished runs (the seed-42 runs of an earlier
# study directory included) are kept. `aimmerging bench report --output-dir runs/study --archive
# benchmarks/results/study` rebuilds the report from whatever is finished, with AIMMerging minus
# each method on OP as the primary family.
#
# Across work sessions (each a fresh clone: runs/ is not in git), the study goes on through
# $ARCHIVE (benchmarks/results/study, committed): every run that finishes is archived there at
# once as one small JSON file (bench/study_archive.py; also after each shard, by `bench archive`),
# and an archived run is never run again. Before a session ends:
#   aimmerging bench archive --output-dir runs/study --to benchmarks/results/study
#   git add benchmarks/results/study && git commit -m "study: runs finished so far"
# and the next session runs this script again: it continues with the first run not archived (a
# run cut off half way starts over; a cell whose `seq` run is only archived trains each method's
# first stage itself instead of copying it: the same computation).
set -euo pipefail
OUT=${OUT:-runs/study}
ARCHIVE=${ARCHIVE:-benchmarks/results/study}
CONFIG=benchmarks/standard-cl-study.yaml
PRIMARY=merge-fixed,replay,ilora,mtl,forever
# Seed 42 first, with the methods of the 2025-2026 papers right after AIMMerging and fixed merging
# (issue 30 reports FOREVER, VBM and Recurrent-KIF over the three orders), then seeds 43 and 44 for
# the six methods of issue 31.
for SEEDS in ${SEEDS:-42 43,44}; do
  SHARDS="aimmerging,merge-fixed replay,ilora mtl,forever"
  [ "$SEEDS" = 42 ] && SHARDS="aimmerging,merge-fixed forever,vbm,rkif replay,ilora mtl"
  for SHARD in $SHARDS; do
    aimmerging bench --config $CONFIG --orders 1,2,3 --seeds "$SEEDS" --output-dir "$OUT" --no-progress \
      --methods "$SHARD" --primary $PRIMARY --archive "$ARCHIVE"
    aimmerging bench archive --output-dir "$OUT" --to "$ARCHIVE"
  done
done
aimmerging bench report --output-dir "$OUT" --primary $PRIMARY --archive "$ARCHIVE"
