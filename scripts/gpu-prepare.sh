#!/usr/bin/env bash
# Runs HERE (the build machine, no GPU needed): builds the CUDA test and bench
# executables of batos-kernels and the kernels' sm_80/sm_90 PTX into .gpu-bin/,
# which scripts/gpu-check.sh runs on the GPU machine (carry `.gpu-bin`).
#
#   scripts/gpu-prepare.sh
#
# .gpu-bin/ is added to this checkout's .git/info/exclude so it can be carried
# as an ignored path. The PTX needs libnvrtc here (the same venv as
# scripts/nvrtc-check.sh); without it the GPU side compiles with its own NVRTC.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=.gpu-bin
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.gpu-bin/' "$EXCLUDE" 2>/dev/null || echo '/.gpu-bin/' >> "$EXCLUDE"

rm -rf "$BIN"
mkdir -p "$BIN/ptx"

# Prints "<kind> <name> <executable>" for each built test/bench target.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(t["kind"][0], t["name"], m["executable"])
'
}

echo "== building test executables (release, --features cuda)"
cargo test -p batos-kernels --release --features cuda --no-run --message-format=json-render-diagnostics \
  | executables > "$BIN/.tests.list"
echo "== building bench executable"
cargo bench -p batos-kernels --features cuda --bench cuda_kernels --no-run --message-format=json-render-diagnostics \
  | executables > "$BIN/.bench.list"

copy() { # kind name dest
  local exe
  exe=$(awk -v k="$1" -v n="$2" '$1 == k && $2 == n { print $3 }' "$BIN/.tests.list" "$BIN/.bench.list" | tail -n1)
  if [ -z "$exe" ]; then echo "gpu-prepare: no $1 executable named $2" >&2; exit 1; fi
  cp "$exe" "$BIN/$3"
  # Keep symbols for backtraces but drop DWARF line tables to stay small.
  strip --strip-debug "$BIN/$3" 2>/dev/null || true
  echo "   $BIN/$3  <- $exe"
}
copy test cuda_kernels test-cuda_kernels
copy test cuda_nvrtc test-cuda_nvrtc
copy bench cuda_kernels bench-cuda_kernels
rm -f "$BIN/.tests.list" "$BIN/.bench.list"

echo "== precompiling PTX (sm_80, sm_90) with NVRTC here"
VENV=${BATOS_NVRTC_VENV:-$ROOT/.cache/nvrtc-venv}
NV=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia 2>/dev/null | head -n1 || true)
if [ -z "$NV" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 || true
  NV=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia 2>/dev/null | head -n1 || true)
fi
if [ -n "$NV" ] && LD_LIBRARY_PATH="$NV/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    BATOS_REQUIRE_NVRTC=1 BATOS_CUDA_PTX_OUT="$ROOT/$BIN/ptx" "$BIN/test-cuda_nvrtc" --test-threads=1 >/dev/null; then
  ls "$BIN/ptx"
else
  echo "gpu-prepare: WARNING: no PTX precompiled (libnvrtc unavailable here); the GPU run compiles with its NVRTC" >&2
  rm -rf "$BIN/ptx"
fi

{
  echo "commit: $(git rev-parse HEAD) $(git diff --quiet && echo clean || echo dirty)"
  echo "built: $(date -u +%FT%TZ) on $(uname -m), $(rustc --version)"
} > "$BIN/BUILD.txt"
du -ab "$BIN" | sort -n | tail -n 12
TOTAL=$(du -sb "$BIN" | cut -f1)
echo "== .gpu-bin total: $((TOTAL / 1024 / 1024)) MiB ($TOTAL bytes)"
if [ "$TOTAL" -gt $((60 * 1024 * 1024)) ]; then echo "gpu-prepare: .gpu-bin is over 60 MiB" >&2; exit 1; fi
