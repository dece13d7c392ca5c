#!/usr/bin/env bash
# The distilled student served by llama.cpp: export it to GGUF, serve it on 127.0.0.1 with
# llama-cpp-python's OpenAI-compatible server, and compare it with the JAX student on the same
# users (experiments/reference/llama_cpp_compare.py; one JSON object on stdout).
#
#   bash experiments/reference/llama_cpp_serve.sh WORKDIR [CONFIG_OVERRIDES...]
#   bash experiments/reference/llama_cpp_serve.sh workdir/ml100k_smollm2 --set preset=quick
#
# WORKDIR needs prepare/ and distill/ complete (python launch.py --stages=...,distill). The
# overrides are launch.py's (--config=..., --set key=value) and must be the work directory's.
# Environment: LLAMA_CPP_VENV (default ~/.cache/slim_jax/llamacpp-venv: created and installed
# from requirements-llamacpp.txt when absent, a source build of llama.cpp, minutes), PORT
# (8765), USERS (20), MAX_TOKENS (128), THREADS (the CPU count), EXPORT_DTYPE (f32),
# BATCH_SIZE (the JAX engine's rows, 8), OUT (WORKDIR/llama_cpp_compare). The server's log is
# OUT/server.log; it is stopped on exit.
set -euo pipefail

workdir="${1:?usage: llama_cpp_serve.sh WORKDIR [--config=... --set key=value ...]}"
shift
overrides=("$@")
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${LLAMA_CPP_VENV:-$HOME/.cache/slim_jax/llamacpp-venv}"
port="${PORT:-8765}"
out="${OUT:-$workdir/llama_cpp_compare}"
threads="${THREADS:-$(nproc)}"

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "llama_cpp_serve: installing llama-cpp-python into $venv (builds llama.cpp from source)" >&2
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install -r "$here/requirements-llamacpp.txt" >&2
fi

# The export stage (skipped when export/ is complete for this config and dtype).
cd "$root"
python launch.py --workdir="$workdir" --stages=export \
    --set export.dtype="${EXPORT_DTYPE:-f32}" "${overrides[@]}" >&2
gguf="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["summary"]["gguf"])' \
    "$workdir/export/DONE")"

mkdir -p "$out"
"$venv/bin/python" "$here/llama_cpp_server.py" --model "$gguf" --model_alias student \
    --host 127.0.0.1 --port "$port" --n_ctx 4096 --n_threads "$threads" \
    --n_threads_batch "$threads" > "$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 120); do  # the model loads in seconds; a minute at most
  if python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$port/v1/models" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "llama_cpp_serve: the server exited; its log:" >&2
    cat "$out/server.log" >&2
    exit 1
  fi
  sleep 0.5
done

python -m experiments.reference.llama_cpp_compare --workdir="$workdir" \
    --base_url="http://127.0.0.1:$port/v1" --users="${USERS:-20}" \
    --max_tokens="${MAX_TOKENS:-128}" --batch_size="${BATCH_SIZE:-8}" --out="$out" \
    "${overrides[@]}"
