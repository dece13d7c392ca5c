"""Dropout whose random mask is computed once per step.

XLA fuses `jax.random.bernoulli` (threefry hashing) into every consumer of the mask it makes,
the forward select and the backward one, so each consumer hashes again. On CPU that repeated
hashing was half of a BERT4Rec step on prefixes (405 s an epoch, 198 s with the mask computed
once, 169 s with no dropout). An optimization barrier makes XLA keep the mask instead. The masks
are flax's own (the same rng, probability and shape), so training is bit-identical to
`flax.linen.Dropout` and flax's attention dropout (checked in tests/test_recommenders.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def keep_mask(rng: jax.Array, keep_prob: float, shape) -> jax.Array:
  """bool[shape], True with probability `keep_prob`, materialised (never recomputed)."""
  return jax.lax.optimization_barrier(jax.random.bernoulli(rng, keep_prob, shape))


class Dropout(nn.Module):
  """`flax.linen.Dropout` without broadcast dimensions, its mask computed once."""
  rate: float

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    mask = keep_mask(self.make_rng("dropout"), keep_prob, inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def dot_product_attention(query, key, value, mask=None, dropout_rng=None,
                          dropout_rate: float = 0.0, deterministic: bool = False):
  """`flax.linen.dot_product_attention` with a fresh dropout mask per row and head (no broadcast
  dropout, as torch's), computed once: MultiHeadDotProductAttention's `attention_fn`."""
  weights = nn.dot_product_attention_weights(query, key, mask=mask, deterministic=True)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    keep = keep_mask(dropout_rng, keep_prob, weights.shape)
    weights = weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))
  return jnp.einsum("...hqk,...khd->...qhd", weights, value)
