#!/usr/bin/env bash
# CPU-only semantic check of the CUDA kernels: compiles kernels/*.cu with g++
# against a small host emulation of the CUDA subset they use (one OS thread per
# CUDA thread, barriers for __syncthreads and warp shuffles, the mma.sync
# fragment layout of the PTX ISA), then compares every kernel with float64 numpy
# references. Catches indexing, synchronisation and fragment-layout bugs; says
# nothing about speed or alignment. Needs g++ (C++20), python3 and numpy.
# Takes a few minutes (thousands of threads per launch).
set -euo pipefail
cd "$(dirname "$0")/.."
EMU_DIR=${EMU_DIR:-/tmp/batos-cuda-emu}
PY=${PYTHON:-python3}
mkdir -p "$EMU_DIR"
cp scripts/cuda-emu/emu.h "$EMU_DIR/"
"$PY" -c 'import numpy' 2>/dev/null || { echo "emu-check: numpy is required (PYTHON=... to choose an interpreter)"; exit 2; }
"$PY" scripts/cuda-emu/build.py "$PWD" "$EMU_DIR"
EMU_DIR="$EMU_DIR" "$PY" scripts/cuda-emu/check.py
