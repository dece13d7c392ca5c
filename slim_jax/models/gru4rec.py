"""GRU4Rec (Hidasi et al., ICLR 2016; Tan et al., 2016) as in RecBole.

Item embeddings with dropout, GRU layers, a projection back to the embedding size. The GRU keeps
its state unchanged across padded columns, so extra left padding never changes an output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax.models.backbone import Backbone, BackboneSpec, TableFn, embed_items


class MaskedGRU(nn.Module):
  """A GRU layer over [B, L, D] that skips (carries its state through) masked columns."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    def step(cell, carry, column):
      x_t, m_t = column
      new, _ = cell(carry, x_t)
      carry = jnp.where(m_t[:, None], new, carry)
      return carry, carry

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    cell = nn.GRUCell(self.features, kernel_init=nn.initializers.xavier_uniform(),
                      recurrent_kernel_init=nn.initializers.xavier_uniform(), name="cell")
    _, states = scan(cell, jnp.zeros((x.shape[0], self.features), x.dtype), (x, mask))
    return states


class GRU4Rec(Backbone):
  gru_hidden: int = 128
  layers: int = 1
  dropout: float = 0.3

  @nn.compact
  def __call__(self, inputs, train: bool = False, columns=None, table_fn: TableFn | None = None):
    emb = nn.Embed(self.rows, self.hidden, embedding_init=nn.initializers.xavier_normal(),
                   name="item_emb")
    items, table = embed_items(emb, inputs, table_fn)
    x = nn.Dropout(self.dropout)(items, not train)
    for i in range(self.layers):
      x = MaskedGRU(self.gru_hidden, name=f"gru_{i}")(x, inputs > 0)
    if columns is not None:
      x = jnp.take_along_axis(x, columns[..., None], 1)
    return nn.Dense(self.hidden, name="proj")(x), table


SPEC = BackboneSpec(
    name="gru4rec",
    defaults=dict(layers=1, dropout=0.3, attn_dropout=0.0, train_mode="per_position"),
    build=lambda cfg, **shared: GRU4Rec(**shared, gru_hidden=cfg.gru_hidden, layers=cfg.layers,
                                        dropout=cfg.dropout))
