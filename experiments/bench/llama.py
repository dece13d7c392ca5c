"""SmolLM2-135M (fp32 unless --dtype) on this machine: prefill, LoRA training and KV-cache
generation throughput and MFU, side by side with torch/transformers/PEFT when torch is importable.

  python -m experiments.bench.llama [--repeats=2] [--parts=peak,prefill,train,generate] \
      [--attention=auto] [--dtype=float32] [--preset=tiny] [--batch=4 --length=512] \
      [--prompt=128 --new_tokens=64]

Prints one JSON object. MFU uses analytic FLOPs (llama.flops_per_token: causal attention; a LoRA
step counts twice a forward pass) over the measured matmul peak of the same framework in the
same dtype. `--preset` times a llama.PRESETS architecture with random weights instead of
SmolLM2 (no torch side then): the speed of a step does not depend on the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax import assets, checkpoints, checks, parallel, sampler
from slim_jax.data import loader
from slim_jax.models import llama
from slim_jax.models.llama import Llama
from slim_jax.train import distill
from slim_jax.train.distill import DistillConfig

_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions after one warm-up (best kept).")
_PARTS = flags.DEFINE_list("parts", ["peak", "prefill", "train", "generate"], "What to measure.")
_TORCH = flags.DEFINE_bool("torch", importlib.util.find_spec("torch") is not None,
                           "Also measure torch/transformers/PEFT (SmolLM2 only).")
_ATTENTION = flags.DEFINE_enum("attention", "auto", llama.ATTENTION_KINDS,
                               "LlamaConfig.attention: the attention kernel.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", checks.FLOAT_DTYPES,
                           "Weights, activations and the matmul peak.")
_PRESET = flags.DEFINE_enum("preset", None, list(llama.PRESETS),
                            "A llama.PRESETS architecture with random weights, not SmolLM2.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows of the prefill and training batches.")
_LENGTH = flags.DEFINE_integer("length", 512, "Tokens per prefill and training row.")
_PROMPT = flags.DEFINE_integer("prompt", 128, "Prompt tokens per generated row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")

# The distillation step with plain AdamW (no clipping), as in the PEFT loop it is compared with
DISTILL = DistillConfig(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lr=1e-4,
                        warmup_steps=0, clip_norm=0.0)
LORA = DISTILL.lora()


def best_seconds(fn, repeats: int) -> float:
  """Best wall time of fn() after one warm-up call (compilation, allocation)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def jax_peak(repeats: int, n: int = 2048) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), _DTYPE.value)
  matmul = jax.jit(lambda a: a @ a)
  return 2 * n**3 / best_seconds(lambda: matmul(a).block_until_ready(), repeats)


def torch_peak(repeats: int, n: int = 2048) -> float:
  import torch
  a = torch.randn(n, n, dtype=getattr(torch, _DTYPE.value))
  return 2 * n**3 / best_seconds(lambda: a @ a, repeats)


def smollm2(mesh):
  """(the HF directory converted once from the embedded GGUF, its config, its params on mesh),
  in --dtype with the --attention kernel."""
  hf_dir = checkpoints.convert_gguf_to_hf(assets.path("smollm2"), assets.cache_dir() / "smollm2-hf")
  config, params, _ = checkpoints.load(hf_dir, mesh, dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                                       attention=_ATTENTION.value)
  return hf_dir, config, params


def random_model(preset: str, mesh):
  """(the config of llama.PRESETS[preset] in --dtype with the --attention kernel, random params
  on mesh)."""
  config = dataclasses.replace(llama.PRESETS[preset], dtype=_DTYPE.value,
                               param_dtype=_DTYPE.value, attention=_ATTENTION.value)
  params = jax.jit(lambda key: Llama(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"])(
      jax.random.key(0))
  return config, parallel.shard_params(params, llama.partition_rules(config), mesh)


def random_tokens(config, rows: int, length: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, config.vocab_size, (rows, length), np.int32)


def lora_step(config, params, mesh, cfg: DistillConfig | None = None, length: int = 0):
  """(the jitted distillation step of `cfg` (default: DISTILL at --batch), its first arguments
  (its batch size x `length`, default --length, random tokens), a call that runs it from the
  state the previous call left: the step donates its state)."""
  cfg = cfg or dataclasses.replace(DISTILL, batch_size=_BATCH.value)
  length = length or _LENGTH.value
  _, state, _, step = distill.build_step(config, cfg, params, mesh)
  # empty prompts: the loss is on every token, as with labels=tokens in the PEFT loop
  tokens = random_tokens(config, cfg.batch_size, length, seed=0)
  batch = parallel.global_batch(loader.lm_batch(
      list(tokens[:, :0]), list(tokens), (length,), pad_id=0), mesh)
  states = [state]

  def train():
    states[0], metrics = step(params, states[0], batch)
    return metrics
  return step, (params, state, batch), train


def generation(config, params, batch_size: int) -> tuple[tuple, dict]:
  """sampler.generate_tokens' arguments and options: greedy, --new_tokens after random prompts
  of --prompt tokens; no stop token ends a row early."""
  prompts = random_tokens(config, batch_size, _PROMPT.value, seed=1)
  args = (Llama(config), {"params": params}, prompts, np.ones_like(prompts, bool),
          jax.random.key(0))
  return args, dict(sampling=sampler.SamplingConfig(_NEW_TOKENS.value), stop_ids=(-1,), pad_id=0)


def jax_benchmarks(config, params, mesh, parts, repeats) -> dict:
  results, tokens_per_batch = {}, _BATCH.value * _LENGTH.value
  if "prefill" in parts:
    forward = jax.jit(Llama(config).apply)
    tokens = random_tokens(config, _BATCH.value, _LENGTH.value, seed=0)
    seconds = best_seconds(
        lambda: forward({"params": params}, tokens)[0].block_until_ready(), repeats)
    results["prefill_tokens_per_s"] = tokens_per_batch / seconds
  if "train" in parts:
    _, _, train = lora_step(config, params, mesh)
    with jax.set_mesh(mesh):
      results["lora_train_tokens_per_s"] = tokens_per_batch / best_seconds(
          lambda: jax.block_until_ready(train()), repeats)
  if "generate" in parts:
    for batch_size in (1, 16):
      args, options = generation(config, params, batch_size)
      run = lambda: sampler.generate_tokens(*args, **options).block_until_ready()
      results[f"generate_b{batch_size}_tokens_per_s"] = (
          batch_size * _NEW_TOKENS.value / best_seconds(run, repeats))
  return results


def torch_benchmarks(hf_dir, config, parts, repeats) -> dict:
  import peft
  import torch
  import transformers

  model = transformers.LlamaForCausalLM.from_pretrained(
      hf_dir, dtype=getattr(torch, _DTYPE.value)).eval()
  tokens_per_batch, new_tokens = _BATCH.value * _LENGTH.value, _NEW_TOKENS.value
  tokens = torch.from_numpy(
      random_tokens(config, _BATCH.value, _LENGTH.value, seed=0).astype(np.int64))
  results = {}
  if "prefill" in parts:
    with torch.no_grad():
      seconds = best_seconds(lambda: model(input_ids=tokens).logits, repeats)
    results["prefill_tokens_per_s"] = tokens_per_batch / seconds
  if "generate" in parts:
    for batch_size in (1, 16):
      prompts = torch.from_numpy(
          random_tokens(config, batch_size, _PROMPT.value, seed=1).astype(np.int64))
      run = lambda: model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)
      with torch.no_grad():
        results[f"generate_b{batch_size}_tokens_per_s"] = (
            batch_size * new_tokens / best_seconds(run, repeats))
  if "train" in parts:
    lora_model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
        target_modules=list(LORA.targets), task_type="CAUSAL_LM")).train()
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad],
                                  lr=1e-4)

    def train():
      loss = lora_model(input_ids=tokens, labels=tokens).loss
      loss.backward()
      optimizer.step()
      optimizer.zero_grad()

    results["lora_train_tokens_per_s"] = tokens_per_batch / best_seconds(train, repeats)
  return results


def with_mfu(results: dict, config, peak: float | None) -> dict:
  if peak is None:
    return results
  flops = {"prefill_tokens_per_s": llama.flops_per_token(config, _LENGTH.value),
           "lora_train_tokens_per_s": llama.flops_per_token(config, _LENGTH.value, "lora")}
  mfu = {name.replace("_tokens_per_s", "_mfu"): results[name] * flops[name] / peak
         for name in flops if name in results}
  return {**results, "matmul_peak_gflops": peak / 1e9, **mfu}


def main(argv):
  del argv
  parts, repeats = set(_PARTS.value), _REPEATS.value
  mesh = parallel.make_mesh()
  if _PRESET.value:
    if _TORCH.value:
      raise app.UsageError("--torch needs SmolLM2's checkpoint: pass --notorch with --preset")
    config, params = random_model(_PRESET.value, mesh)
    name = f"{_PRESET.value} (random weights)"
  else:
    hf_dir, config, params = smollm2(mesh)
    name = "SmolLM2-135M-Instruct"
  report = {"model": f"{name} {_DTYPE.value}", "devices": str(jax.devices()),
            "attention": f"{config.attention} ({llama.attention_kind(config)})",
            "batch_x_length": [_BATCH.value, _LENGTH.value],
            "generate_prompt_new": [_PROMPT.value, _NEW_TOKENS.value],
            "lora": f"r={LORA.rank} on {','.join(LORA.targets)}, AdamW"}
  peak = jax_peak(repeats) if "peak" in parts else None
  report["jax"] = with_mfu(jax_benchmarks(config, params, mesh, parts, repeats), config, peak)
  if _TORCH.value:
    import torch
    peak = torch_peak(repeats) if "peak" in parts else None
    report["torch"] = with_mfu(torch_benchmarks(hf_dir, config, parts, repeats), config, peak)
    report["torch"]["threads"] = torch.get_num_threads()
    report["speedup_jax_over_torch"] = {
        name: report["jax"][name] / report["torch"][name]
        for name in report["jax"] if name.endswith("tokens_per_s") and name in report["torch"]}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
