#!/usr/bin/env bash
# Where the gateway's CPU goes at high concurrency: `duet serve --engine echo` under `duet bench`
# (512 streams × 128 tokens by default), sampled with perf (Debian's linux-perf) with DWARF call
# graphs, and every sample put in one category of the serving path by the frames on its stack
# (bench/perf_categories.py). Prints each category's share and its CPU milliseconds per request.
#
#   bash bench/gateway_profile.sh                      # this tree's release build
#   bash bench/gateway_profile.sh /path/to/older/duet  # the same for another build (before/after)
set -euo pipefail
cd "$(dirname "$0")/.."
C=${C:-512} N=${N:-4000} PORT=${PORT:-19970}
cargo build --release --quiet --bin duet
BIN=${1:-target/release/duet}
LOGS=$(mktemp -d)
"$BIN" serve --engine echo --host 127.0.0.1 --port "$PORT" --queue-max 4096 --max-running 1024 \
    --kv-pages 4096 >"$LOGS/echo.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$LOGS"' EXIT
until grep -q serving "$LOGS/echo.log"; do
    kill -0 $PID || { cat "$LOGS/echo.log"; exit 1; }
    sleep 0.1
done
bench() {
    target/release/duet bench --base-url "http://127.0.0.1:$PORT" --random-input-len 32 \
        --random-output-len 128 --num-prompts "$1" --prompt-ids --json --max-concurrency "$C"
}
bench 500 >/dev/null # warm-up: the first requests build the tokenizer's tables
# The recording covers the whole measured run (it is CPU time that is sampled, so idle time
# before and after adds no samples).
perf record -F 999 -g --call-graph dwarf,16384 -p $PID -o "$LOGS/perf.data" 2>/dev/null &
PERF=$!
sleep 0.5
bench "$N" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(f"{d[\"completed\"]} requests, {d[\"output_throughput\"]:.0f} tok/s, ITL p99 {d[\"p99_itl_ms\"]:.2f} ms, failed {d[\"failed\"]}")'
kill -INT $PERF
wait $PERF || true
python3 bench/perf_categories.py "$LOGS/perf.data" "$N"
