#!/usr/bin/env bash
# The cost of crossing processes: `duet bench` against `duet serve` (gateway, 1 prefill worker and
# 1 decode group as actors of one process, KV through the in-process transport) and against the
# same shape as three processes (`duet gateway` + `duet prefill` + `duet decode`, control over
# QUIC, KV over QUIC — and over UCX shared memory when built with --features ucx), in one run,
# same load, embedded tiny model.
#
#   bash bench/cluster_vs_serve.sh          # N=120 RATE=4 by default; UCX=1 adds the UCX row
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-120}
RATE=${RATE:-4}
FEATURES=()
if [ "${UCX:-0}" = 1 ]; then FEATURES=(--features ucx); fi
cargo build --release --quiet --bin duet "${FEATURES[@]}"
DUET=target/release/duet
LOG=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
head -c 32 /dev/urandom | base64 >"$LOG/secret"

wait_for() { # file pattern
    until grep -q "$2" "$1"; do sleep 0.05; done
}

bench() { # label url
    out=$($DUET bench --base-url "$2" --random-input-len 256 --random-output-len 64 \
        --num-prompts "$N" --request-rate "$RATE" --prompt-ids --seed 7 --json 2>/dev/null)
    python3 - "$1" "$out" <<'PY'
import json, sys
label, out = sys.argv[1:]
d = json.loads(out)
print(f"{label:<34} {d['request_throughput']:7.2f} {d['median_ttft_ms']:9.1f} {d['p99_ttft_ms']:9.1f} "
      f"{d['median_tpot_ms']:9.1f} {d['p99_tpot_ms']:9.1f} {d['p99_itl_ms']:9.1f} {d['failed']:7d}")
PY
}

printf "%-34s %7s %9s %9s %9s %9s %9s %7s\n" setup "req/s" ttft_p50 ttft_p99 tpot_p50 tpot_p99 itl_p99 failed

$DUET serve --host 127.0.0.1 --port 19981 --decode-groups 1 >"$LOG/serve" 2>&1 &
PIDS+=($!)
wait_for "$LOG/serve" "serving"
bench "duet serve (one process)" http://127.0.0.1:19981
kill "${PIDS[-1]}"

cluster() { # label kv-transport-args...
    local label=$1
    shift
    $DUET gateway --host 127.0.0.1 --port 19982 --cluster-port 19983 --secret-file "$LOG/secret" >"$LOG/gw" 2>&1 &
    local gw=$!
    PIDS+=($gw)
    wait_for "$LOG/gw" "duet gateway serving"
    $DUET prefill --join 127.0.0.1:19983 --secret-file "$LOG/secret" "$@" >"$LOG/p" 2>&1 &
    local p=$!
    $DUET decode --join 127.0.0.1:19983 --secret-file "$LOG/secret" "$@" >"$LOG/d" 2>&1 &
    local d=$!
    PIDS+=($p $d)
    until [ "$(grep -c '^joined ' "$LOG/gw")" -ge 2 ]; do sleep 0.05; done
    bench "$label" http://127.0.0.1:19982
    kill $gw $p $d
    wait $gw $p $d 2>/dev/null || true
}

cluster "3 processes, KV over QUIC"
if [ "${UCX:-0}" = 1 ]; then
    cluster "3 processes, KV over UCX shm" --kv-transport ucx --ucx-tls sysv,posix,cma,self
fi
