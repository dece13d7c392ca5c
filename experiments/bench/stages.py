"""The LLM stages of the embedded default's quick preset beside their kernels, in one run.

  python -m experiments.bench.stages [--workdir=DIR] [--set key=value ...] [--repeats=2]

Runs the preset's stages up to `generate` in a fresh work directory (fetch, prepare, convert,
teacher, distill, generate; `--set` overrides as launch.py's, e.g. student.max_users=0 for every
user), then, in the same process on the same machine, the kernels they are built on
(experiments/bench/llama.py): batched decoding at the stage's batch-16 reference shape, and the
LoRA step at the distillation's own shape (its LoRA, batch and largest bucket). Prints one JSON
object: each stage's wall time and throughput, the kernels', and their ratios. A stage's
throughput counts everything the stage pays for (compilation, prefill, rejected candidates,
evaluation, checkpoints): the ratio is what the stage leaves of its kernel. --repeats, --prompt
and --new_tokens are experiments/bench/llama.py's flags (the decoding kernel's 128 prompt and 64
new tokens by default); what the stages print goes to stderr, so stdout is the JSON alone.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import tempfile
import time

import jax
from absl import app, flags

from experiments.bench import llama as kernels
from slim_jax import checkpoints, config as config_lib, host, parallel, pipeline, sampler

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: a fresh temporary "
                               "one); its complete stages are not run again.")
_SET = flags.DEFINE_multi_string("set", [], "Config override key.sub=value (as launch.py's).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "As launch.py's (default here: none, so compilation is measured).")

CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "ml100k_smollm2.py"
STAGES = ("fetch", "prepare", "convert", "teacher", "distill", "generate")
DECODE_BATCH = 16


def run_stages(cfg, workdir: pathlib.Path) -> tuple[dict, dict]:
  """(wall seconds, summary) of every stage, run in order."""
  resolved = cfg.resolved(workdir)
  walls, summaries = {}, {}
  for name in STAGES:
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
      summaries[name] = pipeline.run_stage(name, cfg, workdir, resolved)
    walls[name] = time.perf_counter() - start
  return walls, summaries


def kernel_rates(cfg, repeats: int) -> dict:
  """Batch-16 decoding tokens/s (the student's dtype) and the distillation's LoRA step in
  seconds, on the student's base checkpoint."""
  mesh = parallel.make_mesh(cfg.mesh.axes())
  config, params, _ = checkpoints.load(cfg.distill.checkpoint, mesh, dtype=cfg.student.dtype,
                                       param_dtype=cfg.student.dtype)
  args, options = kernels.generation(config, params, DECODE_BATCH)
  decode = lambda: sampler.generate_tokens(*args, **options).block_until_ready()
  decode_rate = (DECODE_BATCH * flags.FLAGS.new_tokens  # experiments.bench.llama's flags
                 / kernels.best_seconds(decode, repeats))
  distill = cfg.distill  # the step as the stage builds it: its dtypes, scan and remat
  config, params, _ = checkpoints.load(distill.checkpoint, mesh, dtype=distill.dtype,
                                       param_dtype=distill.base_dtype,
                                       remat_policy=distill.remat_policy,
                                       scan_layers=distill.scan_layers)
  _, _, train = kernels.lora_step(config, params, mesh, distill, max(distill.buckets))
  with jax.set_mesh(mesh):
    step_seconds = kernels.best_seconds(lambda: jax.block_until_ready(train()), repeats)
  return {"decode_b16_tokens_per_s": decode_rate, "lora_step_seconds": step_seconds,
          "lora_step_shape": [cfg.distill.batch_size, max(cfg.distill.buckets)]}


def report(walls: dict, summaries: dict, kernel: dict) -> dict:
  """The stages' throughputs beside the kernels', as ratios."""
  distill = summaries["distill"]
  stages = {name: {"wall_s": walls[name]} for name in STAGES}
  for name in ("teacher", "generate"):
    stages[name].update({key: summaries[name].get(key) for key in (
        "requests", "candidates", "generated_tokens", "generation_seconds", "tokens_per_s")})
  stages["distill"].update({key: distill[key] for key in (
      "steps", "train_seconds", "trained_tokens", "tokens_per_s")})
  decode = kernel["decode_b16_tokens_per_s"]
  return {
      "stages": stages, "kernels": kernel,
      "ratios": {
          "teacher_over_decode_b16": stages["teacher"]["tokens_per_s"] / decode,
          "generate_over_decode_b16": stages["generate"]["tokens_per_s"] / decode,
          "distill_steps_over_lora_step": (kernel["lora_step_seconds"] * distill["steps"]
                                           / distill["train_seconds"]),
      },
      "llm_stages_wall_s": sum(walls[name] for name in ("teacher", "distill", "generate")),
  }


def main(argv):
  del argv
  if _COMPILATION_CACHE.value:
    host.cache_compilations(_COMPILATION_CACHE.value)
  cfg = config_lib.from_flags(CONFIG, _SET.value).checked()
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="slim_jax_stages_"))
  walls, summaries = run_stages(cfg, workdir)
  kernel = kernel_rates(cfg.resolved(workdir), flags.FLAGS.repeats)
  print(json.dumps({"date": time.strftime("%Y-%m-%d"), "workdir": str(workdir),
                    "devices": str(jax.devices()), "preset": cfg.preset,
                    **report(walls, summaries, kernel)}, indent=2))


if __name__ == "__main__":
  app.run(main)
