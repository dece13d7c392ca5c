"""Distillation and student-generation throughput of the embedded SmolLM2-135M on this machine.

Distillation: jitted LoRA steps (slim_jax.train.distill) on fixed-length batches, timed after
compilation; MFU against the fp32 matmul rate measured here. Generation: the merged student
(slim_jax.student) writing rationales for real ml-100k users. Prints one JSON object.

  python -m experiments.bench.distill --steps=20 --batch=4 --seq=512

With --examples=N, distillation instead trains once over N real examples (the student prompts
of ml-100k users under the full preset's budgets, with the rationales of a teacher stage's
rationales.jsonl or else the domain's exemplar rationale), bucketed as distill.buckets pads them
or, with --pack, packed into rows of the largest bucket; tokens/s counts real (prompt and
rationale) tokens only, so the two are comparable:

  python -m experiments.bench.distill --examples=48 --batch=4 --generate=false [--pack] \
      --rationales=WORKDIR/teacher/rationales.jsonl
"""

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax import assets, checkpoints, parallel, prompts, student
from slim_jax.checkpoints import peft
from slim_jax.data.preprocess import DataConfig
from slim_jax.data import formats, loader, preprocess
from slim_jax.models import llama
from slim_jax.prompts import PromptConfig
from slim_jax.train import distill
from slim_jax.train.distill import DistillConfig

_STEPS = flags.DEFINE_integer("steps", 20, "Timed distillation steps (after one compiling step).")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence (half prompt, half rationale).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (the LoRA weights stay fp32).")
_USERS = flags.DEFINE_integer("users", 8, "Users the student writes rationales for.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per rationale at most.")
_GENERATE = flags.DEFINE_bool("generate", True, "Also time the student's generation.")
_EXAMPLES = flags.DEFINE_integer("examples", 0, "Real ml-100k examples to train over once "
                                 "(0: fixed-length random batches of --seq tokens).")
_PACK = flags.DEFINE_bool("pack", False, "With --examples: pack examples into rows of the "
                          "largest bucket (distill.pack) instead of padding each to a bucket.")
_RATIONALES = flags.DEFINE_string("rationales", "", "With --examples: a teacher stage's "
                                  "rationales.jsonl (default: the exemplar rationale for all).")
_BUCKETS = flags.DEFINE_list("buckets", ["512", "768", "1024", "1280"], "With --examples: "
                             "distill.buckets (the full preset's).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 500, "With --examples: the student's "
                                      "prompt budget (the full preset's).")
_RATIONALE_TOKENS = flags.DEFINE_integer("rationale_tokens", 320, "With --examples: "
                                         "distill.max_rationale_tokens (the full preset's).")


def matmul_flops_per_s(size: int = 1024, repeats: int = 10) -> float:
  """The fp32 matmul rate XLA reaches here: the denominator of MFU."""
  x = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(x).block_until_ready()
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def bench_distill(cfg: DistillConfig, mesh) -> tuple[dict, object, object]:
  """Tokens/s of LoRA steps on random batches; returns the result and the trained adapters."""
  config, base, _ = checkpoints.load(assets.path("smollm2"), mesh, dtype=cfg.dtype,
                                     param_dtype=cfg.base_dtype)
  _, state, _, step = distill.build_step(config, cfg, base, mesh)
  rng = np.random.default_rng(0)
  half = _SEQ.value // 2
  batch = parallel.global_batch(loader.lm_batch(
      [rng.integers(0, config.vocab_size, half) for _ in range(_BATCH.value)],
      [rng.integers(0, config.vocab_size, half) for _ in range(_BATCH.value)],
      (_SEQ.value,), pad_id=0), mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    state, metrics = step(base, state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = step(base, state, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
  tokens_per_s = _STEPS.value * _BATCH.value * _SEQ.value / seconds
  flops_per_token = llama.flops_per_token(config, _SEQ.value, "lora")
  return {"steps": _STEPS.value, "batch": _BATCH.value, "seq": _SEQ.value, "dtype": cfg.dtype,
          "lora": f"r={cfg.lora_rank} {','.join(cfg.lora_targets)}",
          "first_step_seconds": compile_seconds, "seconds_per_step": seconds / _STEPS.value,
          "tokens_per_s": tokens_per_s, "model_flops_per_s": tokens_per_s * flops_per_token,
          "final_loss": float(metrics["loss"])}, state.lora, cfg.lora()


def real_examples(tokenizer, prepared) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(student prompt ids, rationale ids) of the first --examples rationales, as distill builds
  them for training."""
  pcfg = prompts.student_config(PromptConfig(max_prompt_tokens=_PROMPT_TOKENS.value,
                                              max_words=150))
  if _RATIONALES.value:
    records = distill.read_teacher_rationales(pathlib.Path(_RATIONALES.value))
  else:
    text = prompts.exemplar(pcfg)[1]
    records = [{"user_id": str(user_id), "split": "valid", "text": text}
               for user_id in prepared.user_ids]
  records = records[:_EXAMPLES.value]
  if len(records) < _EXAMPLES.value:
    raise ValueError(f"--examples={_EXAMPLES.value} but only {len(records)} rationales")
  _, prompt_ids, rationale_ids = distill.training_examples(records, prepared, pcfg, tokenizer,
                                                           _RATIONALE_TOKENS.value)
  return prompt_ids, rationale_ids


def example_batches(prompt_ids, rationale_ids, cfg: DistillConfig, pad_id: int) -> list[dict]:
  """Every example once in a seeded order: batches of `batch_size` examples, each padded to its
  bucket, or with `pack` of `batch_size` packed rows; the last batch is filled up with empty
  rows, so that no example is left out of either."""
  order = np.random.default_rng(cfg.seed).permutation(len(prompt_ids))
  empty = np.zeros(0, np.int32)
  if cfg.pack:
    row_length = max(cfg.buckets)
    packs = loader.pack_examples([len(prompt_ids[i]) + len(rationale_ids[i]) for i in order],
                                 row_length)
    packs = [[int(order[j]) for j in pack] for pack in packs]
    packs += [[]] * (-len(packs) % cfg.batch_size)
    return [loader.packed_lm_batch(prompt_ids, rationale_ids, packs[i:i + cfg.batch_size],
                                   row_length, pad_id)
            for i in range(0, len(packs), cfg.batch_size)]
  rows = list(order) + [-1] * (-len(order) % cfg.batch_size)
  pick = lambda ids, chosen: [ids[r] if r >= 0 else empty for r in chosen]
  return [loader.lm_batch(pick(prompt_ids, rows[i:i + cfg.batch_size]),
                          pick(rationale_ids, rows[i:i + cfg.batch_size]), cfg.buckets, pad_id)
          for i in range(0, len(rows), cfg.batch_size)]


def bench_examples(cfg: DistillConfig, mesh) -> tuple[dict, object, object]:
  """Real tokens/s of one pass of LoRA steps over real examples, after compiling every batch
  shape the pass meets; returns the result and the trained adapters."""
  config, base, tokenizer = checkpoints.load(assets.path("smollm2"), mesh, dtype=cfg.dtype,
                                             param_dtype=cfg.base_dtype)
  prepared = preprocess.prepare(
      formats.read_dataset("recbole", assets.path("ml-100k"), "raise"), DataConfig())
  prompt_ids, rationale_ids = real_examples(tokenizer, prepared)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  batches = example_batches(prompt_ids, rationale_ids, cfg, pad_id)
  _, state, _, step = distill.build_step(config, cfg, base, mesh)
  shapes = {batch["tokens"].shape: batch for batch in batches}
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    for batch in shapes.values():
      state, metrics = step(base, state, parallel.global_batch(batch, mesh))
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    tokens = 0
    start = time.perf_counter()
    for batch in batches:
      state, metrics = step(base, state, parallel.global_batch(batch, mesh))
      tokens += int(np.sum(batch["segment_ids"] > 0))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
  lengths = [len(p) + len(r) for p, r in zip(prompt_ids, rationale_ids)]
  padded = sum(batch["tokens"].size for batch in batches)
  return {"examples": len(lengths), "pack": cfg.pack, "batch": cfg.batch_size,
          "buckets": list(cfg.buckets), "dtype": cfg.dtype,
          "rationales": _RATIONALES.value or "exemplar",
          "example_tokens_mean": float(np.mean(lengths)), "example_tokens_max": max(lengths),
          "steps": len(batches), "shapes": sorted(map(list, shapes)),
          "real_tokens": tokens, "row_tokens": padded, "padding_fraction": 1 - tokens / padded,
          "compile_and_warmup_seconds": compile_seconds, "seconds": seconds,
          "seconds_per_step": seconds / len(batches), "tokens_per_s": tokens / seconds,
          "final_loss": float(metrics["loss"])}, state.lora, cfg.lora()


def bench_student(adapters, lora_config, mesh, directory: pathlib.Path) -> dict:
  """Generated tokens/s of the merged student on real ml-100k prompts (greedy), compiled."""
  adapter_dir = peft.save_peft(directory / "adapter", adapters, lora_config,
                               str(assets.path("smollm2")))
  prepared = preprocess.prepare(
      formats.read_dataset("recbole", assets.path("ml-100k"), "raise"), DataConfig())
  cfg = student.StudentConfig(max_users=_USERS.value, max_tokens=_NEW_TOKENS.value,
                              batch_size=_USERS.value, dtype=_DTYPE.value)
  pcfg = prompts.student_config(PromptConfig(max_prompt_tokens=512))
  run = lambda name: student.run_student(cfg, pcfg, prepared, adapter_dir, directory / name, mesh)
  run("warmup")  # compiles generation for these prompt buckets
  summary = run("timed")
  return {key: summary[key] for key in ("generated", "generated_tokens", "generation_seconds",
                                        "tokens_per_s", "truncated")}


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  cfg = DistillConfig(lora_rank=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      batch_size=_BATCH.value, dtype=_DTYPE.value, base_dtype=_DTYPE.value,
                      lr=1e-4, warmup_steps=0, steps=_STEPS.value + 1, pack=_PACK.value,
                      buckets=tuple(int(b) for b in _BUCKETS.value),
                      max_rationale_tokens=_RATIONALE_TOKENS.value)
  if _EXAMPLES.value:
    result, adapters, lora_config = bench_examples(cfg, mesh)
  else:
    if _PACK.value:
      raise app.UsageError("--pack needs --examples: random batches have no padding to pack")
    peak = matmul_flops_per_s()
    result, adapters, lora_config = bench_distill(cfg, mesh)
    result["matmul_flops_per_s"] = peak
    result["mfu"] = result["model_flops_per_s"] / peak
  output = {"devices": jax.device_count(), "distill": result}
  if _GENERATE.value:
    with tempfile.TemporaryDirectory() as directory:
      output["student_generation"] = bench_student(jax.device_get(adapters), lora_config, mesh,
                                                   pathlib.Path(directory))
  print(json.dumps(output, indent=2))


if __name__ == "__main__":
  app.run(main)
