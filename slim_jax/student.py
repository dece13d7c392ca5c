"""The distilled student writes a rationale for every user, resumably, through the teacher's cache.

The adapter is merged into the base once (W + BA, sharded like W), so decoding costs what the
base model costs. Pointed at a base checkpoint instead of an adapter, the same code gives the
undistilled student's rationales: the before-distillation baseline. Records go to
out_dir/cache.jsonl with the teacher's writer and keys; the model label carries a hash of the
adapter's weights, so a re-distilled adapter never reuses rationales of an older one. Unlike a
teacher's, a completion cut at max_tokens is kept (with finish_reason "length"): it is still
this student's rationale, and every user needs one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Sequence

import jax
from absl import logging

from slim_jax import checkpoints, generate, parallel, teacher
from slim_jax.checkpoints import peft
from slim_jax.models import lora as lora_lib
from slim_jax.models.llama import Llama
from slim_jax.prompts import PromptConfig


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  max_users: int = 0  # rationales for the first N users only (0 = all)
  max_tokens: int = 256  # generated tokens per rationale at most
  temperature: float = 0.0
  batch_size: int = 8  # prompts per generation call; a multiple of the batch-axis devices
  dtype: str = "bfloat16"  # merged weights and activations
  retry_failures: bool = False  # on a rerun, generate again for empty completions
  distilled: bool = True  # False: the base model without the adapter (the undistilled baseline)
  seed: int = 0


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


def generate_records(requests: Sequence[teacher.Request], cfg: StudentConfig, model, variables,
                     tokenizer, label: str, writer: teacher.CacheWriter) -> tuple[int, float]:
  """Appends a record per request; returns (generated tokens, seconds).

  Prompts go in batches of similar length; the last batch is filled up with repeats of its last
  prompt so every call has the same shape (no extra compilation), and the repeats are dropped.
  """
  sampling = generate.SamplingConfig(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  prompted = sorted(((r, teacher.chat_ids(tokenizer, r.messages)) for r in requests),
                    key=lambda pair: len(pair[1]))
  start, produced = time.monotonic(), 0
  for index in range(0, len(prompted), cfg.batch_size):
    batch = prompted[index:index + cfg.batch_size]
    filled = [ids for _, ids in batch] + [batch[-1][1]] * (cfg.batch_size - len(batch))
    batch_start = time.monotonic()
    outputs = generate.generate_ids(model, variables, filled,
                                    jax.random.fold_in(jax.random.key(cfg.seed), index), sampling,
                                    [tokenizer.eos_token_id], pad_id)
    seconds = (time.monotonic() - batch_start) / len(batch)
    for (request, prompt_ids), ids in zip(batch, outputs):
      text = tokenizer.decode(ids, skip_special_tokens=True)
      writer.append(teacher.record(
          request, label, text=text, error=None if text.strip() else "empty completion",
          finish_reason="length" if len(ids) >= cfg.max_tokens else "stop", attempts=1,
          prompt_tokens=len(prompt_ids), completion_tokens=len(ids), estimated_tokens=False,
          cost_usd=0.0, seconds=seconds))
      produced += len(ids)
    logging.info("student: %d/%d rationales, %.1f generated tokens/s", index + len(batch),
                 len(prompted), produced / (time.monotonic() - start))
  return produced, time.monotonic() - start


def run_student(cfg: StudentConfig, pcfg: PromptConfig, prepared, checkpoint, out_dir,
                mesh=None) -> dict:
  """Writes out_dir/cache.jsonl (resumable log) and out_dir/rationales.jsonl: a rationale per
  user (and per split with prompt.history=per_split) from the history visible at prediction
  time, by `checkpoint`: an adapter directory (merged into its base) or a base checkpoint. Returns a summary with the
  teacher's counts plus this run's generated tokens and tokens/s."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cache, label = out_dir / "cache.jsonl", model_label(checkpoint)
  mesh = mesh or parallel.make_mesh()
  model, variables, tokenizer = load_student(checkpoint, mesh, cfg.dtype)
  requests = teacher.build_requests(prepared, pcfg,
                                    lambda m: len(teacher.chat_ids(tokenizer, m)), cfg.max_users)
  todo = teacher.pending(requests, teacher.read_cache(cache), label, cfg.retry_failures)
  logging.info("student %s: %d of %d rationales to write", label, len(todo), len(requests))
  with teacher.CacheWriter(cache) as writer, jax.set_mesh(mesh):
    produced, seconds = generate_records(todo, cfg, model, variables, tokenizer, label, writer)
  records = teacher.read_cache(cache)
  teacher.write_rationales(out_dir / "rationales.jsonl", requests, records, label)
  latest = {teacher.cache_key(r): r for r in records}
  truncated = sum(latest[(q.user_id, q.prompt_hash, label)]["finish_reason"] == "length"
                  for q in requests if (q.user_id, q.prompt_hash, label) in latest)
  return {**teacher.summarize(requests, records, label), "generated": len(todo),
          "truncated": truncated, "generated_tokens": produced, "generation_seconds": seconds,
          "tokens_per_s": produced / seconds if seconds else 0.0}
