"""SLIM's recommenders: a backbone's user state fused with the user's rationale vector
(ID-based), or the rationale alone matched against item-text vectors (ID-agnostic).

Rationale and item-text vectors are *side inputs*, not parameters: a dict of arrays passed to
every call beside the item sequence (`side_inputs` builds it), so the encoder that made them,
the shuffled control and the split they come from are all swapped without touching the model.

  side = {"rationale": float[U, D], "has_rationale": bool[U], "item_text": float[R, D]}
  (+ "rationale_ids": int32[U, T], "rationale_lengths": int32[U] to fine-tune the encoder)

`SLIM.__call__(inputs, users, side, train)` and `SLIM.predict(inputs, users, side)` keep the
backbone interface (`models/recommender.py`) with the users of the rows added; in mode "plain"
they are exactly the backbone's, so one trainer serves every variant.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slim_jax.models import bert
from slim_jax.models.recommender import Backbone

# plain: the backbone alone; id_based: backbone fused with the rationale; id_agnostic: rationale
# vs item text through learned projections; zero_shot: raw cosine of the two, nothing trained.
MODES = ("plain", "id_based", "id_agnostic", "zero_shot")
AGNOSTIC_MODES = ("id_agnostic", "zero_shot")  # no backbone, no item IDs
FUSIONS = ("add", "concat", "gate")


@dataclasses.dataclass(frozen=True)
class SlimConfig:
  """How rationale vectors enter the recommender (the `slim` config section)."""
  modes: tuple[str, ...] = ("plain", "id_based", "id_agnostic", "zero_shot")  # the train stage's
  fusion: str = "add"  # id_based: add | concat (then project) | gate
  item_text: bool = False  # id_based: add projected item-text vectors to the scoring table
  shuffle: bool = False  # control: every user gets another user's rationale
  rationale_dropout: float = 0.0  # share of training rows whose rationale is zeroed
  # Encoder ablation (b): the MiniLM runs inside the recommender's step on each row's rationale
  # tokens and trains with it, instead of reading frozen vectors.
  finetune_encoder: bool = False
  seed: int = 0  # of the shuffle

  def checked(self) -> SlimConfig:
    unknown = [mode for mode in self.modes if mode not in MODES]
    if unknown:
      raise ValueError(f"slim.modes: {unknown[0]!r} is not one of {MODES}")
    if self.fusion not in FUSIONS:
      raise ValueError(f"slim.fusion={self.fusion!r}: expected one of {FUSIONS}")
    if not 0.0 <= self.rationale_dropout < 1.0:
      raise ValueError(f"slim.rationale_dropout={self.rationale_dropout}: expected [0, 1)")
    return self


def derangement(count: int, seed: int) -> np.ndarray:
  """A permutation with no fixed point (for count >= 2): a random cycle through all indices."""
  order = np.random.default_rng(seed).permutation(count)
  permutation = np.empty(count, np.int64)
  permutation[order] = np.roll(order, -1)
  return permutation


def shuffled_sources(present: np.ndarray, seed: int) -> np.ndarray:
  """Whose rationale each user reads in the shuffled control: every user who has one gets a
  different such user's; the others keep their (absent) own."""
  owners = np.flatnonzero(present)
  source = np.arange(len(present))
  source[owners] = owners[derangement(len(owners), seed)]
  return source


# The rationale each split reads, first one present: training rows and validation read the one
# written from seq[:-2] ("valid"); the test reads its own (seq[:-1]) when one was written.
RATIONALE_OF_SPLIT = {"train": ("valid",), "valid": ("valid",), "test": ("test", "valid")}


def side_inputs(encoded, rows: int, cfg: SlimConfig) -> dict[str, dict[str, np.ndarray]]:
  """Side inputs per split from what the encode stage wrote (`encode.Encoded`).

  Item-text rows [I+1, D] are zero-padded to the item table's `rows`. With
  `cfg.finetune_encoder` they also hold each user's rationale token ids and their lengths.
  """
  padded = np.zeros((rows, encoded.item_vectors.shape[1]), np.float32)
  padded[:len(encoded.item_vectors)] = encoded.item_vectors
  sides = {}
  for split, candidates in RATIONALE_OF_SPLIT.items():
    source = next((s for s in candidates if s in encoded.rationales), None)
    if source is None:
      raise ValueError(f"no rationale vectors for split {split!r}: have "
                       f"{sorted(encoded.rationales)}")
    vectors, present = encoded.rationales[source]
    users = shuffled_sources(present, cfg.seed) if cfg.shuffle else np.arange(len(present))
    sides[split] = {"rationale": np.asarray(vectors[users], np.float32),
                    "has_rationale": np.asarray(present[users], bool), "item_text": padded}
    if cfg.finetune_encoder:
      if source not in encoded.tokens:
        raise ValueError("slim.finetune_encoder needs rationale token ids: encode with "
                         "encoder.kind=minilm")
      ids, lengths = encoded.tokens[source]
      sides[split].update(rationale_ids=ids[users], rationale_lengths=lengths[users])
  return sides


class SLIM(nn.Module):
  """A backbone in one of the MODES; the ID-agnostic modes have no backbone. With an `encoder`
  (a BERT config: `slim.finetune_encoder`) rationale vectors are computed from token ids by
  its trainable copy, params/rationale_encoder, initialised from the checkpoint by the trainer."""
  mode: str
  cfg: SlimConfig
  num_items: int
  rows: int
  hidden: int
  backbone: Backbone | None = None
  encoder: bert.BertConfig | None = None
  pooling: bert.Pooling = bert.Pooling()

  def setup(self):
    if self.encoder is not None:
      self.rationale_encoder = bert.Bert(self.encoder)
    if self.mode == "id_based":
      self.rationale_proj = nn.Dense(self.hidden)
      if self.cfg.fusion == "concat":
        self.fuse_proj = nn.Dense(self.hidden)
      if self.cfg.fusion == "gate":
        self.gate_proj = nn.Dense(self.hidden)
      if self.cfg.item_text:
        self.item_text_proj = nn.Dense(self.hidden, use_bias=False)
    if self.mode == "id_agnostic":
      self.rationale_proj = nn.Dense(self.hidden)
      self.item_text_proj = nn.Dense(self.hidden)

  def rationale(self, users, side, train: bool) -> jax.Array:
    """[B, D] rationale vectors of `users` (rows < 0 are padding), zero where a user has none."""
    safe = jnp.maximum(users, 0)
    keep = side["has_rationale"][safe] & (users >= 0)
    if self.encoder is None:
      vectors = side["rationale"][safe]
    else:
      ids = side["rationale_ids"][safe]
      mask = (jnp.arange(ids.shape[1]) < side["rationale_lengths"][safe][:, None]).astype(jnp.int32)
      vectors = bert.pool(self.rationale_encoder(ids, mask), mask, self.pooling)
    if train and self.cfg.rationale_dropout:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.cfg.rationale_dropout,
                                  keep.shape)
      keep = keep & ~drop
    return jnp.where(keep[:, None], vectors, 0.0)

  def fuse(self, states, rationale) -> jax.Array:
    """States [B, T, H] fused with the projected rationale [B, D] by `cfg.fusion`."""
    r = jnp.broadcast_to(self.rationale_proj(rationale)[:, None], states.shape)
    if self.cfg.fusion == "add":
      return states + r
    both = jnp.concatenate([states, r], -1)
    if self.cfg.fusion == "concat":
      return self.fuse_proj(both)
    gate = jax.nn.sigmoid(self.gate_proj(both))
    return gate * states + (1.0 - gate) * r

  def agnostic(self, inputs, users, side, train: bool, columns=None):
    """Rationale state broadcast over the columns asked for (default: every input column),
    item-text table: no item IDs at all."""
    rationale = self.rationale(users, side, train)
    if self.mode == "zero_shot":
      state, table = rationale, side["item_text"]
    else:
      state, table = self.rationale_proj(rationale), self.item_text_proj(side["item_text"])
    shape = inputs.shape if columns is None else columns.shape
    return jnp.broadcast_to(state[:, None], (*shape, state.shape[-1])), table

  def __call__(self, inputs, users, side, train: bool = False, columns=None):
    """(states [B, T, H], table [R, H]) as the backbone's, SLIM-fused."""
    if self.backbone is None:
      return self.agnostic(inputs, users, side, train, columns)
    states, table = self.backbone(inputs, train=train, columns=columns)
    return self.combine(states, table, users, side, train)

  def predict(self, inputs, users, side):
    """(state [B, H], table) predicting the item after the last column."""
    if self.backbone is None:
      states, table = self.agnostic(inputs[:, -1:], users, side, False)
      return states[:, -1], table
    state, table = self.backbone.predict(inputs)
    states, table = self.combine(state[:, None], table, users, side, False)
    return states[:, 0], table

  def combine(self, states, table, users, side, train: bool):
    if self.mode == "plain":
      return states, table
    states = self.fuse(states, self.rationale(users, side, train))
    if self.cfg.item_text:
      table = table + self.item_text_proj(side["item_text"])
    return states, table
