"""The distilled student writes a rationale for every user, resumably, as the local teacher does.

The adapter is merged into the base once (W + BA, sharded like W), so decoding costs what the
base model costs. Pointed at a base checkpoint instead of an adapter, the same code gives the
undistilled student's rationales: the before-distillation baseline. Generation, its quality filter
and its cache are the local teacher's (`local_generation`, `rationales`); the model label carries
a hash of the adapter's weights, so a re-distilled adapter never reuses rationales of an older
one. A user whose candidates are all rejected gets no rationale, and the recommenders read it as
absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
from absl import logging

from slim_jax import (checkpoints, checks, layout, local_generation, multihost, parallel, prompts,
                      quality, rationales)
from slim_jax.checkpoints import peft
from slim_jax.models import lora as lora_lib
from slim_jax.models.llama import Llama
from slim_jax.prompts import PromptConfig


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  max_users: int = 0  # rationales for the first N users only (0 = all)
  max_tokens: int = 256  # generated tokens per candidate at most (a retry after a cut: twice)
  # Sampled, best of `candidates` through the teacher's quality filter (see local_generation.py).
  temperature: float = 0.7
  top_p: float = 0.9
  repetition_penalty: float = 1.0
  no_repeat_ngram: int = 4
  candidates: int = 3
  batch_size: int = 8  # rows the generation engine decodes together (slots)
  dtype: str = "bfloat16"  # merged weights and activations
  retry_failures: bool = False  # on a rerun, generate again for users without a rationale
  # A user whose every candidate is rejected keeps the last one (marked kept_rejected in the
  # cache) instead of going without: for a deployment that needs every user served.
  keep_rejected: bool = False
  distilled: bool = True  # False: the base model without the adapter (the undistilled baseline)
  seed: int = 0

  def checked(self) -> StudentConfig:
    local_generation.check_decoding(self, "student")
    checks.within(self, "student", "[0, inf)", "max_users")
    checks.one_of("student.dtype", self.dtype, checks.FLOAT_DTYPES)
    return self


def is_adapter(checkpoint) -> bool:
  return (pathlib.Path(checkpoint) / peft.CONFIG).exists()


def model_label(checkpoint) -> str:
  """The cache key's model: 'student:<first 12 hex of the adapter weights' sha256>' for an
  adapter, 'base:<directory name>' for a base checkpoint."""
  if not is_adapter(checkpoint):
    return f"base:{pathlib.Path(checkpoint).name}"
  digest = hashlib.sha256((pathlib.Path(checkpoint) / peft.WEIGHTS).read_bytes()).hexdigest()
  return f"student:{digest[:12]}"


def base_checkpoint(adapter_dir) -> pathlib.Path:
  """The base model an adapter was trained on, from its adapter_config.json."""
  path = pathlib.Path(adapter_dir) / peft.CONFIG
  base = json.loads(path.read_text()).get("base_model_name_or_path", "")
  if not base or not pathlib.Path(base).exists():
    raise FileNotFoundError(f"{path}: base_model_name_or_path={base!r} is not a local checkpoint")
  return pathlib.Path(base)


def load_student(checkpoint, mesh, dtype: str):
  """(model, {"params": ...}, tokenizer), sharded by the LLaMA rules: the base of an adapter
  directory with the adapter merged, or a base checkpoint as it is."""
  adapted = is_adapter(checkpoint)
  config, params, tokenizer = checkpoints.load(
      base_checkpoint(checkpoint) if adapted else checkpoint, mesh, dtype=dtype, param_dtype=dtype)
  if not adapted:
    return Llama(config), {"params": params}, tokenizer
  adapters, lora_config = peft.load_peft(checkpoint, scan_layers=config.scan_layers)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  merged = jax.jit(lambda p, a: lora_lib.merge(p, a, lora_config),
                   out_shardings=shardings)(params, adapters)
  return Llama(config), {"params": merged}, tokenizer


def run_student(cfg: StudentConfig, pcfg: PromptConfig, prepared, checkpoint, out_dir,
                mesh=None) -> dict:
  """Writes out_dir/cache.jsonl (resumable log) and out_dir/rationales.jsonl: a rationale per
  user (and per split with prompt.history=per_split) from the history visible at prediction
  time, by `checkpoint`: an adapter directory (merged into its base) or a base checkpoint.
  Returns the teacher's summary (counts, rejections, quality) plus this run's generated tokens,
  tokens/s and wall time. `pcfg` is the student's prompt section (`Config.student_prompt`)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cache, label = out_dir / layout.CACHE, model_label(checkpoint)
  mesh = mesh or parallel.make_mesh()
  model, variables, tokenizer = load_student(checkpoint, mesh, cfg.dtype)
  requests = rationales.build_requests(
      prepared, pcfg, lambda m: len(rationales.chat_ids(tokenizer, m)), cfg.max_users, local=True)
  todo = rationales.pending(requests, rationales.read_cache(cache), label, cfg.retry_failures)
  multihost.barrier("student cache read")  # before process 0 appends to it
  logging.info("student %s: %d of %d rationales to write", label, len(todo), len(requests))
  with rationales.CacheWriter(cache) as writer, jax.set_mesh(mesh):
    produced, seconds = local_generation.generate_local(
        todo, local_generation.Decoding.of(cfg), pcfg, model, variables, tokenizer, label, writer,
        cfg.keep_rejected)
  records = rationales.read_cache(cache)
  rows = rationales.write_rationales(out_dir / layout.RATIONALES, requests, records, label)
  return {**rationales.summarize(requests, records, label), "generated": len(todo),
          "skipped_histories": prompts.skipped_histories(prepared, prompts.history_splits(pcfg)),
          "generated_tokens": produced, "generation_seconds": seconds,
          "tokens_per_s": produced / seconds if seconds else 0.0, "dtype": cfg.dtype,
          "quality": quality.measure(rows, len(requests), prepared, cfg.seed)}
