#!/usr/bin/env bash
# Prefill of a 4,096-token prompt on the v3-bench checkpoint (8 layers, hidden 2048) with its KV
# going to the decode group in-process (`duet serve`), over QUIC, and over UCX shared memory (role
# processes), in one run: TTFT is the prefill compute plus whatever of the layer-wise transfer the
# compute did not hide. Requests go one at a time, each with a fresh prompt (no prefix cache hit).
#
#   bash bench/kv_overlap.sh                 # N=3; builds with --features ucx
#   DUET=/path/to/other/duet bash bench/kv_overlap.sh   # the same load against another build
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3}
if [ -z "${DUET:-}" ]; then
    cargo build --release --quiet --bin duet --features ucx
    DUET=target/release/duet
fi
LOG=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$LOG"' EXIT
head -c 32 /dev/urandom | base64 >"$LOG/secret"
$DUET tiny-model --arch v3-bench --out "$LOG/model" 2>/dev/null

wait_for() { # file pattern
    until grep -q "$2" "$1"; do sleep 0.05; done
}

bench() { # label url
    out=$($DUET bench --base-url "$2" --random-input-len 4096 --random-output-len 2 \
        --num-prompts "$N" --max-concurrency 1 --prompt-ids --seed 11 --warmup 1 --json 2>/dev/null)
    python3 - "$1" "$out" <<'PY'
import json, sys
label, out = sys.argv[1:]
d = json.loads(out)
print(f"{label:<34} {d['median_ttft_ms']:10.1f} {d['mean_ttft_ms']:10.1f} {d['p99_ttft_ms']:10.1f} {d['failed']:7d}")
PY
}

printf "%-34s %10s %10s %10s %7s\n" "KV path" ttft_p50 ttft_mean ttft_max failed

$DUET serve --model "$LOG/model" --host 127.0.0.1 --port 19991 --decode-groups 1 >"$LOG/serve" 2>&1 &
PIDS+=($!)
wait_for "$LOG/serve" "serving"
bench "in-process (duet serve)" http://127.0.0.1:19991
kill "${PIDS[-1]}"

cluster() { # label kv-transport-args...
    local label=$1
    shift
    $DUET gateway --model "$LOG/model" --host 127.0.0.1 --port 19992 --cluster-port 19993 \
        --secret-file "$LOG/secret" >"$LOG/gw" 2>&1 &
    local gw=$!
    PIDS+=($gw)
    wait_for "$LOG/gw" "duet gateway serving"
    $DUET prefill --model "$LOG/model" --join 127.0.0.1:19993 --secret-file "$LOG/secret" "$@" >"$LOG/p" 2>&1 &
    local p=$!
    $DUET decode --model "$LOG/model" --join 127.0.0.1:19993 --secret-file "$LOG/secret" "$@" >"$LOG/d" 2>&1 &
    local d=$!
    PIDS+=($p $d)
    until [ "$(grep -c '^joined ' "$LOG/gw")" -ge 2 ]; do sleep 0.05; done
    bench "$label" http://127.0.0.1:19992
    kill $gw $p $d
    wait $gw $p $d 2>/dev/null || true
}

cluster "3 processes, KV over QUIC"
cluster "3 processes, KV over UCX shm" --kv-transport ucx --ucx-tls sysv,posix,cma,self
