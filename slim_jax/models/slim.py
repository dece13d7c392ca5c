"""SLIM's recommenders: a backbone's user state fused with the user's rationale vector
(ID-based), or the rationale alone matched against item-text vectors (ID-agnostic).

Rationale and item-text vectors are *side inputs*, not parameters: a dict of arrays passed to
every call beside the item sequence (`side_inputs` builds it), so the encoder that made them,
the shuffled control and the split they come from are all swapped without touching the model.

  side = {"rationale": float[U, D], "has_rationale": bool[U], "item_text": float[R, D]}

`SLIM.__call__(inputs, users, side, train)` and `SLIM.predict(inputs, users, side)` keep the
backbone interface (`models/recommender.py`) with the users of the rows added; in mode "plain"
they are exactly the backbone's, so one trainer serves every variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slim_jax.models.recommender import Backbone

# plain: the backbone alone; id_based: backbone fused with the rationale; id_agnostic: rationale
# vs item text through learned projections; zero_shot: raw cosine of the two, nothing trained.
MODES = ("plain", "id_based", "id_agnostic", "zero_shot")
FUSIONS = ("add", "concat", "gate")


@dataclasses.dataclass(frozen=True)
class SlimConfig:
  """How rationale vectors enter the recommender (the `slim` config section)."""
  modes: tuple[str, ...] = ("plain", "id_based", "id_agnostic", "zero_shot")  # the train stage's
  fusion: str = "add"  # id_based: add | concat (then project) | gate
  item_text: bool = False  # id_based: add projected item-text vectors to the scoring table
  shuffle: bool = False  # control: every user gets another user's rationale
  rationale_dropout: float = 0.0  # share of training rows whose rationale is zeroed
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


def shuffle_rationales(vectors: np.ndarray, present: np.ndarray,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Every user who has a rationale gets a different such user's (the shuffled control)."""
  owners = np.flatnonzero(present)
  shuffled = vectors.copy()
  shuffled[owners] = vectors[owners[derangement(len(owners), seed)]]
  return shuffled, present.copy()


# The rationale each split reads, first one present: training rows and validation read the one
# written from seq[:-2] ("valid"); the test reads its own (seq[:-1]) when one was written.
RATIONALE_OF_SPLIT = {"train": ("valid",), "valid": ("valid",), "test": ("test", "valid")}


def side_inputs(rationales: Mapping[str, tuple[np.ndarray, np.ndarray]], item_text: np.ndarray,
                rows: int, cfg: SlimConfig) -> dict[str, dict[str, np.ndarray]]:
  """Side inputs per split from the encode stage's vectors (`encode.load_encoded`).

  `rationales` maps a rationale split to ([U, D] vectors, [U] has-rationale mask); item-text
  rows [I+1, D] are zero-padded to the item table's `rows`.
  """
  padded = np.zeros((rows, item_text.shape[1]), np.float32)
  padded[:len(item_text)] = item_text
  sides = {}
  for split, sources in RATIONALE_OF_SPLIT.items():
    source = next((s for s in sources if s in rationales), None)
    if source is None:
      raise ValueError(f"no rationale vectors for split {split!r}: have {sorted(rationales)}")
    vectors, present = rationales[source]
    if cfg.shuffle:
      vectors, present = shuffle_rationales(vectors, present, cfg.seed)
    sides[split] = {"rationale": np.asarray(vectors, np.float32),
                    "has_rationale": np.asarray(present, bool), "item_text": padded}
  return sides


class SLIM(nn.Module):
  """A backbone in one of the MODES; the ID-agnostic modes have no backbone."""
  mode: str
  cfg: SlimConfig
  num_items: int
  rows: int
  hidden: int
  backbone: Backbone | None = None

  def setup(self):
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
    if train and self.cfg.rationale_dropout:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.cfg.rationale_dropout,
                                  keep.shape)
      keep = keep & ~drop
    return jnp.where(keep[:, None], side["rationale"][safe], 0.0)

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

  def agnostic(self, inputs, users, side, train: bool):
    """Rationale state broadcast over the input columns, item-text table: no item IDs at all."""
    rationale = self.rationale(users, side, train)
    if self.mode == "zero_shot":
      state, table = rationale, side["item_text"]
    else:
      state, table = self.rationale_proj(rationale), self.item_text_proj(side["item_text"])
    return jnp.broadcast_to(state[:, None], (*inputs.shape, state.shape[-1])), table

  def __call__(self, inputs, users, side, train: bool = False):
    """(states [B, T, H], table [R, H]) as the backbone's, SLIM-fused."""
    if self.backbone is None:
      return self.agnostic(inputs, users, side, train)
    states, table = self.backbone(inputs, train=train)
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
