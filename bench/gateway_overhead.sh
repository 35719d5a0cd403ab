#!/usr/bin/env bash
# Gateway overhead: `duet serve --engine echo` (the whole serving path — HTTP, validation, actors,
# routing, per-token detokenization, stop/reasoning processing, SSE — around an engine that
# computes nothing) against a bare axum SSE server streaming the same chunks (examples/sse_floor.rs),
# measured in the same run with the same load generator (`duet bench`) on the same machine.
# Prints one line per case with client-side figures and the server's CPU time per request.
#
#   bash bench/gateway_overhead.sh            # 2000 requests × 128 tokens per case
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
cargo build --release --quiet --bin duet --example sse_floor
DUET=target/release/duet
ECHO_PORT=19970 FLOOR_PORT=19980
$DUET serve --engine echo --host 127.0.0.1 --port $ECHO_PORT --queue-max 4096 --max-running 1024 >/tmp/duet-echo.log 2>&1 &
ECHO_PID=$!
target/release/examples/sse_floor $FLOOR_PORT >/tmp/duet-floor.log 2>&1 &
FLOOR_PID=$!
trap 'kill $ECHO_PID $FLOOR_PID 2>/dev/null' EXIT
until grep -q "serving" /tmp/duet-echo.log && grep -q "floor at" /tmp/duet-floor.log; do
    kill -0 $ECHO_PID && kill -0 $FLOOR_PID || { cat /tmp/duet-echo.log; exit 1; }
    sleep 0.1
done

cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
TICK=$(getconf CLK_TCK)

printf "%-6s %-22s %9s %10s %12s %9s %9s %9s %10s\n" server case "req/s" "tok/s" "ttft_p50ms" "p99ms" "itl_p99" "failed" "cpu_ms/req"
for case in "--max-concurrency 64" "--max-concurrency 512" "--request-rate 200 --max-concurrency 64" "--request-rate 800 --max-concurrency 64"; do
    for side in floor duet; do
        if [ $side = floor ]; then port=$FLOOR_PORT pid=$FLOOR_PID; else port=$ECHO_PORT pid=$ECHO_PID; fi
        before=$(cpu_ticks $pid)
        # shellcheck disable=SC2086
        out=$($DUET bench --base-url http://127.0.0.1:$port --random-input-len 32 --random-output-len 128 \
            --num-prompts $N --prompt-ids --json $case 2>/dev/null)
        after=$(cpu_ticks $pid)
        python3 - "$side" "$case" "$out" "$before" "$after" "$TICK" <<'PY'
import json, sys
side, case, out, before, after, tick = sys.argv[1:]
d = json.loads(out)
cpu_ms = (int(after) - int(before)) * 1000 / int(tick) / max(d["completed"], 1)
case = case.replace("--max-concurrency", "conc").replace("--request-rate", "rate")
print(f"{side:6} {case:22} {d['request_throughput']:9.0f} {d['output_throughput']:10.0f} "
      f"{d['median_ttft_ms']:12.2f} {d['p99_ttft_ms']:9.2f} {d['p99_itl_ms']:9.2f} {d['failed']:9d} {cpu_ms:10.3f}")
PY
    done
done
