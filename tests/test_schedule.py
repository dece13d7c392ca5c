"""Which text a row reads: the causal schedule (no rationale written from a history that holds
the row's target), the paper's schedule as it was, history_text, the controls and the negatives
of the sampled protocol."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from slim_jax import encode, parallel, prompts, report
from slim_jax.data.formats import ItemMeta
from slim_jax.data import loader
from slim_jax.data.side_inputs import side_inputs
from slim_jax.models import slim
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import NEVER, SlimConfig
from slim_jax.train import recommend
from tests.fixtures import prepared_from_sequences

SPLITS = ("cut0.5", "cut0.75", "valid", "test")
CFG = RecConfig(backbone="sasrec", hidden=16, max_len=6, inner=32).resolved()
GOLDEN = "tests/golden/paper_schedule.npz"


def distinct_prepared(users: int = 12, items: int = 40, seed: int = 0):
  """Users whose items are all distinct, so an item's position in its user's sequence is known."""
  rng = np.random.default_rng(seed)
  seqs = [rng.permutation(items)[:rng.integers(3, 20)] + 1 for _ in range(users)]
  return prepared_from_sequences(seqs, items)


def labelled_rationales(prepared, absent=((3, "cut0.75"), (5, "test"), (7, "cut0.5"))):
  """Rationale vectors that say whose they are and the end of their history: [user, end, 1]."""
  lengths = np.diff(prepared.seq_offsets)
  rationales = {}
  for split in SPLITS:
    ends = np.array([prompts.history_end(split, n) for n in lengths])
    vectors = np.stack([np.arange(prepared.num_users), ends, np.ones_like(ends)], 1)
    present = ends >= 1
    for user, missing in absent:
      present[user] &= missing != split
    rationales[split] = vectors.astype(np.float32), present
  item_text = np.random.default_rng(1).normal(size=(prepared.num_items + 1, 3)).astype(np.float32)
  item_text[0] = 0.0
  return encode.Encoded(item_text, rationales)


def build(mode: str, prepared, encoded, **slim_fields):
  slim_cfg = SlimConfig(**slim_fields)
  model = recommend.build_model(CFG, prepared.num_items, mode=mode, slim=slim_cfg)
  sides = jax.tree.map(jnp.asarray, side_inputs(encoded, prepared, model.rows, slim_cfg, mode))
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.max_len), jnp.int32),
                      jnp.zeros((1,), jnp.int32), sides["train"])
  return model, params, sides


def read(model, params, side, batch, columns=None):
  """[B, T, D] the raw vectors each column of `batch` reads (identity projection)."""
  inputs = jnp.asarray(batch["inputs"])
  columns = slim.newest_columns(inputs, columns)
  return np.asarray(model.apply(params, inputs, jnp.asarray(batch["users"]), side, False, columns,
                                jnp.asarray(batch["positions"]), lambda x: x,
                                method="user_text"))


def training_batches(prepared):
  """Every training row once, as windows (overlapping: stride 4 of 6) and as prefixes."""
  train = loader.training_part(prepared)
  rows, ends = loader.per_position_examples(train, 4)
  windows = loader.per_position_batch(train, rows, ends, CFG.max_len, 4)
  rows, targets = loader.last_position_examples(train)
  prefixes = loader.last_position_batch(train, rows, targets, CFG.max_len)
  prefixes["targets"] = prefixes["targets"][:, None]
  return windows, prefixes


def position_of(prepared, user: int, item: int) -> int:
  return int(np.flatnonzero(prepared.sequence(user) == item)[0])


class CausalScheduleTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.prepared = distinct_prepared()
    cls.encoded = labelled_rationales(cls.prepared)

  def latest_before(self, user: int, target: int) -> float | None:
    """The end of the latest present rationale whose history ends at or before `target`."""
    ends = [vectors[user, 1] for vectors, present in self.encoded.rationales.values()
            if present[user] and vectors[user, 1] <= target]
    return max(ends) if ends else None

  def test_every_training_row_reads_a_rationale_written_before_its_target(self):
    model, params, sides = build("id_based", self.prepared, self.encoded)
    checked = before_any = 0
    for batch in training_batches(self.prepared):
      columns = np.broadcast_to(np.arange(batch["inputs"].shape[1] - batch["targets"].shape[1],
                                          batch["inputs"].shape[1]), batch["targets"].shape)
      vectors = read(model, params, sides["train"], batch, jnp.asarray(columns))
      for b, user in enumerate(batch["users"]):
        for t, item in enumerate(batch["targets"][b]):
          if item == 0:
            continue
          target = position_of(self.prepared, user, item)
          expected = self.latest_before(user, target)
          if expected is None:  # before the first cut-off: reads nothing
            np.testing.assert_array_equal(vectors[b, t], 0.0)
            before_any += 1
          else:
            self.assertEqual(vectors[b, t, 0], user)
            self.assertLessEqual(vectors[b, t, 1], target)  # its history ends before the target
            self.assertEqual(vectors[b, t, 1], expected)  # and it is the latest such
          checked += 1
    self.assertGreater(checked, 200)
    self.assertGreater(before_any, 10)

  def test_evaluation_rows_read_the_rationale_of_their_own_history(self):
    model, params, sides = build("id_based", self.prepared, self.encoded)
    lengths = np.diff(self.prepared.seq_offsets)
    for split, offset in (("valid", 2), ("test", 1)):
      batch = next(loader.next_item_eval(self.prepared, split, max_len=CFG.max_len,
                                         batch_size=16, mesh=None))
      vectors = read(model, params, sides[split], batch,
                     jnp.full((16, 1), CFG.max_len - 1))[:, 0]  # the predicting column
      for row, user in enumerate(batch["users"][batch["valid"]]):
        expected = lengths[user] - offset if (user, split) != (5, "test") else lengths[user] - 2
        self.assertEqual(vectors[row, 1], expected)  # user 5 has no test rationale: its valid one

  def test_the_paper_schedule_reads_the_valid_rationale_in_every_training_row(self):
    """The leak this schedule keeps: the rationale's history holds the row's target."""
    model, params, sides = build("id_based", self.prepared, self.encoded,
                                 rationale_schedule="paper")
    windows, _ = training_batches(self.prepared)
    vectors = read(model, params, sides["train"], windows)
    lengths = np.diff(self.prepared.seq_offsets)
    owned = windows["targets"] > 0
    ends = np.broadcast_to(lengths[windows["users"]][:, None] - 2, owned.shape)
    np.testing.assert_array_equal(vectors[..., 1][owned], ends[owned])

  def test_shuffled_and_constant_keep_who_reads_and_when(self):
    _, _, own = build("id_based", self.prepared, self.encoded)
    for mode in ("shuffled", "constant_rationale"):
      _, _, sides = build(mode, self.prepared, self.encoded)
      np.testing.assert_array_equal(sides["train"]["rationale_cutoff"],
                                    own["train"]["rationale_cutoff"])
    present = np.asarray(own["train"]["rationale_cutoff"]) != NEVER
    _, _, constant = build("constant_rationale", self.prepared, self.encoded)
    vectors = np.asarray(constant["train"]["rationale"])[present]
    np.testing.assert_allclose(vectors, np.broadcast_to(vectors[0], vectors.shape))
    np.testing.assert_allclose(vectors[0], np.asarray(own["train"]["rationale"])[present].mean(0),
                               rtol=1e-6)
    _, _, shuffled = build("shuffled", self.prepared, self.encoded)
    owners = np.asarray(shuffled["train"]["rationale"])[..., 0]  # whose rationale each slot holds
    users = np.arange(self.prepared.num_users)[:, None]
    self.assertFalse((owners == users)[present].any())

  def test_a_cutoff_with_no_history_is_skipped_and_counted(self):
    prepared = prepared_from_sequences([np.array([1, 2, 3]), np.array([1, 2, 3, 4, 5, 6])], 6)
    splits = prompts.history_splits(prompts.PromptConfig())
    histories = list(prompts.visible_histories(prepared, splits))
    # user 0: training prefix [1] -> cut-offs at int(0.5) = int(0.75) = 0 items: skipped
    self.assertNotIn((0, "cut0.5"), [(u, s) for u, s, _ in histories])
    self.assertEqual(prompts.skipped_histories(prepared, splits), 2)
    ends = {(u, s): len(items) for u, s, items in histories}
    self.assertEqual(ends[1, "cut0.5"], 2)
    self.assertEqual(ends[1, "cut0.75"], 3)
    self.assertEqual(ends[1, "valid"], 4)
    self.assertEqual(ends[1, "test"], 5)
    self.assertEqual(prompts.history_splits(prompts.PromptConfig(), "teacher"), ("valid",))


class LeakAuditTest(absltest.TestCase):

  def test_the_paper_schedule_reads_rationales_naming_the_target_and_causal_never(self):
    """Rationales that name every item of their own history: under the paper's schedule every
    training row's target is among them, under the causal schedule none is."""
    prepared = distinct_prepared()
    prepared = dataclasses.replace(prepared, item_meta=tuple(
        ItemMeta(title=f"Film {i}, The" if i else "") for i in range(prepared.num_items + 1)))
    encoded = labelled_rationales(prepared, absent=((3, "valid"), (7, "cut0.5")))
    texts = {}
    for split in SPLITS:
      for user in range(prepared.num_users):
        sequence = prepared.sequence(user)
        end = prompts.history_end(split, len(sequence))
        texts[user, split] = "Next: " + ", ".join(f"the film {i}" for i in sequence[:end])
    audit = {row["schedule"]: row for row in report.leak_audit(prepared, encoded, texts)}
    lengths = np.diff(prepared.seq_offsets)
    rows = int(np.maximum(lengths - 3, 0).sum())
    self.assertEqual(audit["paper"]["training_rows"], rows)
    self.assertEqual(audit["paper"]["reading"], rows - max(lengths[3] - 3, 0))  # 3 has none
    self.assertEqual(audit["paper"]["naming_target"], audit["paper"]["reading"])
    self.assertBetween(audit["causal"]["reading"], 1, rows - 1)
    self.assertEqual(audit["causal"]["naming_target"], 0)


class PaperScheduleTest(absltest.TestCase):
  """slim.rationale_schedule=paper trains exactly as every training row read the seq[:-2]
  rationale before the causal schedule existed: test ranks equal to ones saved then."""

  def test_reproduces_the_ranks_before_the_causal_schedule(self):
    rng = np.random.default_rng(0)
    num_items, num_users, genres = 80, 48, 4
    item_genre = np.arange(num_items) % genres
    user_genre = rng.integers(0, genres, num_users)
    seqs = [rng.choice(np.flatnonzero(item_genre == g), int(rng.integers(6, 16)), replace=False)
            + 1 for g in user_genre]
    prepared = prepared_from_sequences(seqs, num_items)
    item_vectors = rng.normal(size=(num_items + 1, 8)).astype(np.float32)
    item_vectors[0] = 0
    valid = rng.normal(size=(num_users, 8)).astype(np.float32)
    test = rng.normal(size=(num_users, 8)).astype(np.float32)
    present = rng.random(num_users) < 0.8
    encoded = encode.Encoded(item_vectors, {"valid": (valid, present), "test": (test, present)})
    golden = np.load(GOLDEN)
    negatives = {}
    for backbone in ("sasrec", "gru4rec"):
      cfg = RecConfig(backbone=backbone, hidden=16, max_len=10, gru_hidden=16, inner=32,
                      batch=16, eval_batch=64, lr=1e-2, epochs=2, eval_every=1,
                      sampled_negatives=20)
      out = self.create_tempdir().full_path
      recommend.train_recommender(cfg, prepared, out, parallel.make_mesh({"data": -1}),
                                  "id_based", SlimConfig(rationale_schedule="paper"), encoded)
      ranked = np.load(f"{out}/ranked_test.npz")
      np.testing.assert_array_equal(ranked["ranks"], golden[f"{backbone}_ranks"])
      negatives[backbone] = ranked["negatives"]
    # The protocol's negatives: items the user never interacted with, the same for every model
    # of a seed.
    np.testing.assert_array_equal(negatives["sasrec"], negatives["gru4rec"])
    for user, drawn in enumerate(negatives["sasrec"]):
      self.assertEqual(len(set(drawn)), 20)
      self.assertEmpty(set(drawn) & set(prepared.sequence(user).tolist()))
      self.assertNotIn(0, drawn)


class HistoryTextTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.prepared = distinct_prepared()
    self.encoded = labelled_rationales(self.prepared)

  def test_a_column_reads_the_items_before_its_target_only(self):
    model, params, sides = build("history_text", self.prepared, self.encoded,
                                 history_text_items=3)
    self.assertEqual(set(sides["train"]), {"item_text"})  # nothing stored, computed in the step
    inputs = np.array([[0, 5, 9, 2, 7, 11]], np.int32)
    batch = {"inputs": inputs, "users": np.array([0]), "positions": np.array([9])}
    before = read(model, params, sides["train"], batch)[0]
    table = self.encoded.item_vectors
    for column in range(1, 6):
      mean = table[inputs[0, max(column - 2, 1):column + 1]].mean(0)
      np.testing.assert_allclose(before[column], mean / np.linalg.norm(mean), rtol=1e-5)
    np.testing.assert_array_equal(before[0], 0.0)  # padding only: reads none
    for changed in range(1, 6):
      other = dict(batch, inputs=inputs.copy())
      other["inputs"][0, changed] = 30
      after = read(model, params, sides["train"], other)[0]
      for column in range(1, 6):
        moved = not np.allclose(before[column], after[column])
        # column j's history is inputs[..j] (its last 3); its target and later items are not in it
        self.assertEqual(moved, column - 3 < changed <= column, (changed, column))

  def test_the_paper_schedule_reads_one_summary_per_user(self):
    model, params, sides = build("history_text", self.prepared, self.encoded,
                                 rationale_schedule="paper")
    windows, _ = training_batches(self.prepared)
    vectors = read(model, params, sides["train"], windows)
    owned = windows["targets"] > 0
    for user in np.unique(windows["users"]):
      rows = vectors[windows["users"] == user][owned[windows["users"] == user]]
      np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape))
      last = self.prepared.split("valid").history(user)[-10:]  # seq[:-2]: holds the targets
      mean = self.encoded.item_vectors[last].mean(0)
      np.testing.assert_allclose(rows[0], mean / np.linalg.norm(mean), rtol=1e-5)

  @parameterized.product(backbone=("sasrec", "gru4rec", "srgnn", "bert4rec"),
                         schedule=slim.SCHEDULES)
  def test_shapes(self, backbone, schedule):
    cfg = RecConfig(backbone=backbone, hidden=16, max_len=6, inner=32).resolved()
    slim_cfg = SlimConfig(rationale_schedule=schedule)
    model = recommend.build_model(cfg, self.prepared.num_items, mode="history_text",
                                  slim=slim_cfg)
    side = jax.tree.map(jnp.asarray, side_inputs(self.encoded, self.prepared, model.rows,
                                                 slim_cfg, "history_text")["train"])
    inputs = jnp.array([[0, 0, 3, 7, 4, 9], [4, 5, 6, 7, 8, 9]], jnp.int32)
    users, positions = jnp.array([0, 1]), jnp.array([6, 8])
    params = model.init(jax.random.key(0), inputs, users, side)
    states, table = model.apply(params, inputs, users, side, positions=positions)
    self.assertEqual(states.shape, (2, 1 if backbone == "srgnn" else 6, 16))
    state, _ = model.apply(params, inputs, users, side, positions, method="predict")
    self.assertEqual(state.shape, (2, 16))
    self.assertTrue(np.isfinite(np.asarray(state)).all())

  def test_items_below_one_fail_at_start_up(self):
    with self.assertRaisesRegex(ValueError, r"slim.history_text_items.*\[1, inf\)"):
      SlimConfig(history_text_items=0).checked()


class ItemTextPermutedTest(absltest.TestCase):

  def test_every_item_reads_another_items_text_and_each_seed_its_own_shuffle(self):
    prepared = distinct_prepared()
    encoded = labelled_rationales(prepared)
    permuted = {seed: side_inputs(encoded, prepared, 48, SlimConfig(), "item_text_permuted",
                                  seed)["train"]["item_text"] for seed in (0, 1)}
    table = encoded.item_vectors
    rows = {seed: [int(np.flatnonzero((table == row).all(1))[0]) for row in p[1:41]]
            for seed, p in permuted.items()}
    for seed in (0, 1):
      self.assertCountEqual(rows[seed], range(1, 41))  # a permutation of the items' texts
      self.assertFalse((np.array(rows[seed]) == np.arange(1, 41)).any())  # with no fixed point
      np.testing.assert_array_equal(permuted[seed][0], 0.0)
      np.testing.assert_array_equal(permuted[seed][41:], 0.0)
    self.assertNotEqual(rows[0], rows[1])


if __name__ == "__main__":
  absltest.main()
