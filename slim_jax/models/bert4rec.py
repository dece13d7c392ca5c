"""BERT4Rec (Sun et al., CIKM 2019): bidirectional self-attention trained to fill masked items.

Follows RecBole's BERT4Rec: the SASRec embedding and blocks with a bidirectional mask over real
items, an output dense + GELU + layer norm, and mask token id num_items + 1 (the table's extra
row, never scored). Training replaces a random share of a window's items with the mask token and
predicts them; prediction appends the mask token after the history and reads its state.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax.models.backbone import Backbone, BackboneSpec, TableFn, Task
from slim_jax.models.sasrec import INIT, TransformerEncoder, transformer_fields


def mask_token_id(num_items: int) -> int:
  """The mask token's id: the item table's row past the items."""
  return num_items + 1


def mask_items(rng: jax.Array, window: jax.Array, ratio: float, mask_token: int):
  """(inputs with items masked, targets: the masked items else 0) of windows int32[B, L]: a
  random `ratio` of the real items (the cloze task)."""
  masked = jax.random.bernoulli(rng, ratio, window.shape) & (window > 0)
  return jnp.where(masked, mask_token, window), jnp.where(masked, window, 0)


def mask_last(window: jax.Array, mask_token: int):
  """(inputs with the last column masked, targets int32[B]: the last items): the next-item task
  that prediction asks. RecBole trains a share of its batches (ft_ratio) on it; drawn per row
  instead, the last items would be ~9% of a step's targets (the loss is their mean), and
  validation peaks lower (docs/results.md, "Recommender training recipes")."""
  last = window[:, -1]
  return window.at[:, -1].set(jnp.where(last > 0, mask_token, 0)), last


class BERT4Rec(Backbone):
  layers: int = 2
  heads: int = 2
  inner: int = 256
  dropout: float = 0.2
  attn_dropout: float = 0.2

  def setup(self):
    self.encoder = TransformerEncoder(self.rows, self.hidden, self.max_len, self.layers,
                                      self.heads, self.inner, self.dropout, self.attn_dropout)
    self.out_dense = nn.Dense(self.hidden, kernel_init=INIT)
    self.out_ln = nn.LayerNorm(1e-12)

  def __call__(self, inputs, train: bool = False, columns=None, table_fn: TableFn | None = None):
    batch, length = inputs.shape
    mask = jnp.broadcast_to((inputs > 0)[:, None, None, :], (batch, 1, length, length))
    x, table = self.encoder(inputs, mask, train, columns, table_fn)
    states = self.out_ln(nn.gelu(self.out_dense(x), approximate=False))
    return states, table

  def predict(self, inputs, table_fn: TableFn | None = None):
    """The state of a mask token appended after the history (the oldest column drops out)."""
    token = jnp.full((inputs.shape[0], 1), mask_token_id(self.num_items), inputs.dtype)
    return super().predict(jnp.concatenate([inputs[:, 1:], token], 1), table_fn)


def masked_gradient(loss_gradient, batch, rng: jax.Array, cfg, num_items: int):
  """`loss_gradient(inputs, targets)` of the masked task on the window ending at the last
  target: with probability `mask_last_ratio` (drawn per batch, RecBole's ft_ratio) only the last
  item is masked, and then the last block and the logits run for that column alone; otherwise a
  random `mask_ratio` of the items."""
  last = batch["targets"][:, -1] if batch["targets"].ndim == 2 else batch["targets"]
  window = jnp.concatenate([batch["inputs"][:, 1:], last[:, None]], 1)
  token = mask_token_id(num_items)
  return jax.lax.cond(
      jax.random.bernoulli(jax.random.fold_in(rng, 1), cfg.mask_last_ratio),
      lambda: loss_gradient(*mask_last(window, token)),
      lambda: loss_gradient(*mask_items(rng, window, cfg.mask_ratio, token)))


def masked_targets(cfg) -> int:
  """A row's masked items, as RecBole keeps them: the newest mask_ratio * max_len (10 of 50; a
  full row masks more with probability 0.42; its older masked items stay masked in the input,
  unscored)."""
  return max(1, int(cfg.mask_ratio * cfg.max_len))


MASKED_ITEMS = Task(masked_gradient, masked_targets, extra_rows=1)  # the row: the mask token

SPEC = BackboneSpec(
    name="bert4rec",
    # BERT4Rec on prefixes, as RecBole: windows are far cheaper an epoch but plateau lower;
    # prefixes reach RecBole's accuracy (docs/results.md, 2026-11-30, "BERT4Rec").
    defaults=dict(layers=2, dropout=0.2, attn_dropout=0.2, train_mode="last_position"),
    build=lambda cfg, **shared: BERT4Rec(**shared, **transformer_fields(cfg)),
    task=MASKED_ITEMS)
