"""LLaMA-2-7B LoRA distillation step (slim_jax.train.distill), compiled ahead of time on an
emulated 8-device mesh: does a global batch of 8 x 1024 bf16 tokens fit in 16 GiB per device (one
TPU v5e chip)?

  python -m experiments.bench.llama7b_memory

Nothing is allocated: the base, the training state (fp32 adapters and their AdamW moments) and the
batch are ShapeDtypeStructs with the shardings a distillation run gives them; XLA lowers and
compiles the sharded step, and its memory and cost analyses give per-device bytes and FLOPs.
Layers run under nn.scan with remat ("nothing_saveable"), as they would on a pod. Prints one JSON
object.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]))

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from slim_jax import parallel  # noqa: E402
from slim_jax.checkpoints import hf  # noqa: E402
from slim_jax.data import loader  # noqa: E402
from slim_jax.models import llama  # noqa: E402
from slim_jax.train import distill  # noqa: E402
from slim_jax.train.distill import DistillConfig  # noqa: E402

BATCH, LENGTH = 8, 1024
CONFIG = dataclasses.replace(llama.PRESETS["llama2_7b"], dtype="bfloat16", param_dtype="bfloat16",
                             scan_layers=True, remat_policy="nothing_saveable")
TARGETS = {"q,v": ("q_proj", "v_proj"),
           "all_linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")}
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2}}
GIB = 1 << 30


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (nothing allocated)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def lowered_step(cfg: DistillConfig, config: llama.LlamaConfig, mesh):
  """(the lowered distillation step, its abstract state) for `mesh`, on abstract inputs."""
  shapes = hf.param_shapes(config)
  base = abstract(shapes, parallel.param_shardings(shapes, llama.partition_rules(config), mesh))
  _, state, _, step = distill.build_step(config, cfg, base, mesh, abstract=True)
  half = np.zeros(LENGTH // 2, np.int32)  # prompt and rationale halves: only the shapes matter
  batch = loader.lm_batch([half] * BATCH, [half] * BATCH, (LENGTH,), pad_id=0)
  batch = abstract(batch, {name: parallel.batch_sharding(mesh, 2) for name in batch})
  with jax.set_mesh(mesh):
    lowered = step.lower(base, state, batch)
  return lowered, state


def compile_step(targets: tuple[str, ...], axes: dict[str, int]) -> dict:
  """Per-device memory of the sharded step as XLA compiles it for the mesh; global FLOPs,
  remat recomputation included, from XLA's cost analysis of the unrolled program (the compiled
  scan would count its loop body once)."""
  mesh = parallel.make_mesh(axes)
  cfg = DistillConfig(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets=targets,
                      batch_size=BATCH)
  lowered, state = lowered_step(cfg, CONFIG, mesh)
  memory = lowered.compile().memory_analysis()
  unrolled, _ = lowered_step(cfg, dataclasses.replace(CONFIG, scan_layers=False), mesh)
  xla_flops = unrolled.cost_analysis()["flops"]
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      "mesh": axes, "lora_targets": list(targets),
      "lora_params": sum(x.size for x in jax.tree.leaves(state.lora)),
      "per_device_gib": {
          "arguments": memory.argument_size_in_bytes / GIB,
          "outputs": memory.output_size_in_bytes / GIB,
          "temporaries": memory.temp_size_in_bytes / GIB,
          "donated": memory.alias_size_in_bytes / GIB,
          "total": per_device / GIB},
      "fits_16_gib": per_device < 16 * GIB,
      "xla_flops_per_step": xla_flops,
      "xla_flops_per_step_per_device": xla_flops / mesh.size,
      "model_flops_per_step": BATCH * LENGTH * llama.flops_per_token(CONFIG, LENGTH, "lora"),
  }


def main(argv):
  del argv
  runs = [compile_step(targets, axes) | {"name": f"{mesh_name}/{target_name}"}
          for mesh_name, axes in MESHES.items() for target_name, targets in TARGETS.items()]
  print(json.dumps({"model": "LLaMA-2-7B bf16, remat nothing_saveable; the distillation step: "
                             "fp32 LoRA r=8, clipped AdamW",
                    "global_batch": [BATCH, LENGTH], "devices": jax.device_count(),
                    "runs": runs}, indent=2))


if __name__ == "__main__":
  app.run(main)
