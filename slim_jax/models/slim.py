"""SLIM's recommenders (arXiv 2403.04260, §2.3): a backbone fused with item text and the user's
rationale (ID-based), the rationale matched against item texts (ID-agnostic), and the baselines
of the paper's tables.

Rationale and item-text vectors are *side inputs*, not parameters: a dict of arrays passed to
every call beside the item sequence (`data/side_inputs.py` builds it per mode), so the encoder
that made them, the controls and the schedule that says which rationale a row reads are all
swapped without touching the model. A mode's side holds only what it reads (`item_text` has no
rationale key):

  side = {"rationale": float[U, S, D], "rationale_cutoff": int32[U, S], "item_text": float[R, D]}
  (+ "rationale_ids": int32[U, S, T], "rationale_lengths": int32[U, S] to fine-tune the encoder;
   "popularity": float[R] alone for the popularity ranking)

Each user has S rationale slots, ascending by cut-off: slot s was written from seq[:cutoff]
(NEVER where the user has none). A row reads, per column, the latest slot whose history ends at
or before the column's target, so no row reads a rationale written from a history that holds its
target (`rationale_slot`); the paper's schedule is one slot of cut-off 0 that every row reads.

`SLIM.__call__(inputs, users, side, train, columns, positions)` and `SLIM.predict(inputs, users,
side, positions)` keep the backbone interface (`models/backbone.py`) with the users of the rows
and the position of the last column's target added; in mode "plain" they are exactly the
backbone's, so one trainer serves every variant. The fused modes score against the fused item
table; with `slim.item_text_input` the backbone also embeds its input items with it (its
`table_fn`), else with its own item_emb.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slim_jax import checks
from slim_jax.models import bert
from slim_jax.models.backbone import Backbone, last_column

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
ITEM_SIDE_MODES = ("item_text", "item_text_permuted")  # item text fused, nothing on the user side
# Both sides fused: the user side reads a rationale, or (history_text) its history's item text.
ID_BASED_MODES = ("id_based", "shuffled", "teacher_rationales", "constant_rationale",
                  "history_text")
FUSED_MODES = (*ITEM_SIDE_MODES, *ID_BASED_MODES)  # the item side fused with item text
RATIONALE_MODES = ("id_based", "shuffled", "teacher_rationales", "constant_rationale",
                   "id_agnostic", "zero_shot")  # read the student's (or teacher's) rationales


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

  def rationale_slots(self, users, side) -> jax.Array:
    """[B, S, D] every rationale slot of `users` (rows < 0 are padding)."""
    safe = jnp.maximum(users, 0)
    if self.encoder is None:
      return side["rationale"][safe]
    ids = side["rationale_ids"][safe]  # [B, S, T]
    lengths = side["rationale_lengths"][safe]
    flat = ids.reshape(-1, ids.shape[-1])
    mask = (jnp.arange(flat.shape[1]) < lengths.reshape(-1)[:, None]).astype(jnp.int32)
    vectors = bert.pool(self.rationale_encoder(flat, mask), mask, self.pooling)
    return vectors.reshape(*ids.shape[:2], -1)

  def user_text(self, inputs, users, side, train: bool, columns, positions, project):
    """[B, T, ·] the text each column's user side reads, a zero vector where it reads none,
    then `project`ed (text_proj, or identity): under the causal schedule the latest rationale
    written from a history that ends before the column's target (`rationale_slot`), and for
    history_text the summary of the inputs up to the column (`history_summary`)."""
    if self.mode == "history_text" and self.cfg.rationale_schedule == "causal":
      vectors, keep = history_summary(inputs, side["item_text"], self.num_items,
                                      self.cfg.history_text_items)
      vectors = jnp.take_along_axis(vectors, columns[..., None], 1)
      keep = jnp.take_along_axis(keep, columns, 1)
    else:
      slot, keep = rationale_slot(side["rationale_cutoff"][jnp.maximum(users, 0)],
                                  target_positions(inputs, columns, positions))
      vectors = jnp.take_along_axis(self.rationale_slots(users, side),
                                    jnp.maximum(slot, 0)[..., None], 1)
    keep = keep & (users >= 0)[:, None]
    if train and self.cfg.rationale_dropout:
      keep = keep & ~jax.random.bernoulli(self.make_rng("dropout"), self.cfg.rationale_dropout,
                                          keep.shape)
    return project(jnp.where(keep[..., None], vectors, 0.0))

  def fuse(self, text, ids) -> jax.Array:
    """g_f([text; ids]): projected text [..., H] (broadcast to ids' shape) with ID-side vectors."""
    return self.fuse_proj(jnp.concatenate([jnp.broadcast_to(text, ids.shape), ids], -1))

  def fuse_user(self, states, text) -> jax.Array:
    """States [B, T, H] fused with the projected text [B, T, H] by `cfg.fusion`."""
    if self.cfg.fusion == "paper":
      return self.fuse(text, states)
    if self.cfg.fusion == "add":
      return states + text
    both = jnp.concatenate([text, states], -1)
    if self.cfg.fusion == "concat":
      return self.user_fuse_proj(both)
    gate = jax.nn.sigmoid(self.gate_proj(both))
    return gate * states + (1.0 - gate) * text

  def backbone_free(self, inputs, users, side, train: bool, columns, positions):
    """(states [B, T, D], table [R, D]) of the rankers without a backbone."""
    if self.mode == "popularity":
      return jnp.ones((*columns.shape, 1)), side["popularity"][:, None]
    if self.mode == "zero_shot":
      return (self.user_text(inputs, users, side, train, columns, positions, lambda x: x),
              side["item_text"])
    return (self.user_text(inputs, users, side, train, columns, positions, self.text_proj),
            self.text_proj(side["item_text"]))

  def __call__(self, inputs, users, side, train: bool = False, columns=None, positions=None):
    """(states [B, T, H], table [R, H]) as the backbone's, SLIM-fused, for the `columns` asked
    for (default: every input column); `positions` int32[B] is the position of the last
    column's target in its user's sequence (default: past every rationale's history)."""
    if self.backbone is None:
      return self.backbone_free(inputs, users, side, train, newest_columns(inputs, columns),
                                positions)
    states, table = self.backbone(inputs, train=train, columns=columns,
                                  table_fn=self.input_table_fn(side))
    # A backbone asked for no columns gives its newest ones (all of them, or SRGNN's last).
    columns = newest_columns(inputs, columns, states.shape[1])
    return self.combine(inputs, states, table, users, side, train, columns, positions)

  def predict(self, inputs, users, side, positions=None):
    """(state [B, H], table) predicting the item after the last column, at `positions`."""
    columns = last_column(inputs)
    if self.backbone is None:
      states, table = self.backbone_free(inputs, users, side, False, columns, positions)
    else:
      state, table = self.backbone.predict(inputs, self.input_table_fn(side))
      states, table = self.combine(inputs, state[:, None], table, users, side, False, columns,
                                   positions)
    return states[:, 0], table

  @property
  def text_input(self) -> bool:
    """Whether the backbone embeds its input items with the fused item table
    (`slim.item_text_input`, in the fused modes), rather than its raw item_emb."""
    return self.cfg.item_text_input and self.mode in FUSED_MODES

  def item_table(self, side, table) -> jax.Array:
    """[R, H] the fused item table z_i = g_f([g_l(z_text_i); z_id_i]) of the ID table [R, H]
    (item_text is zero-padded to R rows, so the rows past the items are fused too)."""
    return self.fuse(self.text_proj(side["item_text"]), table)

  def input_table_fn(self, side):
    """The backbone's `table_fn`: the item-side fusion when the fused table also feeds the
    backbone's inputs (`text_input`), else None (the inputs read item_emb as it is)."""
    return (lambda table: self.item_table(side, table)) if self.text_input else None

  def combine(self, inputs, states, table, users, side, train: bool, columns, positions):
    """(states, table) of the backbone, SLIM-fused: the table by `item_table` (unless the
    backbone already used and returned the fused one, `text_input`), the states on the user
    side in the ID-based modes."""
    if self.mode == "plain":
      return states, table
    if not self.text_input:
      table = self.item_table(side, table)
    if self.mode in ITEM_SIDE_MODES:
      return states, table
    text = self.user_text(inputs, users, side, train, columns, positions, self.text_proj)
    return self.fuse_user(states, text), table


# The cut-off of a rationale slot no row reads (a user without that rationale).
NEVER = np.iinfo(np.int32).max


def newest_columns(inputs, columns=None, count: int | None = None) -> jax.Array:
  """int32[B, T]: `columns`, or else the newest `count` (default: every) input columns."""
  if columns is not None:
    return columns
  length = inputs.shape[1]
  return jnp.broadcast_to(jnp.arange(length - (count or length), length), (inputs.shape[0],
                                                                           count or length))


def target_positions(inputs, columns, positions) -> jax.Array:
  """int32[B, T]: the position in its user's sequence of each column's target, from the last
  column's (`positions` [B]; None: later than any history)."""
  if positions is None:
    return jnp.full(columns.shape, NEVER - 1, jnp.int32)
  return positions[:, None] - (inputs.shape[1] - 1 - columns)


def rationale_slot(cutoffs, targets) -> tuple[jax.Array, jax.Array]:
  """(slot int32[B, T], whether there is one bool[B, T]): of each user's rationale slots
  (cut-offs int32[B, S]: the slot's history is seq[:cutoff]; NEVER: absent), the latest whose
  history ends at or before the target position, i.e. holds none of seq[target:]; of equal
  cut-offs the later slot."""
  eligible = cutoffs[:, None, :] <= targets[..., None]
  order = jnp.where(eligible, cutoffs[:, None, :].astype(jnp.float32) * cutoffs.shape[1]
                    + jnp.arange(cutoffs.shape[1]), -1.0)
  return jnp.argmax(order, -1).astype(jnp.int32), eligible.any(-1)


def history_summary(inputs, item_text, num_items: int, items: int) -> tuple[jax.Array, ...]:
  """([B, L, D] per column, the L2-normalised mean item-text vector of its last `items` inputs
  up to and including it, i.e. of the items before its target; bool[B, L] whether it has any).

  Causal by construction: column j reads inputs[:, j - items + 1 : j + 1] only. Window sums are
  differences of running sums, so the whole table costs two cumulative sums."""
  real = ((inputs > 0) & (inputs <= num_items)).astype(item_text.dtype)
  sums = jnp.cumsum(item_text[inputs] * real[..., None], 1)
  counts = jnp.cumsum(real, 1)
  if items < inputs.shape[1]:
    shift = lambda x: jnp.pad(x, [(0, 0), (items, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-items]
    sums, counts = sums - shift(sums), counts - shift(counts)
  mean = sums / jnp.maximum(counts, 1.0)[..., None]
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, 1e-12), counts > 0
