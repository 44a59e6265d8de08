#!/usr/bin/env bash
# Runs THERE (the GPU machine), from the repo root, with .gpu-bin carried (built by
# scripts/gpu-engine-prepare.sh). One prepared run for issues 7 and 8:
#   1. scripts/gpu-check.sh with a 330 s budget: kernel parity tests, sanitizers,
#      NVRTC check, kernel bench (its 7 files under $OUT, summary.md first);
#   2. the device-resident engine: GPU parity tests (synthetic model, int4, full
#      budget, real weights with and without adapters in mixed batches) and the
#      engine builder test, appended to $OUT/tests.txt; the decode / bandwidth /
#      cold->hot bench appended to $OUT/bench.txt (gpu-check.sh already writes the 8
#      files that come back); the engine's results appended to summary.md.
# Total well under 10 minutes (GPU_ENGINE_BUDGET, default 170 s, for part 2).
#
#   OUT=/some/dir bash scripts/gpu-engine-check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BIN=$PWD/.gpu-bin

GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-330} OUT="$OUT" bash scripts/gpu-check.sh > /dev/null 2>&1

TESTS="$OUT/tests.txt"
BENCH="$OUT/bench.txt"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
DEADLINE=$((START + ${GPU_ENGINE_BUDGET:-170}))
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
run "$TESTS" "GPU parity tests (batos-model cuda_forward)" 90 "$BIN/test-cuda_forward" --test-threads=1 --nocapture
run "$TESTS" "engine device selection (batos-engine device)" 40 "$BIN/test-engine_device" --test-threads=1 --nocapture
run "$BENCH" "engine bench (cuda_forward)" 120 "$BIN/bench-cuda_forward"

{
  echo
  echo "## Engine (device-resident runtime)"
  sed -n '/===== ENGINE/,$p' "$TESTS" | grep -E '^test |test result:|SKIP|panicked|greedy steps|step-1|max rel|identical' | head -n 40
  echo
  sed -n '/===== ENGINE/,$p' "$BENCH" | grep -E '^\||^device |adapters on the device|bandwidth|cold -> hot|panicked|SKIP'
  echo
  echo "engine part: $(( $(date +%s) - START ))s"
} >> "$SUMMARY"
cat "$SUMMARY"
exit 0
