#!/usr/bin/env bash
# duet vs HF transformers on one checkpoint, same machine, same thread count.
#
# Usage: bench/model_vs_hf.sh [MODEL_DIR]
#
#   MODEL_DIR   checkpoint in a released layout (DeepSeek-V3, or R1-Distill's Qwen2/Llama). Default:
#               target/bench-model[-SHAPE], written when absent (random weights, see SHAPE).
#
# Environment:
#   SHAPE       the default checkpoint's shape: v3-bench (default; `duet tiny-model --arch v3-bench`),
#               r1-distill-qwen-1.5b or r1-distill-qwen-7b (`duet tiny-model --arch qwen2` with the
#               released model's dimensions: 3.6 GB and 15.2 GB of BF16).
#   THREADS     threads for both engines (default: nproc); duet gets RAYON_NUM_THREADS, HF --threads.
#   HF_VENV     an existing virtualenv with torch, transformers (>= 5) and safetensors. Default:
#               .venv-bench in the repository root, created (python3 -m venv + pip install from PyPI)
#               when missing or incomplete.
#   HF_DTYPES   the HF runs, default "bf16 f32" (a 7B model's f32 copy, 30 GB, needs that much memory).
#   BENCH_ARGS  extra flags for both benchmarks, e.g. "--prompt-len 256 --decode-steps 8"
#               (both accept --prompt-len --batches --decode-context --decode-steps --repeats).
#
# Steps: cargo build --release; duet engine-bench (bf16); HF (bf16, then f32), one after the other,
# never concurrently. Writes target/bench-results/{duet-bf16,hf-bf16,hf-f32}.json and table.md, and
# prints the markdown table (bench/compare.py).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
if [[ $# -gt 1 ]]; then usage >&2; exit 2; fi

# Resolve a user-given model dir before moving to the repository root.
MODEL=""
if [[ $# -eq 1 ]]; then
    [[ -d $1 ]] || { echo "model_vs_hf.sh: no such directory: $1" >&2; exit 2; }
    MODEL="$(cd "$1" && pwd)"
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

THREADS="${THREADS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)}"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || { echo "model_vs_hf.sh: THREADS must be a positive integer, got '$THREADS'" >&2; exit 2; }
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
OUT="$ROOT/target/bench-results"
DUET="$ROOT/target/release/duet"

echo "== cargo build --release" >&2
cargo build --release

SHAPE="${SHAPE:-v3-bench}"
case "$SHAPE" in
    v3-bench) TINY=(--arch v3-bench) ;;
    # The released configs' dimensions (vocabulary, rope and the rest are R1-Distill-Qwen's already).
    r1-distill-qwen-1.5b) TINY=(--arch qwen2 --config-overrides '{"hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "max_window_layers": 21}') ;;
    r1-distill-qwen-7b) TINY=(--arch qwen2 --config-overrides '{"hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "max_window_layers": 28, "vocab_size": 152064}') ;;
    *) echo "model_vs_hf.sh: unknown SHAPE '$SHAPE'" >&2; exit 2 ;;
esac
if [[ -z $MODEL ]]; then
    MODEL="$ROOT/target/bench-model"
    [[ $SHAPE == v3-bench ]] || MODEL="$MODEL-$SHAPE"
    if [[ ! -f $MODEL/config.json ]]; then
        echo "== writing the benchmark checkpoint to $MODEL" >&2
        rm -rf "$MODEL.tmp"
        "$DUET" tiny-model "${TINY[@]}" --out "$MODEL.tmp"
        rm -rf "$MODEL"
        mv "$MODEL.tmp" "$MODEL"
    fi
fi

# Python environment for the HF side.
if [[ -n ${HF_VENV:-} ]]; then
    PY="$HF_VENV/bin/python"
    [[ -x $PY ]] || { echo "model_vs_hf.sh: HF_VENV=$HF_VENV has no bin/python" >&2; exit 2; }
    "$PY" -c 'import torch, transformers, safetensors' ||
        { echo "model_vs_hf.sh: HF_VENV lacks torch/transformers/safetensors" >&2; exit 2; }
else
    VENV="$ROOT/.venv-bench"
    PY="$VENV/bin/python"
    if [[ ! -x $PY ]]; then
        echo "== creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if ! "$PY" -c 'import torch, transformers, safetensors' 2>/dev/null; then
        echo "== installing torch, transformers, safetensors into $VENV (PyPI)" >&2
        "$PY" -m pip install --upgrade pip
        "$PY" -m pip install torch 'transformers>=5' safetensors
    fi
fi

mkdir -p "$OUT"
rm -f "$OUT"/duet-bf16.json "$OUT"/hf-bf16.json "$OUT"/hf-f32.json "$OUT"/table.md
# Each result is written to a temporary file and renamed, so a failed run leaves no stale JSON.
run_to() {
    local dest="$1"
    shift
    "$@" >"$dest.tmp" || { local rc=$?; rm -f "$dest.tmp"; return "$rc"; }
    mv "$dest.tmp" "$dest"
}

echo "== duet engine-bench bf16, $THREADS threads, $MODEL" >&2
run_to "$OUT/duet-bf16.json" env RAYON_NUM_THREADS="$THREADS" \
    "$DUET" engine-bench --model "$MODEL" --dtype bf16 --json ${EXTRA[@]+"${EXTRA[@]}"}

read -r -a HF_DTYPES <<<"${HF_DTYPES:-bf16 f32}"
HF_JSON=()
for dtype in "${HF_DTYPES[@]}"; do
    [[ $dtype == bf16 || $dtype == f32 ]] || { echo "model_vs_hf.sh: HF_DTYPES takes bf16 and f32, got '$dtype'" >&2; exit 2; }
    HF_JSON+=("$OUT/hf-$dtype.json")
    echo "== HF transformers $dtype, $THREADS threads" >&2
    run_to "$OUT/hf-$dtype.json" env CUDA_VISIBLE_DEVICES="" \
        "$PY" "$ROOT/bench/hf_engine_bench.py" --model "$MODEL" --dtype "$dtype" --threads "$THREADS" --json ${EXTRA[@]+"${EXTRA[@]}"}
done

echo >&2
"$PY" "$ROOT/bench/compare.py" "$OUT/duet-bf16.json" "${HF_JSON[@]}" | tee "$OUT/table.md"
echo >&2
echo "results: $OUT/{duet-bf16,hf-bf16,hf-f32}.json, table: $OUT/table.md" >&2
