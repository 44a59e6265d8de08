#!/usr/bin/env bash
# Runs THERE (the GPU machine), from the repo root, with .gpu-bin carried (built by
# scripts/gpu-engine-prepare.sh). One prepared run for issues 7 and 8:
#   1. scripts/gpu-check.sh with a 200 s budget (GPU_CHECK_BUDGET): kernel parity
#      tests, sanitizers, NVRTC check, kernel bench (its 7 files under $OUT,
#      summary.md first);
#   2. the device-resident engine (GPU_ENGINE_BUDGET, default 280 s): GPU parity
#      tests (synthetic model, int4, full budget, cold -> hot slot writes, real
#      weights with and without adapters in mixed batches) and the engine builder
#      test, appended to $OUT/tests.txt; the decode / bandwidth / cold->hot bench on
#      the carried 4-layer real model and on a synthetic model of SmolLM2's full
#      shapes (f16 and int4, built there), then Hugging Face transformers + PEFT on
#      the same shapes (scripts/hf_peft_bench.py, python3 with torch there) and the
#      batos / HF ratios, appended to $OUT/bench.txt (gpu-check.sh already writes
#      the 8 files that come back); the engine's results appended to summary.md.
# Worst case 200 + 280 s, about 8 minutes; expected about 4.
#
#   OUT=/some/dir bash scripts/gpu-engine-check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BIN=$PWD/.gpu-bin

GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-200} OUT="$OUT" bash scripts/gpu-check.sh > /dev/null 2>&1

TESTS="$OUT/tests.txt"
BENCH="$OUT/bench.txt"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
DEADLINE=$((START + ${GPU_ENGINE_BUDGET:-280}))
# gpu-check.sh exported these inside its own shell; find libcuda and the PTX again.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
    if [ -e "$d/libcuda.so.1" ]; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
  done
fi
[ -d "$BIN/ptx" ] && export BATOS_CUDA_PTX_DIR="$BIN/ptx"
MODEL=$(ls "$BIN"/smollm2-*l.gguf 2>/dev/null | head -n1)
[ -n "$MODEL" ] && export BATOS_GPU_MODEL="$MODEL"
export RUST_BACKTRACE=1

run() { # log name limit cmd...
  local LOG=$1 name=$2 limit=$3 t0 rc left; shift 3
  t0=$(date +%s); left=$((DEADLINE - t0 - 5))
  if [ "$left" -lt 15 ]; then echo "- engine: $name: SKIPPED (budget spent)" >> "$SUMMARY"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  { echo; echo "===== $name ($(date -u +%T), limit ${limit}s): $*"; } >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local verdict=ok; [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc)"; [ "$rc" -eq 124 ] && verdict="TIMED OUT"
  echo "- engine: $name: $verdict, $(( $(date +%s) - t0 ))s" >> "$SUMMARY"
  echo "===== $name: $verdict" >> "$LOG"
}

{ echo; echo "===== ENGINE (issue 8) model: ${MODEL:-none carried}, ptx: ${BATOS_CUDA_PTX_DIR:-none (NVRTC)}"; } | tee -a "$TESTS" >> "$BENCH"
run "$TESTS" "GPU parity tests (batos-model cuda_forward)" 80 "$BIN/test-cuda_forward" --test-threads=1 --nocapture
run "$TESTS" "engine device selection (batos-engine device)" 30 "$BIN/test-engine_device" --test-threads=1 --nocapture
run "$BENCH" "engine bench (cuda_forward: real 4 layers, synthetic 30 layers f16 + int4)" 100 \
  env BATOS_BENCH_MODELS=real,f16,int4 "$BIN/bench-cuda_forward"
HF_CONFIG="$BIN/hf_model_summary.json"
[ -f "$HF_CONFIG" ] || HF_CONFIG=/work/shared/reference/hf_model_summary.json
# Its own budget: stops starting new runs at 100 s, killed at 140 s (PEFT's mixed
# batch runs one 8-step run: its per-adapter loop is slow).
run "$BENCH" "Hugging Face transformers + PEFT bench (hf_peft_bench.py)" 140 \
  env PYTHONUNBUFFERED=1 python3 scripts/hf_peft_bench.py --config "$HF_CONFIG" --budget-s 100 --compare "$BENCH"

{
  echo
  echo "## Engine (device-resident runtime)"
  sed -n '/===== ENGINE/,$p' "$TESTS" | grep -E '^test |test result:|SKIP|panicked|greedy steps|step-1|max rel|identical' | head -n 40
  echo
  sed -n '/===== ENGINE/,$p' "$BENCH" | grep -E '^\||^## |^device |adapters on the device|bandwidth|cold -> hot|panicked|SKIP|hf_peft_bench|BATOS_VS_HF'
  echo
  echo "engine part: $(( $(date +%s) - START ))s"
} >> "$SUMMARY"
cat "$SUMMARY"
exit 0
