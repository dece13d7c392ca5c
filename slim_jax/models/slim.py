"""SLIM's recommenders (arXiv 2403.04260, §2.3): a backbone fused with item text and the user's
rationale (ID-based), the rationale matched against item texts (ID-agnostic), and the baselines
of the paper's tables.

Rationale and item-text vectors are *side inputs*, not parameters: a dict of arrays passed to
every call beside the item sequence (`data/side_inputs.py` builds it per mode), so the encoder
that made them, the shuffled and teacher controls and the split they come from are all swapped
without touching the model. A mode's side holds only what it reads (`item_text` has no
rationale key):

  side = {"rationale": float[U, D], "has_rationale": bool[U], "item_text": float[R, D]}
  (+ "rationale_ids": int32[U, T], "rationale_lengths": int32[U] to fine-tune the encoder;
   "popularity": float[R] alone for the popularity ranking)

`SLIM.__call__(inputs, users, side, train)` and `SLIM.predict(inputs, users, side)` keep the
backbone interface (`models/backbone.py`) with the users of the rows added; in mode "plain"
they are exactly the backbone's, so one trainer serves every variant.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax import checks
from slim_jax.models import bert
from slim_jax.models.backbone import Backbone

# The variants of the paper's Tables 1-2, by the names every table, JSON file and plot uses.
MODES = {
    "plain": "the backbone alone",
    "item_text": "backbone+: the backbone with item text fused on the item side, no rationale",
    "item_text_permuted": "item_text with the item texts permuted among items (a derangement): "
                          "the text or the extra map?",
    "id_based": "SLIM ID-based: rationale fused on the user side, item text on the item side",
    "shuffled": "id_based with every user reading another user's rationale (a derangement)",
    "constant_rationale": "id_based where every user reads one and the same rationale (the mean "
                          "rationale vector): the fusion layer or the content?",
    "history_text": "id_based whose user side reads, per row, the mean item-text vector of the "
                    "last slim.history_text_items items before the row's target: no LLM",
    "teacher_rationales": "id_based where each user with a teacher rationale reads the teacher's",
    "id_agnostic": "one shared linear map of rationale and item-text vectors, dot product, no "
                   "item IDs",
    "zero_shot": "dot product (cosine) of the raw rationale and item-text vectors, nothing trained",
    "popularity": "items by training popularity, the same list for every user",
}
BACKBONE_FREE_MODES = ("id_agnostic", "zero_shot", "popularity")  # no backbone, no item IDs
UNTRAINED_MODES = ("zero_shot", "popularity")  # ranked as they are
TEXT_FREE_MODES = ("plain", "popularity")  # read no encoded vectors
ID_BASED_MODES = ("id_based", "shuffled", "teacher_rationales")  # both sides fused
FUSED_MODES = ("item_text", *ID_BASED_MODES)  # the item side fused with item text
RATIONALE_MODES = (*ID_BASED_MODES, "id_agnostic", "zero_shot")


def variant_name(backbone: str, mode: str) -> str:
  """A trained variant's name in directories and tables: "sasrec_id_based", or "id_agnostic"
  for a mode without a backbone."""
  return mode if mode in BACKBONE_FREE_MODES else f"{backbone}_{mode}"


# The user side of the ID-based modes: paper = g_f([g_l(s_text); s_seq]) with the item side's
# g_l and g_f; concat = the same with a user-side g_f of its own; add = s_seq + g_l(s_text);
# gate = a learned sigmoid mix of the two. The item side is the paper's in every fusion.
FUSIONS = ("paper", "add", "concat", "gate")
SCHEDULES = ("causal", "paper")


@dataclasses.dataclass(frozen=True)
class SlimConfig:
  """How rationale and item-text vectors enter the recommender (the `slim` config section)."""
  modes: tuple[str, ...] = tuple(MODES)  # the train stage's
  fusion: str = "paper"  # the ID-based modes' user side: one of FUSIONS
  rationale_dropout: float = 0.0  # share of training rows whose rationale is zeroed
  # Encoder ablation (b): the MiniLM runs inside the recommender's step on each row's rationale
  # tokens and trains with it, instead of reading frozen vectors (item texts stay frozen).
  finetune_encoder: bool = False
  seed: int = 0  # of the derangements (shuffled, item_text_permuted), mixed with rec.seed
  # Which rationale a training row reads (SCHEDULES): causal, the latest one written from a
  # history that ends before the row's target; paper, the one written from seq[:-2] for every
  # training row, whose history holds the row's own target (the leak the paper's reading has).
  rationale_schedule: str = "causal"
  history_text_items: int = 10  # history_text: the items before a row's target it averages
  item_text_input: bool = False  # the fused item vectors also feed the sequence encoder's input

  def checked(self) -> SlimConfig:
    for mode in self.modes:
      checks.one_of("slim.modes", mode, MODES)
    checks.one_of("slim.fusion", self.fusion, FUSIONS)
    checks.one_of("slim.rationale_schedule", self.rationale_schedule, SCHEDULES)
    checks.within(self, "slim", "[0, 1)", "rationale_dropout")
    checks.within(self, "slim", "[1, inf)", "history_text_items")
    return self


class SLIM(nn.Module):
  """A backbone in one of the MODES; the BACKBONE_FREE_MODES have none. With an `encoder` (a
  BERT config: `slim.finetune_encoder`) rationale vectors are computed from token ids by its
  trainable copy, params/rationale_encoder, initialised from the checkpoint by the trainer.

  The paper's linear maps: `text_proj` is g_l (text -> hidden) in the fused modes and g_t in
  id_agnostic; `fuse_proj` is g_f ([text; ids] -> hidden). The fused modes share g_l and g_f
  between the item and the user side, the literal reading of §2.3, which writes the same symbols
  on both sides: user states and items then live in one space by construction
  (`slim.fusion=concat` gives the user side a g_f of its own).
  """
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
    if self.mode in FUSED_MODES or self.mode == "id_agnostic":
      self.text_proj = nn.Dense(self.hidden)
    if self.mode in FUSED_MODES:
      self.fuse_proj = nn.Dense(self.hidden)
    if self.mode in ID_BASED_MODES and self.cfg.fusion == "concat":
      self.user_fuse_proj = nn.Dense(self.hidden)
    if self.mode in ID_BASED_MODES and self.cfg.fusion == "gate":
      self.gate_proj = nn.Dense(self.hidden)

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

  def fuse(self, text, ids) -> jax.Array:
    """g_f([text; ids]): projected text [..., H] (broadcast to ids' shape) with ID-side vectors."""
    return self.fuse_proj(jnp.concatenate([jnp.broadcast_to(text, ids.shape), ids], -1))

  def fuse_user(self, states, text) -> jax.Array:
    """States [B, T, H] fused with the projected rationale [B, H] by `cfg.fusion`."""
    text = jnp.broadcast_to(text[:, None], states.shape)
    if self.cfg.fusion == "paper":
      return self.fuse(text, states)
    if self.cfg.fusion == "add":
      return states + text
    both = jnp.concatenate([text, states], -1)
    if self.cfg.fusion == "concat":
      return self.user_fuse_proj(both)
    gate = jax.nn.sigmoid(self.gate_proj(both))
    return gate * states + (1.0 - gate) * text

  def backbone_free(self, users, side, train: bool):
    """(state [B, D], table [R, D]) of the rankers without a backbone."""
    if self.mode == "popularity":
      return jnp.ones((users.shape[0], 1)), side["popularity"][:, None]
    rationale = self.rationale(users, side, train)
    if self.mode == "zero_shot":
      return rationale, side["item_text"]
    return self.text_proj(rationale), self.text_proj(side["item_text"])

  def __call__(self, inputs, users, side, train: bool = False, columns=None):
    """(states [B, T, H], table [R, H]) as the backbone's, SLIM-fused; the backbone-free modes
    broadcast their one state over the columns asked for (default: every input column)."""
    if self.backbone is None:
      state, table = self.backbone_free(users, side, train)
      shape = inputs.shape if columns is None else columns.shape
      return jnp.broadcast_to(state[:, None], (*shape, state.shape[-1])), table
    states, table = self.backbone(inputs, train=train, columns=columns)
    return self.combine(states, table, users, side, train)

  def predict(self, inputs, users, side):
    """(state [B, H], table) predicting the item after the last column."""
    if self.backbone is None:
      return self.backbone_free(users, side, False)
    state, table = self.backbone.predict(inputs)
    states, table = self.combine(state[:, None], table, users, side, False)
    return states[:, 0], table

  def combine(self, states, table, users, side, train: bool):
    if self.mode == "plain":
      return states, table
    table = self.fuse(self.text_proj(side["item_text"]), table)
    if self.mode == "item_text":
      return states, table
    return self.fuse_user(states, self.text_proj(self.rationale(users, side, train))), table
