#!/usr/bin/env bash
# CPU-only CI check: every kernels/*.cu module compiles with NVRTC for sm_80 and
# sm_90 and defines every entry point the Rust launchers use. No GPU needed:
# libnvrtc (and the CUDA headers, unused by the kernels today) come from the
# PyPI wheels nvidia-cuda-nvrtc-cu12 / nvidia-cuda-runtime-cu12 in a venv.
#
#   scripts/nvrtc-check.sh            # venv in .cache/nvrtc-venv (git-ignored)
#   BATOS_NVRTC_VENV=/path scripts/nvrtc-check.sh
#   BATOS_CUDA_PTX_OUT=dir scripts/nvrtc-check.sh   # also keep the PTX
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BATOS_NVRTC_VENV:-$PWD/.cache/nvrtc-venv}
find_nvrtc() { ls -d "$VENV"/lib/python3*/site-packages/nvidia 2>/dev/null | head -n1; }
NV=$(find_nvrtc || true)
if [ -z "$NV" ] || ! ls "$NV"/cuda_nvrtc/lib/libnvrtc.so.* >/dev/null 2>&1; then
  echo "nvrtc-check: creating $VENV with the NVRTC wheels"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
  NV=$(find_nvrtc)
fi
export LD_LIBRARY_PATH="$NV/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export BATOS_NVRTC_INCLUDE="$NV/cuda_runtime/include"
export BATOS_REQUIRE_NVRTC=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo test -p batos-kernels --release --features cuda --test cuda_nvrtc -- --nocapture
