"""The teacher stage: SLIM's rationales from an OpenAI-compatible chat API (`chat_api`) or a
local LLaMA (`local_generation`, as the student), and the API's cost before anything is spent.

Both write through `rationales`' cache (one durable record per request, resumable) and the
quality filter; a request whose every answer is rejected is recorded with status "failed", never
as a rationale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Sequence

import jax
from absl import logging

from slim_jax import (chat_api, checkpoints, checks, layout, local_generation, multihost, quality,
                      rationales)
from slim_jax.models.llama import Llama
from slim_jax.prompts import PromptConfig
from slim_jax.rationales import Request

KINDS = ("local", "openai")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  kind: str = "local"  # local: a LLaMA checkpoint through slim_jax.sampler; openai: HTTP API
  max_users: int = 0  # rationales for the first N users only (0 = all)
  max_tokens: int = 256  # completion length limit; a completion that reaches it is rejected
  # Sampling, so that a rejected rationale's retry can differ; best of `candidates` per user.
  temperature: float = 0.7
  top_p: float = 0.9
  repetition_penalty: float = 1.0  # local; sent over HTTP only when not 1 (vLLM and others)
  no_repeat_ngram: int = 4  # local only
  candidates: int = 3
  retry_failures: bool = False  # on a rerun, request again what was recorded as failed

  # Read by kind=openai only, down to the next group.

  base_url: str = "https://api.openai.com/v1"
  model: str = "gpt-3.5-turbo"
  api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key; "" = send none
  concurrency: int = 8
  timeout_s: float = 60.0  # per socket operation of one request
  max_retries: int = 6
  backoff_s: float = 1.0  # first retry delay; doubles per retry, with jitter
  max_backoff_s: float = 60.0
  requests_per_minute: float = 0.0  # 0 = no limit
  tokens_per_minute: float = 0.0  # prompt + max_tokens per request, as OpenAI counts them
  input_usd_per_1k: float = 0.0015  # gpt-3.5-turbo, as quoted in the SLIM paper
  output_usd_per_1k: float = 0.002
  assumed_output_tokens: int = 0  # dry run: mean completion tokens; 0 = max_tokens (upper bound)

  # Read by kind=local only.

  # HF directory or .gguf; "" = the embedded SmolLM2-135M-Instruct as the convert stage writes
  # it (Config.resolved)
  checkpoint: str = ""
  batch_size: int = 8  # local: rows the generation engine decodes together (slots)
  dtype: str = "float32"  # weights and activations
  seed: int = 0

  def checked(self) -> TeacherConfig:
    checks.one_of("teacher.kind", self.kind, KINDS)
    local_generation.check_decoding(self, "teacher")
    checks.within(self, "teacher", "[1, inf)", "concurrency")
    checks.within(self, "teacher", "(0, inf)", "timeout_s")
    checks.within(self, "teacher", "[0, inf)", "max_users", "max_retries", "backoff_s",
                  "max_backoff_s", "requests_per_minute", "tokens_per_minute", "input_usd_per_1k",
                  "output_usd_per_1k", "assumed_output_tokens")
    checks.one_of("teacher.dtype", self.dtype, checks.FLOAT_DTYPES)
    return self


def model_name(cfg: TeacherConfig) -> str:
  """The `model` of the records: the API's model name, or the local checkpoint's file name."""
  if cfg.kind == "openai":
    return cfg.model
  return "local:" + pathlib.Path(cfg.checkpoint).name


def estimate_cost(tcfg: TeacherConfig, pcfg: PromptConfig, prepared) -> dict:
  """Tokens and dollars for the whole run before anything is spent (the OpenAI dry run)."""
  requests = rationales.build_requests(prepared, pcfg, chat_api.chat_tokens, tcfg.max_users,
                                        writer="teacher")
  output = tcfg.assumed_output_tokens or tcfg.max_tokens
  prompt_tokens = sum(r.prompt_tokens for r in requests)
  completion_tokens = output * len(requests)
  return {
      "requests": len(requests), "model": tcfg.model, "prompt_tokens": prompt_tokens,
      "mean_prompt_tokens": prompt_tokens / max(len(requests), 1),
      "mean_history_items": sum(r.history_len for r in requests) / max(len(requests), 1),
      "completion_tokens": completion_tokens,
      "completion_tokens_per_request": output,
      "completion_assumption": ("assumed_output_tokens (mean)" if tcfg.assumed_output_tokens
                                else "max_tokens (upper bound)"),
      "cost_usd": chat_api.dollars(prompt_tokens, completion_tokens, tcfg)}


def run_local(requests: Sequence[Request], cfg: TeacherConfig, pcfg: PromptConfig,
              cache: pathlib.Path, model, variables, tokenizer, label: str) -> dict:
  """Generates through `local_generation.generate_local`; records cost no dollars. Returns the
  generation's throughput."""
  with rationales.CacheWriter(cache) as writer:
    produced, seconds = local_generation.generate_local(
        requests, local_generation.Decoding.of(cfg), pcfg, model, variables, tokenizer, label,
        writer)
  return {"generated_tokens": produced, "generation_seconds": seconds,
          "tokens_per_s": produced / seconds if seconds else 0.0}


def run_teacher(tcfg: TeacherConfig, pcfg: PromptConfig, prepared, out_dir, mesh=None) -> dict:
  """Writes out_dir/cache.jsonl (resumable log) and out_dir/rationales.jsonl; returns a summary
  with the rationales' quality (`quality.measure`). `tcfg` is resolved (`Config.resolved`).

  With a mesh, the local teacher's parameters are sharded by the LLaMA rules and its batches
  by the mesh's batch axes.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cache, model = out_dir / layout.CACHE, model_name(tcfg)
  throughput = {}
  if tcfg.kind == "openai":
    requests = rationales.build_requests(prepared, pcfg, chat_api.chat_tokens, tcfg.max_users,
                                          writer="teacher")
    todo = rationales.pending(requests, rationales.read_cache(cache), model, tcfg.retry_failures)
    logging.info("teacher %s: %d of %d requests to do", model, len(todo), len(requests))
    chat_api.run_openai(todo, tcfg, pcfg, cache)
  else:
    config, params, tokenizer = checkpoints.load(tcfg.checkpoint, mesh,
                                                 dtype=tcfg.dtype, param_dtype=tcfg.dtype)
    requests = rationales.build_requests(
        prepared, pcfg, lambda m: len(rationales.chat_ids(tokenizer, m)), tcfg.max_users,
        local=True, writer="teacher")
    todo = rationales.pending(requests, rationales.read_cache(cache), model, tcfg.retry_failures)
    multihost.barrier("teacher cache read")  # before process 0 appends to it
    logging.info("teacher %s: %d of %d requests to do", model, len(todo), len(requests))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      throughput = run_local(todo, tcfg, pcfg, cache, Llama(config), {"params": params},
                             tokenizer, model)
  records = rationales.read_cache(cache)
  rows = rationales.write_rationales(out_dir / layout.RATIONALES, requests, records, model)
  summary = {**rationales.summarize(requests, records, model), **throughput,
             "quality": quality.measure(rows, len(requests), prepared, tcfg.seed)}
  if summary["failed"]:
    logging.warning("teacher %s: %d requests failed (see %s); rerun with "
                    "teacher.retry_failures=true to retry them", model, summary["failed"], cache)
  return summary
