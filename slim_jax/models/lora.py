"""LoRA as data: low-rank adapters in their own pytree (PEFT file I/O: checkpoints/peft.py).

The frozen base weights live in the "params" collection and the adapters in "lora", so the
optimizer only ever sees the adapters and the model is exactly the base model when "lora" is
absent. Adapters act as x @ A @ B * alpha / r beside the frozen matmul (W + BA is never
materialised in training) and are merged into W only for export or fast inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter hyperparameters; `targets` are Hugging Face module names (q_proj, ..., down_proj)."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def init_lora(model, key: jax.Array):
  """Fresh adapters for `model` (a Llama built with a LoraConfig): A kaiming-uniform, B = 0.

  Only the "lora" collection is kept; under jit XLA drops the unused base initialisation, so this
  is cheap even for a 7B model.
  """
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32))["lora"])(key)


def kaiming_uniform(key, shape, dtype):
  """PEFT's kaiming_uniform_(a=sqrt(5)) for A [in, r]: U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / np.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_delta(x, a, b, config: LoraConfig, dropout_key=None):
  """x @ A @ B * scale, with PEFT's dropout on x when a dropout key is given (training)."""
  if dropout_key is not None and config.dropout > 0:
    keep = jax.random.bernoulli(dropout_key, 1.0 - config.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
  # the scale multiplies the rank-r activations, the smallest tensor on the way
  return ((x @ a.astype(x.dtype)) * jnp.asarray(config.scale, x.dtype)) @ b.astype(x.dtype)


def merged_kernel(kernel, a, b, config: LoraConfig):
  """One adapted kernel [in, out] (or a stack of them) with A @ B * scale folded in, summed in
  fp32 and returned in the kernel's dtype: the one merge that `merge` (a whole tree) and the
  GGUF export (a tensor at a time) share."""
  delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) + delta * config.scale).astype(kernel.dtype)


def merge(params, lora, config: LoraConfig):
  """Base params with A @ B * scale folded into every adapted kernel (fast decoding)."""
  flat, adapters = traverse_util.flatten_dict(params), traverse_util.flatten_dict(lora)
  for path, a in adapters.items():
    if path[-1] == "lora_a":
      module = path[:-1]
      flat[module + ("kernel",)] = merged_kernel(flat[module + ("kernel",)], a,
                                                 adapters[module + ("lora_b",)], config)
  return traverse_util.unflatten_dict(flat)
