#!/usr/bin/env bash
# The GPU check (issue 32): what this project cannot measure on its CPU machines, in at most ~8 minutes
# on one CUDA GPU, with nothing installed beyond the README's set-up (a quantized base is checked only
# where bitsandbytes happens to be installed).
#
#   benchmarks/gpu_check.sh             # on a machine with a CUDA GPU, from the repository root
#   benchmarks/gpu_check.sh --dry-run   # anywhere, in seconds: prints the plan, checks its entry points
#
# Steps (each under its own time limit; a failed step is recorded and the next one still runs):
#   1. the tests marked for GPU: python -m pytest -m gpu (CUDA generation, fp16 evaluation, bf16
#      training, gradient checkpointing on CUDA, 8-bit and 4-bit bases if bitsandbytes is there)
#   2. two short AIMMerging runs on SmolLM2-135M on CUDA (built-in synthetic stream, 2 tasks),
#      without and with --gradient-checkpointing: OP/BWT, wall time, peak CUDA memory per stage
#   3. the throughput study: python -m aimmerging.bench.throughput CONFIG OUT.json STEPS
#   4. the figures: $OUT/figures.json and $OUT/figures.md (and each step's log in $OUT)
# FSDP is not among them: aimmerging refuses it (one line), and a test of sharded training needs
# two GPUs (see BENCHMARKS.md, "Bigger bases").
set -uo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (--dry-run, --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python}
MODEL=${MODEL:-smollm2-135m}
mkdir -p "$OUT"
RUN_ARGS=(--method aimmerging --model "$MODEL" --benchmark synthetic --train-cap 64 --eval-cap 32
          --max-steps 12 --batch-size 8 --micro-batch-size 8 --max-input-tokens 256 --max-new-tokens 8
          --memory-batch-size 8 --initial-interval 4 --seed 42 --no-progress --overwrite)
STATUS="$OUT/status.tsv"

# run NAME SECONDS COMMAND...: the command under a time limit, its output in $OUT/NAME.log
run() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STATUS"
  tail -n 3 "$OUT/$name.log"
  [ "$rc" = 0 ] || echo "   -> $name failed (exit $rc), see $OUT/$name.log"
}

# the throughput study's run config: the runs' settings, one task stream the study reads from
cat >"$OUT/throughput-config.yaml" <<EOF
model: $MODEL
method: aimmerging
benchmark: synthetic
train_cap: 64
eval_cap: 8
batch_size: 8
micro_batch_size: 8
max_input_tokens: 256
memory_batch_size: 8
progress: false
EOF

if [ "$DRY" = 1 ]; then
  echo "dry run: checking the plan's entry points, nothing is trained"
  set -e
  # the runs' flags and the study's config are what this version accepts; the entry points import
  "$PY" - "$OUT/throughput-config.yaml" run "${RUN_ARGS[@]}" --gradient-checkpointing --output-dir "$OUT/plain" <<'EOF'
import importlib, importlib.util, sys
from aimmerging.cli.main import build_parser
from aimmerging.cli.run_cmd import config_from_args
from aimmerging.config import build_config, load_yaml
build_config(load_yaml(sys.argv[1]))
argv = sys.argv[2:]
cfg = config_from_args(build_parser(argv).parse_args(argv))
if cfg.model == "smollm2-135m":  # the README's set-up installs its GGUF file
    from aimmerging.models.loading import smollm2_gguf
    smollm2_gguf()
assert callable(importlib.import_module("aimmerging.bench.throughput").main)
assert importlib.util.find_spec("aimmerging.__main__") is not None
import pytest  # the tests marked for GPU collect (in this process: torch is imported once)
assert pytest.main(["-q", "-m", "gpu", "--collect-only", "-p", "no:cacheprovider", "tests/test_scale.py"]) == 0
EOF
  set +e
fi

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA GPU here (run it with --dry-run to check the plan only)" >&2
  exit 2
fi
[ "$DRY" = 1 ] || : >"$STATUS"

run gpu-tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/
run run-plain 120 "$PY" -m aimmerging run "${RUN_ARGS[@]}" --output-dir "$OUT/plain"
run run-checkpointing 120 "$PY" -m aimmerging run "${RUN_ARGS[@]}" --gradient-checkpointing \
  --output-dir "$OUT/checkpointing"
run throughput 120 "$PY" -m aimmerging.bench.throughput "$OUT/throughput-config.yaml" "$OUT/throughput.json" 3

echo "== figures: $OUT/figures.json, $OUT/figures.md"
if [ "$DRY" = 1 ]; then
  echo "dry run: plan checked ($OUT/throughput-config.yaml is valid; the gpu tests collect)"
  exit 0
fi
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
def read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

status = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    status[name] = {"exit": int(rc), "seconds": int(secs)}
tests = (out / "gpu-tests.log").read_text().strip().splitlines()
figures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "steps": status, "gpu_tests": tests[-1] if tests else None, "runs": {}}
for name in ("plain", "checkpointing"):
    r = read(out / name / "results.json")
    if r:
        figures["runs"][name] = {"op": r["metrics"].get("op"), "bwt": r["metrics"].get("bwt"),
                                 "peak_cuda_mb": r.get("peak_cuda_mb"), "peak_rss_mb": r.get("peak_rss_mb"),
                                 "stage_peak_cuda_mb": [s.get("stage_peak_cuda_mb") for s in r["stages"]],
                                 "train_s": sum(s["timing"].get("inner", 0) for s in r["stages"]),
                                 "wall_s": sum(s["wall_s"] for s in r["stages"])}
tp = read(out / "throughput.json")
if tp:
    figures["throughput"] = [{k: row[k] for k in ("lever", "step_s", "tokens_per_s", "gflops")} for row in tp["rows"]]
(out / "figures.json").write_text(json.dumps(figures, indent=1))
lines = [f"GPU check on {figures['device']} (torch {figures['torch']}, CUDA {figures['cuda']})", "",
         "| step | exit | seconds |", "|---|---|---|"]
lines += [f"| {k} | {v['exit']} | {v['seconds']} |" for k, v in status.items()]
lines += ["", f"gpu tests: {figures['gpu_tests']}", "",
          "| run | OP | BWT | peak CUDA MB (per stage) | training s | wall s |", "|---|---|---|---|---|---|"]
for name, r in figures["runs"].items():
    lines.append(f"| {name} | {r['op']} | {r['bwt']} | {r['peak_cuda_mb']} ({', '.join(map(str, r['stage_peak_cuda_mb']))}) "
                 f"| {r['train_s']:.1f} | {r['wall_s']:.1f} |")
if tp:
    lines += ["", "| lever | s / step | tokens/s | GFLOP/s |", "|---|---|---|---|"]
    lines += [f"| {r['lever']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['gflops']:.1f} |" for r in figures["throughput"]]
(out / "figures.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
failed=$(awk -F'\t' '$2 != 0' "$STATUS" | wc -l)
[ "$failed" = 0 ] || { echo "gpu_check.sh: $failed step(s) failed (see $STATUS)" >&2; exit 1; }
