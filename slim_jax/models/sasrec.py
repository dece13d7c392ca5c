"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item sequence.

Follows RecBole's SASRec: item + learned position embeddings, layer norm and dropout, then
post-norm transformer blocks (attention, feed-forward with GELU), N(0, 0.02) initialisation.
Positions count from the first real item, so extra left padding never changes a state, and every
padded position is masked out as a key.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax.models.backbone import Backbone, BackboneSpec, TableFn, embed_items

INIT = nn.initializers.normal(0.02)


class TransformerBlock(nn.Module):
  """Post-norm block (BERT/RecBole): LN(x + attention), then LN(h + feed-forward)."""
  heads: int
  inner: int
  dropout: float
  attn_dropout: float

  @nn.compact
  def __call__(self, x, mask, train: bool, columns=None):
    """States [B, L, H]; given `columns` int32[B, k], only theirs [B, k, H]."""
    query = x
    if columns is not None:
      query = jnp.take_along_axis(x, columns[..., None], 1)
      mask = jnp.take_along_axis(mask, columns[:, None, :, None], 2)
    # broadcast_dropout=False: a fresh attention-dropout mask per row and head, as torch's dropout
    # in RecBole; flax's default shares one [L, L] mask across the whole batch.
    attn = nn.MultiHeadDotProductAttention(
        self.heads, dropout_rate=self.attn_dropout, broadcast_dropout=False, kernel_init=INIT,
        name="attn")(query, x, mask=mask, deterministic=not train)
    x = nn.LayerNorm(1e-12, name="ln_attn")(query + nn.Dropout(self.dropout)(attn, not train))
    h = nn.Dense(self.inner, kernel_init=INIT, name="ffn_in")(x)
    h = nn.Dense(x.shape[-1], kernel_init=INIT, name="ffn_out")(nn.gelu(h, approximate=False))
    return nn.LayerNorm(1e-12, name="ln_ffn")(x + nn.Dropout(self.dropout)(h, not train))


def positions(inputs: jax.Array) -> jax.Array:
  """Index of each item from the first real item of its row (padding gets 0)."""
  return jnp.maximum(jnp.cumsum(inputs > 0, axis=1) - 1, 0)


class TransformerEncoder(nn.Module):
  """Embeds items and positions and runs the blocks under an attention mask [B, 1, L, L]."""
  rows: int
  hidden: int
  max_len: int
  layers: int
  heads: int
  inner: int
  dropout: float
  attn_dropout: float

  def setup(self):
    self.item_emb = nn.Embed(self.rows, self.hidden, embedding_init=INIT)
    self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=INIT)
    self.ln = nn.LayerNorm(1e-12)
    self.drop = nn.Dropout(self.dropout)
    self.blocks = [TransformerBlock(self.heads, self.inner, self.dropout, self.attn_dropout)
                   for _ in range(self.layers)]

  def __call__(self, inputs, mask, train: bool, columns=None, table_fn: TableFn | None = None):
    """(states [B, L, H], or [B, k, H] of `columns` int32[B, k] only (the last block computes
    nothing else: the columns the loss scores, or the last one for prediction); the item table
    [R, H] the inputs were embedded with: item_emb's, or `table_fn` of it)."""
    items, table = embed_items(self.item_emb, inputs, table_fn)
    x = items + self.pos_emb(positions(inputs))
    x = self.drop(self.ln(x), not train)
    for i, block in enumerate(self.blocks):
      x = block(x, mask, train, columns if i == len(self.blocks) - 1 else None)
    return x, table


class SASRec(Backbone):
  layers: int = 2
  heads: int = 2
  inner: int = 256
  dropout: float = 0.5
  attn_dropout: float = 0.5

  def setup(self):
    self.encoder = TransformerEncoder(self.rows, self.hidden, self.max_len, self.layers,
                                      self.heads, self.inner, self.dropout, self.attn_dropout)

  def __call__(self, inputs, train: bool = False, columns=None, table_fn: TableFn | None = None):
    length = inputs.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None, None] & (inputs > 0)[:, None, None, :]
    return self.encoder(inputs, mask, train, columns, table_fn)


def transformer_fields(cfg) -> dict:
  """The transformer's fields of the SASRec-style backbones, from a resolved RecConfig."""
  return dict(layers=cfg.layers, heads=cfg.heads, inner=cfg.inner, dropout=cfg.dropout,
              attn_dropout=cfg.attn_dropout)


SPEC = BackboneSpec(
    name="sasrec",
    # SASRec on overlapping windows: each target sees more context than in tiled windows, at the
    # same targets a step (docs/results.md, "Recommender training recipes").
    defaults=dict(layers=2, dropout=0.5, attn_dropout=0.5, train_mode="per_position", stride=10),
    build=lambda cfg, **shared: SASRec(**shared, **transformer_fields(cfg)))
