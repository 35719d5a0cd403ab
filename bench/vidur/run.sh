#!/usr/bin/env bash
# Reproduce the Vidur wall-time measurements offline.
# Vidur's profiles come from the Hugging Face Hub, which this machine cannot reach: profile/ holds a
# transcription of Vidur's own Llama-2-7B/A100 profile (see profile/README.txt) and make_hf_cache.py
# lays it out as a local hub cache, so vidur runs unpatched with HF_HUB_OFFLINE=1.
# Usage: bash bench/vidur/run.sh [real|synthetic]   (default: real; installs vidur 0.0.26 in a venv)
#   env: CORE=1 (taskset core), BIG=1 (also run N=100000), COUNT=1 (extra event-counting runs)
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd); WORK=${VIDUR_WORK:-/tmp/duet-vidur}; PY=$WORK/venv/bin/python; CORE=${CORE:-1}; BIG=${BIG:-1}; COUNT=${COUNT:-0}
DATA=${1:-real}
[ -x "$PY" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q vidur==0.0.26; }
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONHASHSEED=0
# 1) profile CSVs in vidur's format
if [ "$DATA" = real ]; then taskset -c $CORE $PY $D/make_real.py $WORK/data/real
else taskset -c $CORE $PY $D/make_synthetic.py $WORK/data/synthetic; fi
# 2) fake HF-hub cache so snapshot_download() resolves offline (no package patching)
W=$WORK/work_$DATA; rm -rf $W; mkdir -p $W; cd $W
export CDS=local/vidur-llama-2-7b-hf-a100-$DATA NDS=local/vidur-a100-pairwise-nvlink
taskset -c $CORE $PY $D/make_hf_cache.py .vidur_cache $WORK/data/$DATA $CDS $NDS \
    meta-llama/Llama-2-7b-hf a100 a100_pairwise_nvlink
source $D/common_args.sh
SARATHI=(--replica_scheduler_config_type sarathi --sarathi_scheduler_config_chunk_size 512
         --sarathi_scheduler_config_batch_size_cap 128)
VLLM=(--replica_scheduler_config_type vllm --vllm_scheduler_config_batch_size_cap 128
      --vllm_scheduler_config_max_tokens_in_batch 4096)
# package default replica scheduler (Sarathi-style fixed 512-token chunks, FCFS)
MNEMO=(--replica_scheduler_config_type mnemosyne_fcfs_fixed_chunk
       --mnemosyne_f_c_f_s_fixed_chunk_scheduler_config_chunk_size 512
       --mnemosyne_f_c_f_s_fixed_chunk_scheduler_config_batch_size_cap 128)
STATIC=(--interval_generator_config_type static)
poisson() { echo --interval_generator_config_type poisson --poisson_request_interval_generator_config_qps $1; }
RES=$W/results.jsonl; : > $RES
run() {  # name, replicas, N, extra args...
  local name=$1 R=$2 N=$3; shift 3
  echo "=== $name R=$R N=$N $*" >&2
  /usr/bin/time -f "TIME wall=%e maxrss_kb=%M" taskset -c $CORE $PY $D/timed_main.py "${VIDUR_ARGS[@]}" \
      --cluster_config_num_replicas $R --synthetic_request_generator_config_num_requests $N "$@" \
      > $W/log_${name}_R${R}_N${N}.txt 2>&1 || { echo "{\"name\":\"$name\",\"R\":$R,\"N\":$N,\"FAILED\":\"$(grep -m1 -o '[A-Za-z]*Error.*' $W/log_${name}_R${R}_N${N}.txt | head -c 80)\"}" | tee -a $RES; return 0; }
  local t; t=$(grep VIDUR_TIMING $W/log_${name}_R${R}_N${N}.txt | sed 's/.*VIDUR_TIMING //')
  local w; w=$(grep "TIME wall" $W/log_${name}_R${R}_N${N}.txt | sed 's/TIME //')
  echo "{\"name\":\"$name\",\"time_v\":\"$w\",\"timing\":$t}" | tee -a $RES
}
# warm-up: trains + caches the sklearn predictors (one-off startup cost, reported separately)
run warmup 1 100 "${SARATHI[@]}" "${STATIC[@]}"
run sarathi_static 1 10000 "${SARATHI[@]}" "${STATIC[@]}"
run sarathi_static 100 10000 "${SARATHI[@]}" "${STATIC[@]}"
run sarathi_poisson7 1 10000 "${SARATHI[@]}" $(poisson 7)
run sarathi_poisson700 100 10000 "${SARATHI[@]}" $(poisson 700)
run mnemo_static 1 10000 "${MNEMO[@]}" "${STATIC[@]}"
run mnemo_static 100 10000 "${MNEMO[@]}" "${STATIC[@]}"
# vLLM scheduler: works only while no KV-cache preemption happens (<= ~90 concurrent req/replica);
# with more it hits an AssertionError in vidur 0.0.26 (request.py:300) -> recorded as FAILED.
run vllm_static 100 10000 "${VLLM[@]}" "${STATIC[@]}"
run vllm_static 1 10000 "${VLLM[@]}" "${STATIC[@]}"
if [ "$BIG" = 1 ]; then
  run sarathi_static 1 100000 "${SARATHI[@]}" "${STATIC[@]}"
  run sarathi_static 100 100000 "${SARATHI[@]}" "${STATIC[@]}"
  run sarathi_poisson700 100 100000 "${SARATHI[@]}" $(poisson 700)
  run mnemo_static 100 100000 "${MNEMO[@]}" "${STATIC[@]}"
fi
if [ "$COUNT" = 1 ]; then   # same runs with an event counter (adds overhead; not used for timing)
  export VIDUR_COUNT_EVENTS=1
  run count_sarathi_static 1 10000 "${SARATHI[@]}" "${STATIC[@]}"
  run count_sarathi_static 100 10000 "${SARATHI[@]}" "${STATIC[@]}"
  run count_sarathi_poisson700 100 10000 "${SARATHI[@]}" $(poisson 700)
  run count_sarathi_static 100 100000 "${SARATHI[@]}" "${STATIC[@]}"
fi
echo "results: $RES" >&2
