#!/usr/bin/env bash
# Per-request overhead of Ray Serve replicas against in-process serving, side by side
# (docs/ray.md#overhead): the default model in-process (2 streams x 1 thread on 2 cores) and as
# two replicas of num_cpus = 1 (examples/ray.toml) on a local 2-CPU Ray cluster; c=1 latency and
# c=16 throughput, 14-token texts, one per request. Needs the embedplex[ray] extra.
#
#   bash examples/ray_overhead.sh [seconds per run, default 20]
set -euo pipefail
SECONDS_PER_RUN=${1:-20}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-$(mktemp -d)}
RAY_PORT=${RAY_PORT:-6390}

cleanup() {
  [ -n "${LOCAL_PID:-}" ] && kill "$LOCAL_PID" 2>/dev/null || true
  [ -n "${RAY_GW_PID:-}" ] && kill "$RAY_GW_PID" 2>/dev/null && wait "$RAY_GW_PID" 2>/dev/null || true
  # Only this script's cluster: `ray start --block` stops the processes it started when it gets
  # SIGTERM, after up to 30 s of draining (`ray stop` would stop every Ray cluster this user
  # runs on the machine).
  [ -n "${RAY_HEAD_PID:-}" ] && kill "$RAY_HEAD_PID" 2>/dev/null && wait "$RAY_HEAD_PID" 2>/dev/null || true
  [ -n "${RAY_TMP:-}" ] && rm -rf "$RAY_TMP"
}
trap cleanup EXIT

wait_ready() {
  for _ in $(seq 600); do
    curl -sf "$1/health/ready" >/dev/null && return 0
    sleep 0.5
  done
  echo "not ready: $1" >&2; return 1
}

SEED=0
bench() {  # url setup; every text new (--repeat 0): the in-process cache cannot answer
  SEED=$((SEED + 1))
  "$BIN/embedplex" bench load --url "$1" --model minilm --concurrency 1 --duration "$SECONDS_PER_RUN" \
    --warmup 20 --repeat 0 --seed "$SEED" --setup "$2 c=1" --json "$OUT/$2-c1.json"
  SEED=$((SEED + 1))
  "$BIN/embedplex" bench load --url "$1" --model minilm --concurrency 16 --duration "$SECONDS_PER_RUN" \
    --warmup 50 --repeat 0 --seed "$SEED" --setup "$2 c=16" --json "$OUT/$2-c16.json"
}

# In-process, alone on the machine (ONLY=ray skips it, ONLY=local skips Ray).
if [ "${ONLY:-}" != ray ]; then
"$BIN/embedplex" serve --port 8091 --served-model-name minilm >"$OUT/local.log" 2>&1 &
LOCAL_PID=$!
wait_ready http://127.0.0.1:8091
bench http://127.0.0.1:8091 in-process
kill "$LOCAL_PID"; wait "$LOCAL_PID" 2>/dev/null || true; LOCAL_PID=
fi
[ "${ONLY:-}" = local ] && exit 0

# Two Ray Serve replicas behind one gateway, alone on the machine, with token authentication
# (docs/ray.md): Ray 2.60's `ray start` refuses RAY_AUTH_MODE=token without a token, and turns it
# on by itself when ~/.ray/auth_token exists, while clients that name the address (RAY_ADDRESS,
# below) must say so. So a token is made if there is none (never printed), and every client
# (ray status, the gateway) says token.
# Its address is given to every client, so that none picks another cluster on this machine, and
# its files are in a temp dir of its own: the address file it leaves in /tmp/ray otherwise would
# send a later plain `ray.init()` on this machine to a cluster that is gone.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
[ "$RAY_AUTH_MODE" = token ] && "$BIN/ray" get-auth-token --generate >/dev/null 2>&1
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
RAY_TMP=$(mktemp -d)  # short: Ray's socket paths live below it
"$BIN/ray" start --head --block --port "$RAY_PORT" --num-cpus 2 --include-dashboard false \
  --disable-usage-stats --temp-dir "$RAY_TMP" >"$OUT/ray.log" 2>&1 &
RAY_HEAD_PID=$!
for _ in $(seq 60); do "$BIN/ray" status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break; sleep 1; done
"$BIN/embedplex" serve --port 8092 --config examples/ray.toml \
  >"$OUT/ray-gateway.log" 2>&1 &
RAY_GW_PID=$!
wait_ready http://127.0.0.1:8092
bench http://127.0.0.1:8092 ray-2-replicas
echo "results in $OUT"
