"""The exported student served by llama.cpp against the JAX student: same users, same prompts,
greedy, their rationales side by side, and each path's tokens/s. Prints one JSON object.

  python -m experiments.reference.llama_cpp_compare --workdir=workdir/ml100k_smollm2 \
      --base_url=http://127.0.0.1:8765/v1 --users=20 --out=/tmp/llama_cpp_compare

experiments/reference/llama_cpp_serve.sh starts the server and runs this. The work directory
needs prepare/ and distill/ complete (and export/, which the server serves). Both paths write the
generate stage's requests for the first `--users` users (the student's prompt, truncated with
the student's tokenizer) through the project's own code:

  * JAX: `student.run_student`, the generate stage, on the adapter merged in memory;
  * llama.cpp: `chat_api.run_openai`, the teacher.kind=openai client, at `--base_url`.

Both decode greedily (temperature 0, one candidate, no repetition penalty or n-gram ban) for at
most `--max_tokens`, and without guided steps (prompt.guided=false), which an HTTP server cannot
apply; every answer is kept, whatever the quality filter says of it. The JAX path runs twice,
and its second run (XLA's programs compiled by then, as a served model's are) is the one timed;
the first run's time, compilation included, is reported beside it. Outputs go to fresh
directories under --out (a rerun starts over, so that the timings are of this run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time

from absl import app, flags

from slim_jax import chat_api, config, layout, pipeline, rationales, student
from slim_jax.checkpoints.tokenizer import load_tokenizer
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig

_CONFIG = flags.DEFINE_string("config", "experiments/configs/ml100k_smollm2.py",
                              "The work directory's experiment config file.")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides key.sub=value, as launch.py's.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (prepare, distill).",
                               required=True)
_BASE_URL = flags.DEFINE_string("base_url", "http://127.0.0.1:8765/v1",
                                "The llama.cpp server's OpenAI-compatible API.")
_USERS = flags.DEFINE_integer("users", 20, "The first N users.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens per rationale at most.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "JAX: rows the generation engine decodes together.")
_OUT = flags.DEFINE_string("out", None, "Directory for both paths' caches and compare.json.",
                           required=True)


def answers(cache: pathlib.Path) -> dict[tuple[str, str], dict]:
  """(user, split) -> the answer's text, accepted or not, and its completion tokens."""
  return {(r["user_id"], r["split"]): {"text": (r["text"] or r["rejected_text"]).strip(),
                                       "tokens": r["completion_tokens"], "status": r["status"]}
          for r in rationales.read_cache(cache)}


def common_prefix(a: list, b: list) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(ours: dict, theirs: dict, tokenizer) -> dict:
  """How far the two paths' greedy answers agree: identical texts, and the share of tokens up to
  the first that differs."""
  keys = sorted(ours.keys() & theirs.keys())
  ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  shared = [common_prefix(ids(ours[k]["text"]), ids(theirs[k]["text"])) for k in keys]
  longest = [max(len(ids(ours[k]["text"])), len(ids(theirs[k]["text"])), 1) for k in keys]
  return {"answers": len(keys), "identical": sum(ours[k]["text"] == theirs[k]["text"] for k in keys),
          "mean_common_prefix_share": sum(s / n for s, n in zip(shared, longest)) / len(keys),
          "first_difference_at_token": sorted(s for s, k in zip(shared, keys)
                                              if ours[k]["text"] != theirs[k]["text"])}


def main(argv):
  del argv
  cfg = config.from_flags(_CONFIG.value, _SET.value)
  workdir, out = pathlib.Path(_WORKDIR.value), pathlib.Path(_OUT.value)
  prepared = pipeline.load_prepared(workdir)
  pcfg = dataclasses.replace(cfg.student_prompt, guided=False)
  adapter = workdir / layout.DISTILL / layout.ADAPTER
  tokenizer = load_tokenizer(student.base_checkpoint(adapter))
  for path in (out / "jax_compiling", out / "jax", out / "llama_cpp"):
    shutil.rmtree(path, ignore_errors=True)

  greedy = StudentConfig(max_users=_USERS.value, max_tokens=_MAX_TOKENS.value, temperature=0.0,
                         no_repeat_ngram=0, candidates=1, batch_size=_BATCH.value,
                         dtype="float32", keep_rejected=True)
  compiling = student.run_student(greedy, pcfg, prepared, adapter, out / "jax_compiling")
  jax_summary = student.run_student(greedy, pcfg, prepared, adapter, out / "jax")

  requests = rationales.build_requests(
      prepared, pcfg, lambda m: len(rationales.chat_ids(tokenizer, m)), _USERS.value, local=True)
  served = TeacherConfig(kind="openai", base_url=_BASE_URL.value, model="student",
                         api_key_env="", max_tokens=_MAX_TOKENS.value, temperature=0.0,
                         candidates=1, max_retries=0, concurrency=1, timeout_s=600.0,
                         input_usd_per_1k=0.0, output_usd_per_1k=0.0)
  (out / "llama_cpp").mkdir(parents=True)
  start = time.monotonic()
  chat_api.run_openai(requests, served, pcfg, out / "llama_cpp" / layout.CACHE)
  seconds = time.monotonic() - start

  ours, theirs = answers(out / "jax" / layout.CACHE), answers(out / "llama_cpp" / layout.CACHE)
  served_tokens = sum(a["tokens"] for a in theirs.values())
  result = {
      "users": _USERS.value, "requests": len(requests), "max_tokens": _MAX_TOKENS.value,
      "cpus": os.cpu_count(), "load_average": os.getloadavg(),
      "jax": {"tokens": jax_summary["generated_tokens"],
              "seconds": jax_summary["generation_seconds"],
              "tokens_per_s": jax_summary["tokens_per_s"], "batch_size": _BATCH.value,
              "first_run_seconds_compilation_included": compiling["generation_seconds"]},
      "llama_cpp": {"tokens": served_tokens, "seconds": seconds,
                    "tokens_per_s": served_tokens / seconds, "concurrency": 1},
      "agreement": agreement(ours, theirs, tokenizer),
      "examples": [{"key": list(k), "jax": ours[k]["text"], "llama_cpp": theirs[k]["text"]}
                   for k in sorted(ours.keys() & theirs.keys())[:2]],
  }
  (out / "compare.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
