#!/usr/bin/env bash
# The simulator against the real thing on this machine: `duet sim-calibrate-cpu` times the engine
# (the tiny default model) and fits the simulator's CPU device; then, at each rate, `duet bench`
# drives `duet serve` (1 prefill worker, 2 decode groups: serve's defaults) and `duet sim` replays
# the same load (256-token prompts, 64-token outputs, Poisson) on the same shape with that device.
# Prints measured vs predicted TTFT and TPOT and the error.
#
#   bash bench/sim_vs_serve.sh          # RATES="2 4 6" N=120 by default
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"2 4 6"}
N=${N:-120}
cargo build --release --quiet --bin duet
DUET=target/release/duet
OUT=$(mktemp -d)
PORT=19973
$DUET sim-calibrate-cpu --out "$OUT" > "$OUT/fit.json"
python3 - "$OUT/fit.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"fit: {f['threads']} threads, read {f['read_gb_s']:.1f} GB/s, layers {f['fitted_layer_gflops']:.1f} / lm_head+attention {f['fitted_head_gflops']:.1f} GFLOP/s, "
      f"step overhead prefill {f['prefill_step_overhead_us']:.0f} µs / decode {f['decode_step_overhead_us']:.0f} µs")
for s in f["steps"]:
    what = f"prefill {s['prefill_tokens']}" if "prefill_tokens" in s else f"decode batch {s['decode_batch']}"
    print(f"  {what:>16}: measured {s['measured_us']/1e3:7.2f} ms, model {s['model_us']/1e3:7.2f} ms")
PY
MODEL_CONFIG=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['model'])" "$OUT/fit.json")/config.json
$DUET serve --host 127.0.0.1 --port $PORT >"$OUT/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$OUT"' EXIT
until grep -q "serving" "$OUT/serve.log"; do kill -0 $PID || { cat "$OUT/serve.log"; exit 1; }; sleep 0.1; done
printf "%5s | %21s | %21s | %21s | %21s\n" rate "TTFT p50 ms (meas/sim)" "TTFT p99" "TPOT p50" "TPOT p99"
for r in $RATES; do
    $DUET bench --base-url http://127.0.0.1:$PORT --random-input-len 256 --random-output-len 64 \
        --num-prompts "$N" --request-rate "$r" --prompt-ids --seed 7 --json > "$OUT/bench.json" 2>/dev/null
    $DUET sim --model-config "$MODEL_CONFIG" --gpu "$OUT/cpu.toml" --calibration "$OUT/calibration.toml" \
        --prefill-nodes 1 --decode-nodes 2 --gpus-per-node 1 --prefill-ep 1 --decode-ep 1 \
        --decode-batch-per-gpu 32 --prefill-tokens-per-gpu 2048 \
        --isl 256 --osl 64 --rate "$r" --requests "$N" --seed 7 --json > "$OUT/sim.json"
    python3 - "$r" "$OUT/bench.json" "$OUT/sim.json" <<'PY'
import json, sys
r, b, s = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
def cell(m, p):
    return f"{m:6.1f} / {p:6.1f} {100*(p/m-1):+5.0f}%"
print(f"{r:>5} | {cell(b['median_ttft_ms'], s['ttft_ms_p50'])} | {cell(b['p99_ttft_ms'], s['ttft_ms_p99'])} | "
      f"{cell(b['median_tpot_ms'], s['tpot_ms_p50'])} | {cell(b['p99_tpot_ms'], s['tpot_ms_p99'])}"
      + (f"  ({b['failed']} failed)" if b['failed'] else ""))
PY
done
