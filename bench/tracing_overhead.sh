#!/usr/bin/env bash
# What OpenTelemetry tracing costs: `duet serve --engine echo` (the whole serving path around an
# engine that computes nothing) with tracing off, on at 100 % and on at 1 % sampling, exporting
# OTLP/HTTP to examples/otlp_sink.rs (which decodes and counts the spans), in the same run with
# the same load generator (`duet bench`). One line per case: client-side figures, the server's
# CPU time per request, and the spans the sink received.
#
#   bash bench/tracing_overhead.sh            # N=2000 requests × 128 tokens per case, 64 streams
#   PROFILE=test bash bench/tracing_overhead.sh   # the test profile's build (opt-level 1)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" --quiet --bin duet --example otlp_sink
DIR=target/$([ "$PROFILE" = release ] && echo release || echo debug)
DUET=$DIR/duet
SINK_PORT=19990 PORT=19991
$DIR/examples/otlp_sink $SINK_PORT >/tmp/duet-otlp-sink.log 2>&1 &
SINK_PID=$!
PID=
trap 'kill $SINK_PID $PID 2>/dev/null' EXIT
until grep -q "sink at" /tmp/duet-otlp-sink.log; do kill -0 $SINK_PID; sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
TICK=$(getconf CLK_TCK)
spans() { curl -s http://127.0.0.1:$SINK_PORT/spans; }

printf "%-10s %-22s %9s %10s %12s %9s %9s %7s %10s %9s\n" tracing case "req/s" "tok/s" "ttft_p50ms" "p99ms" "itl_p99" failed "cpu_ms/req" spans
for case in "--max-concurrency 64" "--request-rate 200 --max-concurrency 64"; do
    for tracing in off 100% 1%; do
        env=()
        case $tracing in
            off) ;;
            100%) env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=1.0) ;;
            1%) env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.01) ;;
        esac
        env "${env[@]}" $DUET serve --engine echo --host 127.0.0.1 --port $PORT --queue-max 4096 --max-running 1024 >/tmp/duet-trace-bench.log 2>&1 &
        PID=$!
        until grep -q "serving" /tmp/duet-trace-bench.log; do kill -0 $PID || { cat /tmp/duet-trace-bench.log; exit 1; }; sleep 0.1; done
        spans_before=$(spans)
        before=$(cpu_ticks $PID)
        # shellcheck disable=SC2086
        out=$($DUET bench --base-url http://127.0.0.1:$PORT --random-input-len 32 --random-output-len 128 \
            --num-prompts $N --prompt-ids --json $case 2>/dev/null)
        after=$(cpu_ticks $PID)
        # SIGTERM drains and flushes the spans still queued.
        kill -TERM $PID; wait $PID || true; PID=
        spans_after=$(spans)
        python3 - "$tracing" "$case" "$out" "$before" "$after" "$TICK" "$((spans_after - spans_before))" <<'PY'
import json, sys
tracing, case, out, before, after, tick, spans = sys.argv[1:]
d = json.loads(out)
cpu_ms = (int(after) - int(before)) * 1000 / int(tick) / max(d["completed"], 1)
case = case.replace("--max-concurrency", "conc").replace("--request-rate", "rate")
print(f"{tracing:10} {case:22} {d['request_throughput']:9.0f} {d['output_throughput']:10.0f} "
      f"{d['median_ttft_ms']:12.2f} {d['p99_ttft_ms']:9.2f} {d['p99_itl_ms']:9.2f} {d['failed']:7d} {cpu_ms:10.3f} {spans:>9}")
PY
    done
done
