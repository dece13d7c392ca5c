"""LLaMA-2-7B LoRA training step, compiled ahead of time on an emulated 8-device mesh: does a
global batch of 8 x 1024 bf16 tokens fit in 16 GiB per device (one TPU v5e chip)?

  python -m experiments.llama7b_memory

Nothing is allocated: parameters, adapters, optimizer state and batch are ShapeDtypeStructs with
their shardings; XLA lowers and compiles the sharded step, and its memory and cost analyses
give per-device bytes and FLOPs. Layers run under nn.scan with remat ("nothing_saveable"), as
they would on a pod. Prints one JSON object.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from slim_jax import parallel  # noqa: E402
from slim_jax.checkpoints import hf  # noqa: E402
from slim_jax.models import llama  # noqa: E402
from slim_jax.models.llama import Llama  # noqa: E402
from slim_jax.models.lora import LoraConfig  # noqa: E402

BATCH, LENGTH = 8, 1024
CONFIG = dataclasses.replace(llama.PRESETS["llama2_7b"], dtype="bfloat16", param_dtype="bfloat16",
                             scan_layers=True, remat_policy="nothing_saveable")
TARGETS = {"q,v": ("q_proj", "v_proj"),
           "all_linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")}
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2}}
BATCH_DTYPES = (("tokens", jnp.int32), ("mask", jnp.bool_), ("loss_mask", jnp.bool_))
GIB = 1 << 30


def abstract(tree, rules, mesh):
  """ShapeDtypeStructs carrying the shardings the rules give (nothing allocated)."""
  shardings = parallel.param_shardings(tree, rules, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def lora_step(lora_config: LoraConfig, config=CONFIG):
  model = Llama(config, lora_config)
  optimizer = optax.adamw(1e-4)
  step = jax.jit(functools.partial(llama.lora_train_step, model, optimizer), donate_argnums=(1, 2))
  lora = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["lora"])
  return step, hf.param_shapes(config), lora, jax.eval_shape(optimizer.init, lora)


def step_flops(lora_config: LoraConfig) -> float:
  """Global FLOPs of one step, remat recomputation included, from XLA's cost analysis of the
  unrolled program (the compiled scan would count its loop body once)."""
  step, params, lora, opt_state = lora_step(lora_config, dataclasses.replace(
      CONFIG, scan_layers=False))
  batch = {name: jax.ShapeDtypeStruct((BATCH, LENGTH), dtype) for name, dtype in BATCH_DTYPES}
  return step.lower(params, lora, opt_state, batch, jax.eval_shape(jax.random.key, 0)
                    ).cost_analysis()["flops"]


def compile_step(targets: tuple[str, ...], axes: dict[str, int]) -> dict:
  """Per-device memory of the sharded step as XLA compiles it for the mesh."""
  mesh = parallel.make_mesh(axes)
  lora_config = LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=targets)
  rules = llama.partition_rules(CONFIG)
  step, params, lora, opt_state = lora_step(lora_config)
  # Adam's moments mirror the adapters' paths, so the same rules shard them; the count replicates
  opt_state = abstract(opt_state, (*rules, (r".*", P())), mesh)
  params, lora = abstract(params, rules, mesh), abstract(lora, rules, mesh)
  batch = {name: jax.ShapeDtypeStruct((BATCH, LENGTH), dtype,
                                      sharding=parallel.batch_sharding(mesh, 2))
           for name, dtype in BATCH_DTYPES}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
  with jax.set_mesh(mesh):
    memory = step.lower(params, lora, opt_state, batch, key).compile().memory_analysis()
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  xla_flops = step_flops(lora_config)
  return {
      "mesh": axes, "lora_targets": list(targets),
      "lora_params": sum(x.size for x in jax.tree.leaves(lora)),
      "per_device_gib": {
          "arguments": memory.argument_size_in_bytes / GIB,
          "outputs": memory.output_size_in_bytes / GIB,
          "temporaries": memory.temp_size_in_bytes / GIB,
          "donated": memory.alias_size_in_bytes / GIB,
          "total": per_device / GIB},
      "fits_16_gib": per_device < 16 * GIB,
      "xla_flops_per_step": xla_flops,
      "xla_flops_per_step_per_device": xla_flops / mesh.size,
      "model_flops_per_step": BATCH * LENGTH * 2 * llama.forward_flops_per_token(CONFIG, LENGTH),
  }


def main(argv):
  del argv
  runs = [compile_step(targets, axes) | {"name": f"{mesh_name}/{target_name}"}
          for mesh_name, axes in MESHES.items() for target_name, targets in TARGETS.items()]
  print(json.dumps({"model": "LLaMA-2-7B bf16, LoRA r=8, AdamW, remat nothing_saveable",
                    "global_batch": [BATCH, LENGTH], "devices": jax.device_count(),
                    "runs": runs}, indent=2))


if __name__ == "__main__":
  app.run(main)
