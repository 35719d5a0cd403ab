#!/usr/bin/env bash
# Gateway overhead: `duet serve --engine echo` (the whole serving path — HTTP, validation, actors,
# routing, per-token detokenization, stop/reasoning processing, SSE — around an engine that
# computes nothing) and the same path split over processes (`duet gateway` + `duet prefill` +
# `duet decode`, echo engine, control plane over QUIC on loopback), against a bare axum SSE server
# streaming the same chunks (examples/sse_floor.rs), measured in the same run with the same load
# generator (`duet bench`) on the same machine.
#
# One line per case: client-side figures, the server's CPU time per request (all three processes
# summed for the cluster), and the load generator's own CPU time per request and its share of the
# machine's cores over the case (so that a load generator near 100 % shows it is the bottleneck).
#
#   bash bench/gateway_overhead.sh            # 2000 requests × 128 tokens per case
#   CASES="--max-concurrency 512" SIDES="floor duet" bash bench/gateway_overhead.sh
#   BASELINE=/path/to/an/older/duet bash bench/gateway_overhead.sh   # adds its `serve --engine echo`
#                                                                     # as side "baseline"
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
SIDES=${SIDES:-floor ${BASELINE:+baseline} duet cluster}
cargo build --release --quiet --bin duet --example sse_floor
DUET=target/release/duet
ECHO_PORT=19970 BASE_PORT=19975 FLOOR_PORT=19980 GW_PORT=19990 GW_CLUSTER_PORT=19991
# Every stream runs at once: 4096 pages of 64 tokens hold 512 streams of 32 + 128 tokens many
# times over (the default pool would queue most of them at the gateway, which is not what this
# measures).
POOL="--max-running 1024 --kv-pages 4096"
LOGS=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; rm -rf "$LOGS"' EXIT

# shellcheck disable=SC2086
$DUET serve --engine echo --host 127.0.0.1 --port $ECHO_PORT --queue-max 4096 $POOL >"$LOGS/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=($ECHO_PID)
BASE_PID=
if [ -n "${BASELINE:-}" ]; then
    # shellcheck disable=SC2086
    "$BASELINE" serve --engine echo --host 127.0.0.1 --port $BASE_PORT --queue-max 4096 $POOL >"$LOGS/base.log" 2>&1 &
    BASE_PID=$!
    PIDS+=($BASE_PID)
fi
target/release/examples/sse_floor $FLOOR_PORT >"$LOGS/floor.log" 2>&1 &
FLOOR_PID=$!
PIDS+=($FLOOR_PID)
head -c 32 /dev/urandom | base64 >"$LOGS/secret"
$DUET gateway --engine echo --host 127.0.0.1 --port $GW_PORT --cluster-port $GW_CLUSTER_PORT \
    --secret-file "$LOGS/secret" --queue-max 4096 >"$LOGS/gw.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
# shellcheck disable=SC2086
$DUET prefill --engine echo --join 127.0.0.1:$GW_CLUSTER_PORT --secret-file "$LOGS/secret" $POOL >"$LOGS/prefill.log" 2>&1 &
PREFILL_PID=$!
PIDS+=($PREFILL_PID)
# shellcheck disable=SC2086
$DUET decode --engine echo --join 127.0.0.1:$GW_CLUSTER_PORT --secret-file "$LOGS/secret" $POOL >"$LOGS/decode.log" 2>&1 &
DECODE_PID=$!
PIDS+=($DECODE_PID)
until grep -q "serving" "$LOGS/echo.log" && grep -q "floor at" "$LOGS/floor.log" \
    && { [ -z "$BASE_PID" ] || grep -q "serving" "$LOGS/base.log"; } \
    && [ "$(grep -c '^joined ' "$LOGS/gw.log")" -ge 2 ]; do
    for p in "${PIDS[@]}"; do
        kill -0 "$p" || { tail -n 5 "$LOGS"/*.log; exit 1; }
    done
    sleep 0.1
done

cpu_ticks() {
    local t=0
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo $t
}
TICK=$(getconf CLK_TCK)
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); server and load generator share them"
printf "%-8s %-22s %8s %9s %11s %8s %8s %7s %11s %11s %9s\n" server case "req/s" "tok/s" "ttft_p50ms" "p99ms" \
    "itl_p99" "failed" "srv_cpu_ms" "gen_cpu_ms" "gen_share"
CASES=${CASES:-"--max-concurrency 64|--max-concurrency 512|--request-rate 200 --max-concurrency 64|--request-rate 800 --max-concurrency 64"}
IFS='|' read -r -a CASE_LIST <<<"$CASES"
for case in "${CASE_LIST[@]}"; do
    for side in $SIDES; do
        case $side in
            floor) port=$FLOOR_PORT pids="$FLOOR_PID" ;;
            baseline) port=$BASE_PORT pids="$BASE_PID" ;;
            duet) port=$ECHO_PORT pids="$ECHO_PID" ;;
            cluster) port=$GW_PORT pids="$GW_PID $PREFILL_PID $DECODE_PID" ;;
        esac
        # shellcheck disable=SC2086
        before=$(cpu_ticks $pids)
        # The load generator runs under Python so that its own CPU time (RUSAGE_CHILDREN) and
        # wall time are measured around it.
        # shellcheck disable=SC2086
        out=$(python3 - "$N" "$port" $case <<'PY'
import json, resource, subprocess, sys, time
n, port, *case = sys.argv[1:]
t0 = time.monotonic()
r = subprocess.run(["target/release/duet", "bench", "--base-url", f"http://127.0.0.1:{port}",
                    "--random-input-len", "32", "--random-output-len", "128", "--num-prompts", n,
                    "--prompt-ids", "--json", *case], capture_output=True, text=True, check=True)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
d = json.loads(r.stdout)
d["gen_cpu_s"] = ru.ru_utime + ru.ru_stime
d["gen_wall_s"] = wall
print(json.dumps(d))
PY
)
        # shellcheck disable=SC2086
        after=$(cpu_ticks $pids)
        python3 - "$side" "$case" "$out" "$before" "$after" "$TICK" "$(nproc)" <<'PY'
import json, sys
side, case, out, before, after, tick, cores = sys.argv[1:]
d = json.loads(out)
done = max(d["completed"], 1)
cpu_ms = (int(after) - int(before)) * 1000 / int(tick) / done
gen_ms = d["gen_cpu_s"] * 1000 / done
share = d["gen_cpu_s"] / (d["gen_wall_s"] * int(cores))
case = case.replace("--max-concurrency", "conc").replace("--request-rate", "rate")
print(f"{side:8} {case:22} {d['request_throughput']:8.0f} {d['output_throughput']:9.0f} "
      f"{d['median_ttft_ms']:11.2f} {d['p99_ttft_ms']:8.2f} {d['p99_itl_ms']:8.2f} {d['failed']:7d} "
      f"{cpu_ms:11.3f} {gen_ms:11.3f} {share:9.0%}")
PY
    done
done
