#!/usr/bin/env bash
# Runs THERE (the GPU machine), from the repo root, on the executables that
# scripts/gpu-prepare.sh put in .gpu-bin/ (carry `.gpu-bin`). Needs no Rust
# toolchain and no network. Every step is independent and time-limited; all
# output lands in $OUT (at most 8 files):
#   summary.md    step statuses and the bench table, ready for docs/perf/gpu-kernels.md
#   env.txt       nvidia-smi, driver/NVRTC/sanitizer discovery
#   tests.txt     GPU parity tests: precompiled PTX, then runtime NVRTC
#   nvrtc.txt     NVRTC compile check with the machine's own NVRTC
#   sanitizer.txt compute-sanitizer memcheck (all tests) and racecheck (shared-memory kernels)
#   bench.txt     bench output
#   ncu.txt       Nsight Compute sections of the round-3 kernels (if ncu is installed)
#   trace.txt     set -x trace of this script
#
#   OUT=/some/dir scripts/gpu-check.sh      # total well under 8 minutes
#   GPU_CHECK_QUICK=1 ...                   # a rerun: tests, bench and memcheck only
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BIN=$PWD/.gpu-bin
exec 3>"$OUT/trace.txt"
BASH_XTRACEFD=3
set -x
START=$(date +%s)
# Whole-run budget: a step never starts with less than 20 s left and never runs
# past the budget, so the script ends in time even if every step hangs.
BUDGET=${GPU_CHECK_BUDGET:-450}
DEADLINE=$((START + BUDGET))
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"

# step NAME TIMEOUT_S LOGFILE CMD... : runs one step, appends its status to summary.md.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc left
  t0=$(date +%s)
  left=$((DEADLINE - t0 - 5))
  if [ "$left" -lt 20 ]; then
    echo "- $name: SKIPPED (time budget of ${BUDGET}s spent)" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  { echo; echo "===== $name ($(date -u +%T), limit ${limit}s): $*"; } >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local verdict=ok
  [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  echo "- $name: $verdict, ${dt}s" >> "$SUMMARY"
  echo "===== $name: $verdict in ${dt}s" >> "$log"
  return 0
}

# ---- environment -------------------------------------------------------------
ENV="$OUT/env.txt"
{
  echo "date: $(date -u +%FT%TZ)  host: $(uname -a)"
  cat "$BIN/BUILD.txt" 2>/dev/null || echo "no $BIN/BUILD.txt: run scripts/gpu-prepare.sh on the build machine and carry .gpu-bin"
  ls -la "$BIN" "$BIN/ptx" 2>&1
} >> "$ENV"
step "nvidia-smi" 30 "$ENV" nvidia-smi
step "nvidia-smi query" 30 "$ENV" nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,clocks.max.sm,driver_version --format=csv

# libcuda: the tests dlopen libcuda.so.1 (cudarc's candidate list); make sure the loader sees it.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
    if [ -e "$d/libcuda.so.1" ]; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; echo "libcuda.so.1 found in $d" >> "$ENV"; break; fi
  done
fi
ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc' >> "$ENV" 2>&1

# NVRTC for the runtime-compile path. cudarc (built with cuda-12080) tries
# libnvrtc.so, libnvrtc.so.12 ... but not libnvrtc.so.13, so CUDA 13's library
# is exposed under the unversioned name through a symlink folder.
NVRTC_REAL=""
for cand in /usr/local/cuda/lib64/libnvrtc.so.* /usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so.* \
            /usr/local/cuda-*/lib64/libnvrtc.so.* \
            $(python3 -c 'import nvidia, os; [print(p) for p in nvidia.__path__]' 2>/dev/null | sed 's|$|/*/lib/libnvrtc.so.*|') \
            /usr/lib/x86_64-linux-gnu/libnvrtc.so.*; do
  for f in $cand; do
    case "$f" in *builtins*|*alt*) continue ;; esac
    [ -f "$f" ] && { NVRTC_REAL=$(readlink -f "$f"); break 2; }
  done
done
SHIM=$(mktemp -d)
if [ -n "$NVRTC_REAL" ]; then
  ln -sf "$NVRTC_REAL" "$SHIM/libnvrtc.so"
  NVRTC_LD="$SHIM:$(dirname "$NVRTC_REAL")"
  echo "NVRTC: $NVRTC_REAL (exposed as $SHIM/libnvrtc.so)" >> "$ENV"
else
  NVRTC_LD=""
  echo "NVRTC: not found on this machine; only the precompiled-PTX path can run" >> "$ENV"
fi
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n1)
echo "compute-sanitizer: ${SANITIZER:-not found}" >> "$ENV"
PTX_DIR=""
[ -d "$BIN/ptx" ] && PTX_DIR="$BIN/ptx"
echo "precompiled PTX: ${PTX_DIR:-none}" >> "$ENV"
nproc >> "$ENV" 2>&1; free -g >> "$ENV" 2>&1; ldd --version 2>&1 | head -n1 >> "$ENV"
step "test binary starts (--list)" 20 "$ENV" "$BIN/test-cuda_kernels" --list

export BATOS_REQUIRE_GPU=1 RUST_BACKTRACE=1

# ---- tests ----------------------------------------------------------------------
TESTS="$OUT/tests.txt"
if [ -n "$PTX_DIR" ]; then
  step "tests (precompiled sm_90 PTX)" 120 "$TESTS" \
    env BATOS_CUDA_PTX_DIR="$PTX_DIR" "$BIN/test-cuda_kernels" --test-threads=1 --nocapture
fi
# ---- compute-sanitizer ---------------------------------------------------------------
SAN_ENV=(env BATOS_CUDA_PTX_DIR="${PTX_DIR}" LD_LIBRARY_PATH="${NVRTC_LD:+$NVRTC_LD:}${LD_LIBRARY_PATH:-}")
# ---- bench --------------------------------------------------------------------------
step "bench" 180 "$OUT/bench.txt" "${SAN_ENV[@]}" "$BIN/bench-cuda_kernels"

# ---- compute-sanitizer memcheck ---
if [ -n "$SANITIZER" ]; then
  step "compute-sanitizer memcheck (all tests)" 120 "$OUT/sanitizer.txt" \
    "${SAN_ENV[@]}" "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 50 \
    "$BIN/test-cuda_kernels" --test-threads=1
else
  echo "- compute-sanitizer: not found, skipped" >> "$SUMMARY"
fi

QUICK=${GPU_CHECK_QUICK:-0}
[ "$QUICK" = 1 ] && echo "- quick rerun: runtime NVRTC, racecheck and ncu skipped" >> "$SUMMARY"

# ---- runtime NVRTC (the machine's CUDA 13 NVRTC) ---
if [ -n "$NVRTC_LD" ] && [ "$QUICK" != 1 ]; then
  step "tests (runtime NVRTC: $(basename "$NVRTC_REAL"))" 120 "$TESTS" \
    env -u BATOS_CUDA_PTX_DIR LD_LIBRARY_PATH="$NVRTC_LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$BIN/test-cuda_kernels" --test-threads=1 --nocapture
  step "nvrtc compile check (machine NVRTC)" 90 "$OUT/nvrtc.txt" \
    env LD_LIBRARY_PATH="$NVRTC_LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" BATOS_REQUIRE_NVRTC=1 \
    "$BIN/test-cuda_nvrtc" --test-threads=1 --nocapture
fi


# ---- compute-sanitizer racecheck ---
if [ -n "$SANITIZER" ] && [ "$QUICK" != 1 ]; then
  step "compute-sanitizer racecheck (shared-memory kernels)" 90 "$OUT/sanitizer.txt" \
    "${SAN_ENV[@]}" "$SANITIZER" --tool racecheck --error-exitcode 99 --print-limit 50 \
    "$BIN/test-cuda_kernels" --test-threads=1 awq_gemm awq_gemv lora_sgmv lora_grouped paged_decode paged_prefill top_p
fi

# ---- Nsight Compute on the round-3 kernels (matvec, grouped LoRA, f16 decode) ---
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -n1)
echo "ncu: ${NCU:-not found}" >> "$ENV"
if [ -n "$NCU" ] && [ "$QUICK" != 1 ]; then
  step "ncu profile (awq_gemv_h2, grouped LoRA, paged_decode f16)" 150 "$OUT/ncu.txt" \
    "${SAN_ENV[@]}" BATOS_BENCH_PROFILE=1 "$NCU" --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section SchedulerStats --section WarpStateStats \
    -k 'regex:awq_gemv_h2|grouped_|paged_decode_f16' "$BIN/bench-cuda_kernels"
else
  echo "- ncu: not found, skipped" >> "$SUMMARY"
fi

# ---- summary ----------------------------------------------------------------------------
{
  echo
  echo "## Device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi failed"
  grep -m1 '^device:' "$OUT/bench.txt" 2>/dev/null
  echo
  echo "## Test results"
  grep -E '^=====|^test result:|^test .* FAILED' "$TESTS" 2>/dev/null | head -n 40
  grep -E 'panicked' "$TESTS" 2>/dev/null | head -n 10
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.txt" 2>/dev/null
  echo
  echo "## Bench"
  grep -E '^\||SKIPPED|panicked' "$OUT/bench.txt" 2>/dev/null
  echo
  echo "## ncu (per kernel: duration, DRAM/memory throughput, occupancy, issue activity)"
  grep -E '^  [a-z_0-9]+_f16|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per Thread|Eligible Warps Per Scheduler|Issued Warp Per Scheduler|No Eligible|ERR_|==ERROR==' "$OUT/ncu.txt" 2>/dev/null | head -n 160
  echo
  echo "total: $(( $(date +%s) - START ))s"
} >> "$SUMMARY"
rm -rf "$SHIM"
cat "$SUMMARY"
exit 0
