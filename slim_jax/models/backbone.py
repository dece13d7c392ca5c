"""The interface every sequential recommender implements (RecBole style), and the spec that
registers one.

A backbone is a linen module over item sequences LEFT-padded with 0 (most recent item in the
last column) whose `__call__(inputs int32[B, L], train, columns, table_fn) -> (states [B, T, H],
table [R, H])` returns the sequence states and the item-embedding table they are scored against
(`scores = states @ table.T`). Given `table_fn` ([R, H] -> [R, H]), the item table is
`table_fn(item_emb)` for both: the inputs are embedded with it and it is the table returned
(SLIM's `slim.item_text_input`, item text fused into the inputs); None, the raw item_emb.
Causal backbones (SASRec, GRU4Rec) return one state per position (T = L), so a whole window
trains on every next item in one pass; session-level ones (SRGNN, T = 1) and bidirectional ones
(BERT4Rec) do not. Given `columns` int32[B, k], a backbone returns only those columns' states
(T = k): the ones the loss scores, or the last one to predict; the transformers then compute
nothing else in their last block. `predict(inputs, table_fn) -> (state float[B, H], table)` is
the state that predicts the item after the last column. Row 0 of the table is padding; rows
past `num_items` (BERT4Rec's mask token, rows padding the table to a shardable size) never
score.

Each backbone's file declares a `BackboneSpec` beside its module: everything the config and the
trainer need to know of it (defaults, construction, training task, sharding), so neither names a
backbone; models/backbones.py lists the specs. RecConfig (models/recommender.py) reads that
registry, which imports the backbones, so the interface they import lives here, apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from slim_jax import parallel


TableFn = Callable[[jax.Array], jax.Array]  # the item table [R, H] -> the one the backbone uses


class Backbone(nn.Module):
  """Fields and the default `predict` shared by every backbone."""
  num_items: int
  rows: int  # item-table rows, see BackboneSpec.table_rows
  hidden: int = 64
  max_len: int = 50

  def predict(self, inputs: jax.Array, table_fn: TableFn | None = None
              ) -> tuple[jax.Array, jax.Array]:
    states, table = self(inputs, train=False, columns=last_column(inputs), table_fn=table_fn)
    return states[:, -1], table


def item_table(embed: nn.Embed, table_fn: TableFn | None = None) -> jax.Array:
  """[R, H] the table a backbone embeds its inputs with and returns: `embed`'s, or
  `table_fn` of it."""
  return embed.embedding if table_fn is None else table_fn(embed.embedding)


def embed_items(embed: nn.Embed, inputs: jax.Array, table_fn: TableFn | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """(the inputs' item vectors [B, L, H], the table [R, H] they come from): `embed`'s own
  lookup, or rows of `table_fn` of its table."""
  if table_fn is None:
    return embed(inputs), embed.embedding
  table = table_fn(embed.embedding)
  return jnp.take(table, inputs, axis=0), table


def last_column(inputs: jax.Array) -> jax.Array:
  """int32[B, 1] columns of each row's last (most recent) position."""
  return jnp.full((inputs.shape[0], 1), inputs.shape[1] - 1, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Task:
  """What a training batch asks a backbone to predict. `cfg` below is a resolved RecConfig."""
  # gradient(loss_gradient, batch, rng, cfg, num_items) -> (loss, gradients): `loss_gradient`,
  # (inputs, targets) -> (loss, gradients), on the inputs and targets the task makes of `batch`
  gradient: Callable[..., Any]
  # targets_per_row(cfg): most targets a per-position training row holds, the columns the loss
  # scores (recommender.scored_columns)
  targets_per_row: Callable[[Any], int]
  extra_rows: int = 0  # item-table rows the task adds past the items (never scored)


def next_item_gradient(loss_gradient: Callable, batch, rng: jax.Array, cfg, num_items: int):
  """The next-item task: the batch as the loader made it, each target the item after its column."""
  del rng, cfg, num_items  # nothing to draw
  return loss_gradient(batch["inputs"], batch["targets"])


def window_targets(cfg) -> int:
  """A per-position window's targets: its last `stride` columns."""
  return cfg.stride or cfg.max_len


NEXT_ITEM = Task(next_item_gradient, window_targets)


def table_sharding(cfg) -> parallel.Rules:
  """Item-table rows over `rec.table_axis` (also its Adam moments); everything else replicated."""
  return [(r"item_emb/embedding$", P(cfg.table_axis or None, None)), (r".*", P())]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """One backbone as the config and the trainer see it."""
  name: str  # rec.backbone
  # RecBole 1.2.1's defaults (its model yaml): RecConfig fields left None take these
  defaults: Mapping[str, Any]
  # build(cfg, **shared) -> the module, `shared` being Backbone's own fields
  build: Callable[..., Backbone]
  task: Task = NEXT_ITEM
  # A state per position, so per_position training scores a window's every target in one pass;
  # False (SRGNN, one state per session graph) trains on prefixes only (last_position)
  per_position: bool = True
  sharding_rules: Callable[[Any], parallel.Rules] = table_sharding  # (cfg) -> parameter rules

  def table_rows(self, num_items: int, multiple: int = 1) -> int:
    """Rows of the item table: padding + items + the task's extra rows, rounded up to `multiple`
    (a table sharded over a mesh axis of that size)."""
    rows = num_items + 1 + self.task.extra_rows
    return -(-rows // multiple) * multiple
