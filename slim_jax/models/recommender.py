"""The interface every sequential recommender shares (RecBole style), its config and its losses.

A backbone is a linen module over item sequences LEFT-padded with 0 (most recent item in the
last column) whose `__call__(inputs int32[B, L], train, columns) -> (states [B, T, H],
table [R, H])` returns the sequence states and the item-embedding table they are scored against
(`scores = states @ table.T`). Causal backbones (SASRec, GRU4Rec) return one state per position
(T = L), so a whole window trains on every next item in one pass; session-level ones (SRGNN,
T = 1) and bidirectional ones (BERT4Rec) do not. Given `columns` int32[B, k], a backbone returns
only those columns' states (T = k): the ones the loss scores, or the last one to predict; the
transformers then compute nothing else in their last block. `predict(inputs) -> (state
float[B, H], table)` is the state that predicts the item after the last column. Row 0 of the
table is padding; rows past `num_items` (BERT4Rec's mask token, rows padding the table to a
shardable size) never score.
Losses are plain functions of (states, table, targets), independent of the backbone, so any
backbone trains with any loss.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax import checks
from slim_jax.parallel import MeshConfig

BACKBONES = ("sasrec", "gru4rec", "srgnn", "bert4rec")
LOSSES = ("ce", "bpr", "sampled")
TRAIN_MODES = ("per_position", "last_position")
SCHEDULES = ("constant", "cosine")
SAMPLED_EVALS = ("uniform", "popularity")

# RecBole 1.2.1's defaults for each backbone (its model yaml files); None fields take these.
BACKBONE_DEFAULTS = {
    # SASRec on overlapping windows: each target sees more context than in tiled windows, at the
    # same targets a step (docs/results.md, "Recommender training recipes").
    "sasrec": dict(layers=2, dropout=0.5, attn_dropout=0.5, train_mode="per_position", stride=10),
    "gru4rec": dict(layers=1, dropout=0.3, attn_dropout=0.0, train_mode="per_position"),
    "srgnn": dict(layers=1, dropout=0.0, attn_dropout=0.0, train_mode="last_position"),
    # BERT4Rec on prefixes, as RecBole: windows are far cheaper an epoch but plateau lower;
    # prefixes reach RecBole's accuracy (docs/results.md, 2026-11-30, "BERT4Rec").
    "bert4rec": dict(layers=2, dropout=0.2, attn_dropout=0.2, train_mode="last_position"),
}


@dataclasses.dataclass(frozen=True)
class RecConfig:
  """A sequential recommender and how it trains; None fields take the backbone's RecBole default."""
  backbone: str = "sasrec"  # sasrec | gru4rec | srgnn | bert4rec
  hidden: int = 64  # item embedding / state size
  max_len: int = 50  # most recent items a sequence keeps
  layers: int | None = None  # transformer blocks, GRU layers, or SRGNN gated graph steps
  heads: int = 2
  inner: int = 256  # transformer feed-forward size
  gru_hidden: int = 128
  dropout: float | None = None
  attn_dropout: float | None = None
  mask_ratio: float = 0.2  # BERT4Rec: share of items masked in training
  # BERT4Rec: probability that a training batch masks only its rows' last item, the task
  # prediction asks (RecBole's ft_ratio)
  mask_last_ratio: float = 0.5
  loss: str = "ce"  # ce (softmax over all items, padding row included, as RecBole) | bpr | sampled
  num_negatives: int = 1  # per target, for bpr and sampled softmax (uniform over items)
  train_mode: str | None = None  # per_position (loss at every column) | last_position (prefixes)
  # per_position: windows end every `stride` items, the loss on each one's last `stride` targets
  # (None = max_len: windows tile the sequence); smaller strides give each target more context.
  stride: int | None = None
  # per_position only: when early stopping ends training on windows, go on from their best state
  # on RecBole's prefixes (256 a step, the loss at the last position) until early stopping ends
  # that too, and keep the better of the two. Windows reach a validation plateau in a few cheap
  # epochs; prefixes then train the one case that prediction asks, a whole window of context
  # before the newest item (SASRec: long histories gain most; docs/results.md, 2026-11-30).
  finish_on_prefixes: bool = False
  lr: float = 1e-3
  weight_decay: float = 0.0
  warmup_steps: int = 0
  schedule: str = "constant"  # constant | cosine (decays to 0 at the last step)
  clip_norm: float = 5.0  # global gradient norm; 0 = no clipping
  # > 0: validate, select and test an exponential moving average of the parameters with this
  # decay per step (e.g. 0.999, a window of ~1,000 steps): a smoother test curve; it helps
  # GRU4Rec (experiments/configs/ml100k_gru4rec.py uses it), not SASRec (docs/results.md,
  # 2026-11-30); 0 = the trained parameters themselves, as RecBole.
  ema_decay: float = 0.0
  # Rows per step; None: 256 prefixes (last_position, RecBole's batch) or, per_position, windows
  # bringing 8 * max_len new targets (8 tiled windows, 40 of stride 10 at max_len 50): ~400
  # targets a step, ~300 updates an epoch, close to RecBole's 380; fewer, larger steps stop
  # early at a lower accuracy (docs/results.md, "Recommender training recipes").
  batch: int | None = None
  epochs: int = 200  # upper bound; early stopping usually ends training first
  patience: int = 10  # validations tolerated without a better valid/ndcg@10 (RecBole stopping_step)
  eval_every: int = 1  # epochs between validations
  # Also rank the test users at every validation (test/* in the history, never used to select):
  # the test curve compares training recipes with less noise than one best-valid checkpoint.
  track_test: bool = False
  # Users per evaluation batch: smaller batches run faster on a CPU (docs/benchmarks.md,
  # 2026-11-30); raise it on accelerators.
  eval_batch: int = 128
  exclude_history: bool = False  # full ranking drops items in the visible history (not the target)
  sampled_eval: str = "uniform"  # negatives of the sampled evaluation: uniform | popularity
  sampled_negatives: int = 100
  table_axis: str = ""  # mesh axis sharding the item table's rows ("" = replicated)
  seed: int = 2020

  def checked(self) -> RecConfig:
    self.resolved()
    return self

  def resolved(self) -> RecConfig:
    """This config with the backbone's defaults filled in, checked."""
    checks.one_of("rec.backbone", self.backbone, BACKBONES)
    checks.one_of("rec.loss", self.loss, LOSSES)
    defaults = BACKBONE_DEFAULTS[self.backbone]
    cfg = dataclasses.replace(self, **{k: v for k, v in defaults.items()
                                        if getattr(self, k) is None})
    checks.one_of("rec.train_mode", cfg.train_mode, TRAIN_MODES)
    checks.one_of("rec.schedule", cfg.schedule, SCHEDULES)
    checks.one_of("rec.sampled_eval", cfg.sampled_eval, SAMPLED_EVALS)
    checks.one_of("rec.table_axis", cfg.table_axis, ("", *MeshConfig().axes()))
    checks.within(cfg, "rec", "[1, inf)", "hidden", "max_len", "layers", "heads", "inner",
                  "gru_hidden", "num_negatives", "stride", "batch", "epochs", "eval_every",
                  "eval_batch", "sampled_negatives")
    checks.within(cfg, "rec", "(0, inf)", "lr")
    checks.within(cfg, "rec", "[0, inf)", "weight_decay", "warmup_steps", "clip_norm", "patience")
    checks.within(cfg, "rec", "[0, 1)", "dropout", "attn_dropout", "ema_decay")
    checks.within(cfg, "rec", "[0, 1]", "mask_ratio", "mask_last_ratio")
    if cfg.batch is None:
      windows = 8 * cfg.max_len // (cfg.stride or cfg.max_len)
      cfg = dataclasses.replace(cfg, batch=windows if cfg.train_mode == "per_position" else 256)
    if cfg.finish_on_prefixes and cfg.train_mode != "per_position":
      raise ValueError("rec.finish_on_prefixes=true follows per-position training; "
                       f"rec.train_mode={cfg.train_mode!r} already trains on prefixes")
    if cfg.backbone == "srgnn" and cfg.train_mode != "last_position":
      raise ValueError("rec.train_mode=per_position needs a causal backbone; srgnn encodes the "
                       "whole session graph, use last_position")
    return cfg


def targets_per_row(cfg: RecConfig) -> int:
  """Most targets a per-position training row holds, the columns the loss scores (see
  `scored_columns`): a window's last `stride` columns; BERT4Rec's masked items, as RecBole keeps
  them: the newest mask_ratio * max_len (10 of 50; a full row masks more with probability 0.42;
  its older masked items stay masked in the input, unscored)."""
  if cfg.backbone != "bert4rec":
    return cfg.stride or cfg.max_len
  return max(1, int(cfg.mask_ratio * cfg.max_len))


def table_rows(num_items: int, backbone: str, multiple: int = 1) -> int:
  """Rows of the item table: padding + items (+ BERT4Rec's mask token), rounded up to `multiple`."""
  rows = num_items + 1 + (backbone == "bert4rec")
  return -(-rows // multiple) * multiple


class Backbone(nn.Module):
  """Fields and the default `predict` shared by every backbone."""
  num_items: int
  rows: int  # item-table rows, see table_rows
  hidden: int = 64
  max_len: int = 50

  def predict(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    states, table = self(inputs, train=False, columns=last_column(inputs))
    return states[:, -1], table


def last_column(inputs: jax.Array) -> jax.Array:
  """int32[B, 1] columns of each row's last (most recent) position."""
  return jnp.full((inputs.shape[0], 1), inputs.shape[1] - 1, jnp.int32)


def item_mask(rows: int, num_items: int) -> jax.Array:
  """True for rows that are items a model may score: padding (0) included, extra rows not."""
  return jnp.arange(rows) <= num_items


def logits(states: jax.Array, table: jax.Array, num_items: int) -> jax.Array:
  """Scores of every table row; rows past `num_items` get -inf so they never win or add mass."""
  scores = states @ table.T
  return jnp.where(item_mask(table.shape[0], num_items), scores, -jnp.inf)


def cross_entropy(states, table, targets, num_items: int) -> jax.Array:
  """Per-example softmax CE over the whole item table [N] (RecBole's CE: padding row included)."""
  scores = logits(states, table, num_items)
  return jax.nn.logsumexp(scores, -1) - jnp.take_along_axis(scores, targets[:, None], -1)[:, 0]


def _pos_neg_scores(states, table, targets, negatives):
  pos = jnp.einsum("nh,nh->n", states, table[targets])
  neg = jnp.einsum("nh,nkh->nk", states, table[negatives])
  return pos, neg


def bpr(states, table, targets, negatives) -> jax.Array:
  """Per-example BPR loss [N], averaged over the K negatives int32[N, K] of each target."""
  pos, neg = _pos_neg_scores(states, table, targets, negatives)
  return -jax.nn.log_sigmoid(pos[:, None] - neg).mean(-1)


def sampled_softmax(states, table, targets, negatives) -> jax.Array:
  """Per-example softmax CE of the target against its K sampled negatives [N].

  Negatives equal to the target are dropped so a collision never pushes the target's own score.
  Negatives are uniform, so no log-Q correction is needed.
  """
  pos, neg = _pos_neg_scores(states, table, targets, negatives)
  neg = jnp.where(negatives == targets[:, None], -jnp.inf, neg)
  scores = jnp.concatenate([pos[:, None], neg], -1)
  return jax.nn.logsumexp(scores, -1) - pos


def sample_negatives(rng: jax.Array, shape, num_items: int) -> jax.Array:
  """Uniform item ids in [1, num_items] (never padding)."""
  return jax.random.randint(rng, shape, 1, num_items + 1, dtype=jnp.int32)


def scored_columns(inputs: jax.Array, targets: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(columns int32[B, T], their targets [B, T]): the columns of `inputs` the loss scores.

  A row's single target (targets [B]) is its last column's. Per-position targets [B, L] keep each
  row's k newest columns holding one: a SASRec window of 50 holds 10 targets and a BERT4Rec row
  ~20% masked items, and neither the logits over the catalogue nor the last transformer block
  need the other columns. Rows with fewer targets fill with columns whose target is 0 (no loss).
  """
  if targets.ndim == 1:
    return last_column(inputs), targets[:, None]
  length = inputs.shape[1]
  if k >= length:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), targets.shape), targets
  _, columns = jax.lax.top_k(jnp.where(targets > 0, jnp.arange(length), -1), k)
  return columns.astype(jnp.int32), jnp.take_along_axis(targets, columns, 1)


def loss(states, table, targets, rng, cfg: RecConfig, num_items: int) -> jax.Array:
  """Mean per-example loss over states [N, H] whose target is not 0 (0 = no loss)."""
  if cfg.loss == "ce":
    per = cross_entropy(states, table, targets, num_items)
  else:
    negatives = sample_negatives(rng, (targets.shape[0], cfg.num_negatives), num_items)
    per = (bpr if cfg.loss == "bpr" else sampled_softmax)(states, table, targets, negatives)
  weight = (targets > 0).astype(per.dtype)
  return (per * weight).sum() / jnp.maximum(weight.sum(), 1.0)

