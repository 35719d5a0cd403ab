#!/usr/bin/env bash
# `duet bench` against `duet serve` on the embedded tiny model (this CPU), at three Poisson
# request rates: TTFT / TPOT / ITL percentiles as load approaches saturation.
#
#   bash bench/serve_tiny.sh            # RATES="2 4 6" N=120 by default
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"2 4 6"}
N=${N:-120}
cargo build --release --quiet --bin duet
DUET=target/release/duet
PORT=19972
$DUET serve --host 127.0.0.1 --port $PORT >/tmp/duet-tiny.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null' EXIT
until grep -q "serving" /tmp/duet-tiny.log; do kill -0 $PID || { cat /tmp/duet-tiny.log; exit 1; }; sleep 0.1; done
printf "%5s %7s %8s %8s %9s %9s %9s %9s %9s %7s\n" rate "req/s" "in tok/s" "out tok/s" "ttft_p50" "ttft_p99" "tpot_p50" "tpot_p99" "itl_p99" failed
for r in $RATES; do
    out=$($DUET bench --base-url http://127.0.0.1:$PORT --random-input-len 256 --random-output-len 64 \
        --num-prompts "$N" --request-rate "$r" --prompt-ids --seed 7 --json 2>/dev/null)
    python3 - "$r" "$out" <<'PY'
import json, sys
r, out = sys.argv[1:]
d = json.loads(out)
print(f"{r:>5} {d['request_throughput']:7.2f} {d['input_throughput']:8.0f} {d['output_throughput']:8.0f} "
      f"{d['median_ttft_ms']:9.1f} {d['p99_ttft_ms']:9.1f} {d['median_tpot_ms']:9.1f} {d['p99_tpot_ms']:9.1f} "
      f"{d['p99_itl_ms']:9.1f} {d['failed']:7d}")
PY
done
