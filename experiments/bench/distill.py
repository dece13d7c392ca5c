"""Distillation and student-generation throughput of the embedded SmolLM2-135M on this machine.

Distillation: jitted LoRA steps (slim_jax.train.distill) on fixed-length batches, timed after
compilation; MFU against the fp32 matmul rate measured here. Generation: the merged student
(slim_jax.student) writing rationales for real ml-100k users. Prints one JSON object.

  python experiments/bench/distill.py --steps=20 --batch=4 --seq=512
"""

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax import assets, checkpoints, parallel, student
from slim_jax.checkpoints import peft
from slim_jax.config import DataConfig
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


def bench_student(adapters, lora_config, mesh, directory: pathlib.Path) -> dict:
  """Generated tokens/s of the merged student on real ml-100k prompts (greedy), compiled."""
  adapter_dir = peft.save_peft(directory / "adapter", adapters, lora_config,
                               str(assets.path("smollm2")))
  prepared = preprocess.prepare(
      formats.read_dataset("recbole", assets.path("ml-100k"), "raise"), DataConfig())
  cfg = student.StudentConfig(max_users=_USERS.value, max_tokens=_NEW_TOKENS.value,
                              batch_size=_USERS.value, dtype=_DTYPE.value)
  run = lambda name: student.run_student(cfg, PromptConfig(max_prompt_tokens=512), prepared,
                                        adapter_dir, directory / name, mesh)
  run("warmup")  # compiles generation for these prompt buckets
  summary = run("timed")
  return {key: summary[key] for key in ("generated", "generated_tokens", "generation_seconds",
                                        "tokens_per_s", "truncated")}


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  cfg = DistillConfig(lora_rank=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      batch_size=_BATCH.value, dtype=_DTYPE.value, base_dtype=_DTYPE.value,
                      lr=1e-4, warmup_steps=0, steps=_STEPS.value + 1)
  peak = matmul_flops_per_s()
  result, adapters, lora_config = bench_distill(cfg, mesh)
  result["matmul_flops_per_s"] = peak
  result["mfu"] = result["model_flops_per_s"] / peak
  with tempfile.TemporaryDirectory() as directory:
    generation = bench_student(jax.device_get(adapters), lora_config, mesh,
                               pathlib.Path(directory))
  print(json.dumps({"devices": jax.device_count(), "distill": result,
                    "student_generation": generation}, indent=2))


if __name__ == "__main__":
  app.run(main)
