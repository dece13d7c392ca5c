"""A sequential recommender's config (RecBole style) and its losses.

The backbones share one interface (models/backbone.py) and are looked up by name in the registry
(models/backbones.py): `RecConfig.spec` is everything per-backbone, from its defaults to its
training task. Losses are plain functions of (states, table, targets), independent of the
backbone, so any backbone trains with any loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from slim_jax import checks
from slim_jax.models.backbone import BackboneSpec, last_column
from slim_jax.models.backbones import BACKBONES
from slim_jax.parallel import MeshConfig

LOSSES = ("ce", "bpr", "sampled")
TRAIN_MODES = ("per_position", "last_position")
SCHEDULES = ("constant", "cosine")
SAMPLED_EVALS = ("uniform", "popularity")
PREFIX_BATCH = 256  # prefixes a step (last_position), RecBole's batch


@dataclasses.dataclass(frozen=True)
class RecConfig:
  """A sequential recommender and how it trains; None fields take the backbone's RecBole default."""
  backbone: str = "sasrec"  # a name in BACKBONES (models/backbones.py)
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

  @property
  def spec(self) -> BackboneSpec:
    """The backbone's spec: its defaults, module, training task and sharding."""
    return BACKBONES[self.backbone]

  def resolved(self) -> RecConfig:
    """This config with the backbone's defaults filled in, checked."""
    checks.one_of("rec.backbone", self.backbone, BACKBONES)
    checks.one_of("rec.loss", self.loss, LOSSES)
    cfg = dataclasses.replace(self, **{k: v for k, v in self.spec.defaults.items()
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
      per_position = cfg.train_mode == "per_position"
      cfg = dataclasses.replace(cfg, batch=windows if per_position else PREFIX_BATCH)
    if cfg.finish_on_prefixes and cfg.train_mode != "per_position":
      raise ValueError("rec.finish_on_prefixes=true follows per-position training; "
                       f"rec.train_mode={cfg.train_mode!r} already trains on prefixes")
    if cfg.train_mode == "per_position" and not cfg.spec.per_position:
      raise ValueError(f"rec.train_mode=per_position needs a state per position; {cfg.backbone} "
                       "has one per sequence, use last_position")
    return cfg


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

