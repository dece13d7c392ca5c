#!/usr/bin/env bash
# Accelerator timings as JSON, run as is from the repository root of a GPU or TPU machine after
# `pip install -r requirements.txt` and JAX's plugin for the machine (requirements.txt pins the
# CPU build): `pip install "jax[cuda13]==0.10.2"` (or cuda12) on GPU, "jax[tpu]==0.10.2" on TPU.
#
#   bash experiments/bench/device.sh 2>device.log | tee device.json
#
# Prints one JSON object per step: SmolLM2-135M in bf16 (experiments/bench/llama.py: the bf16
# matmul peak, a LoRA training step of 4 x 512 tokens, greedy generation of 64 tokens after 128 at
# batch 1 and 16) once per attention kind, auto (cudnn on GPU, pallas on TPU), xla and chunked;
# then one SASRec epoch on ml-100k (experiments/bench/recommenders.py: seconds_per_epoch).
# A step that fails or runs past STEP_TIMEOUT seconds (default 1200) prints {"failed": ...} and
# the others still run; the exit status counts the failures. LLAMA_FLAGS and REC_FLAGS append
# flags to those commands; ALLOW_CPU=1 lets it run without an accelerator, e.g. as a smoke test:
#
#   ALLOW_CPU=1 LLAMA_FLAGS="--preset=tiny --dtype=float32 --batch=2 --length=128 --prompt=16
#   --new_tokens=4 --repeats=1" REC_FLAGS="--steps=2 --evals=1" bash experiments/bench/device.sh
set -euo pipefail

timeout_s="${STEP_TIMEOUT:-1200}"
read -r -a llama_flags <<< "${LLAMA_FLAGS:-}"
read -r -a rec_flags <<< "${REC_FLAGS:-}"

backend=$(python -c "import jax; print(jax.default_backend())")
if [[ "$backend" == cpu && "${ALLOW_CPU:-0}" != 1 ]]; then
  echo "device.sh: JAX sees no accelerator (backend cpu): install its GPU or TPU plugin, or set" \
       "ALLOW_CPU=1" >&2
  exit 2
fi
kinds=(auto xla)
if [[ "$backend" != cpu ]]; then
  kinds+=(chunked)  # on CPU auto is chunked
fi

failures=0
step() {  # runs "$@" under the timeout; a failure is reported and counted, not fatal
  local status=0
  timeout "$timeout_s" "$@" || status=$?
  if ((status)); then
    printf '{"failed": "%s", "exit_status": %d}\n' "$*" "$status"
    failures=$((failures + 1))
  fi
}

for kind in "${kinds[@]}"; do
  step python -m experiments.bench.llama --notorch --parts=peak,train,generate --dtype=bfloat16 \
    --attention="$kind" "${llama_flags[@]}"
done
step python -m experiments.bench.recommenders --backbones=sasrec "${rec_flags[@]}"
exit "$failures"
