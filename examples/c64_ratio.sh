#!/bin/bash
# 64 clients (one 14-token text each) against the offline ceiling, two trees side by side.
#
#   examples/c64_ratio.sh OLD_SRC NEW_SRC [ROUNDS]     e.g. /tmp/old/src src 3
#
# Both servers run at once (real model, --log-level warning); the offline ceiling (2 streams x 1
# thread, batch 32, 10 s) runs before the first load and after each; each 15 s load (every text
# unique, its own seed) is divided by the mean of the ceilings on either side; the trees'
# order alternates by round. The machine's speed moves between minutes, hence the ceiling
# around every load. docs/benchmarks.md ("issue 16, fourth round") holds a run.
set -euo pipefail
OLD=$(realpath "$1"); NEW=$(realpath "$2"); ROUNDS=${3:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
WORK=$(mktemp -d)
ceiling() {
  PYTHONPATH=$HERE/src $PY -m embedplex bench offline --tokens 14 --batch 32 --streams 2 \
    --threads 1 --min-time 10 --json - 2>/dev/null |
    $PY -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.find('['):])[0]['texts_per_s'],1))"
}
load() {  # stderr shown: a failed load (--strict: any request failed) stops the script, loudly
  PYTHONPATH=$HERE/src $PY -m embedplex bench load --url "http://127.0.0.1:$1" --concurrency 64 \
    --duration 15 --warmup 64 --repeat 0 --seed "$2" --strict --json - |
    $PY -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.find('{'):])['req_per_s'],1))"
}
serve() {  # PORT SRC
  EMBEDPLEX_DATA_DIR=$WORK/data-$1 PYTHONPATH=$2 $PY -m embedplex serve --host 127.0.0.1 \
    --port "$1" --log-level warning >"$WORK/serve-$1.log" 2>&1 &
  echo $!
}
PIDS="$(serve 8201 "$OLD") $(serve 8202 "$NEW")"
trap 'kill $PIDS 2>/dev/null; rm -rf "$WORK"' EXIT
for port in 8201 8202; do
  for _ in $(seq 300); do curl -sf "127.0.0.1:$port/health/ready" >/dev/null && break; sleep 1; done
done
C=$(ceiling)
for r in $(seq 0 $((ROUNDS - 1))); do
  if [ $((r % 2)) = 0 ]; then order="8201 8202"; else order="8202 8201"; fi
  for port in $order; do
    tree=old; [ "$port" = 8202 ] && tree=new
    L=$(load "$port" $((100 + r))); C2=$(ceiling)
    echo "round $r $tree req/s $L ceiling $C / $C2 ratio $($PY -c "print(round($L / (($C + $C2) / 2), 3))")"
    C=$C2
  done
done
