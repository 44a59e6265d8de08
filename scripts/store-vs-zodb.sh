#!/usr/bin/env bash
# ZODB bench part b beside batos on the same workload, interleaved so both see the same
# disk weather: each round runs ZODB (500 txns x 100 OOBTree inserts into a fresh tree,
# one rep) and then batos's `btree_txn_profile 500` (the same keys and values into a fresh
# image), and prints both rates, the ratio, and a median over rounds.
#
# usage: scripts/store-vs-zodb.sh [ROUNDS] [WORKDIR]
#   ZODB from $ZODB_PY (default /work/venv-zodb/bin/python; `pip install ZODB` in a venv),
#   its script from $ZODB_BENCH (default ../shared/bench/zodb/bench_zodb.py).
set -euo pipefail
rounds=${1:-3}
work=${2:-$(mktemp -d /tmp/store-vs-zodb.XXXX)}
py=${ZODB_PY:-/work/venv-zodb/bin/python}
zb=${ZODB_BENCH:-$(cd "$(dirname "$0")/.." && pwd)/../shared/bench/zodb/bench_zodb.py}
cargo build --release -q -p batos-store --example btree_txn_profile
bin=${CARGO_TARGET_DIR:-target}/release/examples/btree_txn_profile
mkdir -p "$work"
ratios=()
for r in $(seq 1 "$rounds"); do
  "$py" "$zb" --workdir "$work/zodb" --reps 1 --only b --json "$work/zodb-$r.json" >/dev/null
  z=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['b']['commits_per_s']['median'])" "$work/zodb-$r.json")
  b=$(BATOS_BENCH_DIR="$work" "$bin" 500 | sed -n 's/.*: \([0-9.]*\) txns\/s.*/\1/p')
  ratio=$(python3 -c "print(f'{$b/$z:.2f}')")
  ratios+=("$ratio")
  echo "round $r $(date -u +%H:%M:%S): ZODB $z txns/s, batos $b txns/s, ratio ${ratio}x"
done
python3 -c "import statistics,sys; print('median ratio', statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}"
