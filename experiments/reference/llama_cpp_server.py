"""llama-cpp-python's OpenAI-compatible server, with greedy decoding that is plain argmax.

Runs in the llama.cpp virtualenv (requirements-llamacpp.txt), never the project's python; its
arguments are `python -m llama_cpp.server`'s (--model, --host, --port, --n_threads, ...):

  ~/.cache/slim_jax/llamacpp-venv/bin/python experiments/reference/llama_cpp_server.py \
      --model workdir/ml100k_smollm2/export/ml100k_smollm2.gguf --host 127.0.0.1 --port 8765

One change to the server as released: a request that names no `repeat_penalty` gets 1.0 (no
penalty, llama.cpp's own llama-server default) instead of llama-cpp-python's 1.1. An
OpenAI-style client (slim_jax.chat_api) never sends llama.cpp's parameter, so with 1.1 its
temperature-0 requests would not decode the argmax the JAX student decodes, and a comparison of
the two would measure the penalty rather than the export. Site-packages are untouched.
"""

import runpy

from llama_cpp.server import types

for request in (types.CreateChatCompletionRequest, types.CreateCompletionRequest):
  request.model_fields["repeat_penalty"].default = 1.0
  request.model_rebuild(force=True)

if __name__ == "__main__":
  runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
