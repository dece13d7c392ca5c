"""Preprocessing: k-core, ids, chronological order, leave-one-out split, item text, artifacts."""

import pathlib

from absl.testing import absltest
import numpy as np

from slim_jax import assets
from slim_jax.data import formats, preprocess
from slim_jax.data.formats import ItemMeta, RawDataset
from slim_jax.data.preprocess import DataConfig


def _raw(rows, item_meta=None, name="toy", ratings=None) -> RawDataset:
  """RawDataset from (user, item, timestamp) rows in file order."""
  users, items, times = zip(*rows)
  return RawDataset(
      name=name, users=np.asarray(users, dtype=str), items=np.asarray(items, dtype=str),
      timestamps=np.asarray(times, np.float64),
      ratings=np.full(len(rows), np.nan, np.float32) if ratings is None else np.float32(ratings),
      item_meta=item_meta or {}, report={"skipped_lines": 2, "items_without_meta": 0})


def _random_raw(seed=0, num_users=20, num_items=30) -> RawDataset:
  """Users with 3..15 distinct items each, at distinct random times, rows shuffled."""
  rng = np.random.default_rng(seed)
  rows = [(f"u{u}", f"i{i}", float(t))
          for u in range(num_users)
          for i, t in zip(rng.choice(num_items, rng.integers(3, 16), replace=False),
                          rng.permutation(10**6)[:15])]
  return _raw([rows[k] for k in rng.permutation(len(rows))])


class KCoreTest(absltest.TestCase):

  def test_iterates_to_fixed_point(self):
    # u3 has one interaction; dropping it leaves i2 with one, dropping i2 leaves u2 with one.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]
    users, items = (np.array(column) for column in zip(*pairs))
    keep = preprocess.k_core(users, items, user_core=2, item_core=2)
    np.testing.assert_array_equal(keep, [True] * 4 + [False] * 3)
    self.assertTrue(preprocess.k_core(users, items, 0, 0).all())
    self.assertFalse(preprocess.k_core(users, items, 3, 0).any())

  def test_result_satisfies_both_thresholds(self):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 600), rng.zipf(1.5, 600) % 50
    keep = preprocess.k_core(users, items, user_core=5, item_core=4)
    self.assertGreater(keep.sum(), 0)
    self.assertGreaterEqual(np.bincount(users[keep])[np.unique(users[keep])].min(), 5)
    self.assertGreaterEqual(np.bincount(items[keep])[np.unique(items[keep])].min(), 4)


class PrepareTest(absltest.TestCase):

  def test_ids_follow_first_appearance_and_item_zero_is_padding(self):
    rows = [("b", "x", 3), ("a", "y", 1), ("b", "z", 1), ("a", "x", 2), ("b", "y", 2),
            ("a", "z", 3)]
    prepared = preprocess.prepare(_raw(rows), DataConfig())
    self.assertEqual(prepared.user_ids.tolist(), ["b", "a"])
    self.assertEqual(prepared.item_ids.tolist(), ["", "x", "y", "z"])
    self.assertEqual((prepared.num_users, prepared.num_items), (2, 3))
    np.testing.assert_array_equal(prepared.sequence(0), [3, 2, 1])  # b: z@1 y@2 x@3
    np.testing.assert_array_equal(prepared.sequence(1), [2, 1, 3])
    self.assertEqual(prepared.seq_items.dtype, np.int32)
    self.assertEqual(prepared.seq_offsets.dtype, np.int64)

  def test_short_users_min_rating_and_core(self):
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "w", 4),
            ("b", "x", 1), ("b", "y", 2),  # too short for leave-one-out
            ("c", "x", 1), ("c", "y", 2), ("c", "z", 3)]
    ratings = [5, 5, 5, 1, 5, 5, 5, 5, 5]
    prepared = preprocess.prepare(_raw(rows, ratings=ratings), DataConfig(min_rating=4))
    self.assertEqual(prepared.user_ids.tolist(), ["a", "c"])
    self.assertEqual(prepared.item_ids.tolist(), ["", "x", "y", "z"])  # w rated 1
    self.assertEqual(prepared.stats["users_dropped_short"], 1)
    self.assertEqual(prepared.stats["raw_interactions"], 9)
    self.assertEqual(prepared.stats["raw_skipped_lines"], 2)
    # Item core 3 removes z (two interactions), which leaves every user below three.
    with self.assertRaisesRegex(ValueError, "no interactions left"):
      preprocess.prepare(_raw(rows, ratings=ratings), DataConfig(min_rating=4, item_core=3))
    with self.assertRaisesRegex(ValueError, "has no ratings"):
      preprocess.prepare(_raw(rows), DataConfig(min_rating=4))

  def test_time_order_tie_breaking(self):
    # 50_000_001 s and 50_000_000 s scale to the same float32 on a 1e8 s range, as in RecBole.
    self.assertEqual(np.float32(0.50000001), np.float32(0.5))
    rows = [("y", "e", 0), ("y", "f", 1e8), ("y", "g", 5e7),
            ("x", "a", 50_000_001), ("x", "b", 50_000_000), ("x", "d", 6e7), ("x", "c", 6e7)]
    raw = _raw(rows)

    def sequence(time_order):
      prepared = preprocess.prepare(raw, DataConfig(time_order=time_order))
      return prepared.item_ids[prepared.sequence(1)].tolist()

    self.assertEqual(sequence("recbole"), ["a", "b", "d", "c"])  # near-ties keep file order
    self.assertEqual(sequence("exact"), ["b", "a", "d", "c"])  # exact ties keep file order
    with self.assertRaisesRegex(ValueError, "time_order='newest'"):
      preprocess.prepare(raw, DataConfig(time_order="newest"))

  def test_sequences_are_chronological(self):
    raw = _random_raw()
    time_of = {(u, i): t for u, i, t in zip(raw.users, raw.items, raw.timestamps)}
    prepared = preprocess.prepare(raw, DataConfig(time_order="exact"))
    for u in range(prepared.num_users):
      times = [time_of[prepared.user_ids[u], prepared.item_ids[i]] for i in prepared.sequence(u)]
      self.assertEqual(times, sorted(times))

  def test_item_text_and_fallback(self):
    meta = {"x": ItemMeta(title="Toy Story", year="1995", categories=("Animation", "Comedy")),
            "y": ItemMeta(title="Lip Balm", brand="Nivea", categories=("Beauty",))}
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3)]
    movies = preprocess.prepare(_raw(rows, meta, name="ml-1m"), DataConfig())
    self.assertEqual(movies.item_text, ("", "Toy Story (1995) | Genres: Animation, Comedy",
                                        "Lip Balm | Genres: Beauty | Brand: Nivea", "item z"))
    self.assertEqual(movies.item_meta[3], ItemMeta())
    self.assertEqual(movies.stats["items_without_meta"], 1)
    short = preprocess.prepare(_raw(rows, meta), DataConfig(item_text_max_chars=20))
    self.assertEqual(short.item_text[1:],
                     ("Toy Story (1995) | C", "Lip Balm | Categorie", "item z"))


class SplitTest(absltest.TestCase):

  def test_leave_one_out_invariants(self):
    prepared = preprocess.prepare(_random_raw(seed=1), DataConfig())
    n, num_users = len(prepared.seq_items), prepared.num_users
    for name, after in (("train", 2), ("valid", 1), ("test", 0)):
      split = prepared.split(name)
      np.testing.assert_array_equal(split.users, np.arange(num_users))
      self.assertEqual(split.history_offsets[-1], n - (after + 1) * num_users)
      for u in range(num_users):
        seq, history = prepared.sequence(u), split.history(u)
        target_position = len(seq) - 1 - after
        self.assertEqual(split.targets[u], seq[target_position])
        # The visible history is exactly what precedes the target: never the target occurrence
        # itself, nor anything after it.
        np.testing.assert_array_equal(history, seq[:target_position])
    self.assertEqual(prepared.stats["train_prefixes"], n - 3 * num_users)
    with self.assertRaisesRegex(ValueError, "unknown split 'dev'"):
      prepared.split("dev")

  def test_item_popularity_counts_training_part_only(self):
    prepared = preprocess.prepare(_random_raw(seed=2), DataConfig())
    train = np.concatenate([prepared.sequence(u)[:-2] for u in range(prepared.num_users)])
    popularity = prepared.item_popularity()
    self.assertEqual(popularity.shape, (prepared.num_items + 1,))
    np.testing.assert_array_equal(popularity, np.bincount(train, minlength=len(popularity)))
    self.assertEqual(popularity[0], 0)


class ArtifactsTest(absltest.TestCase):

  def test_save_load_round_trip(self):
    meta = {"i0": ItemMeta(title="Café", categories=("A", "B"), brand="Ünî", year="2001",
                           description="Line.")}
    prepared = preprocess.prepare(
        _raw([("u", f"i{k}", k) for k in range(4)] + [("v", "i0", 9)] * 3, meta), DataConfig())
    directory = pathlib.Path(self.create_tempdir().full_path) / "prepare"
    preprocess.save(prepared, directory)
    self.assertEqual(sorted(p.name for p in directory.iterdir()),
                     ["arrays.npz", "items.jsonl", "stats.json"])
    loaded = preprocess.load(directory)
    for field in ("user_ids", "item_ids", "seq_items", "seq_offsets"):
      np.testing.assert_array_equal(getattr(loaded, field), getattr(prepared, field))
      self.assertEqual(getattr(loaded, field).dtype.kind, getattr(prepared, field).dtype.kind)
    self.assertEqual(loaded.item_text, prepared.item_text)
    self.assertEqual(loaded.item_meta, prepared.item_meta)
    self.assertEqual(dict(loaded.stats), dict(prepared.stats))
    np.testing.assert_array_equal(loaded.split("test").history_items,
                                  prepared.split("test").history_items)


class MovieLens100kTest(absltest.TestCase):
  """The embedded asset against the numbers RecBole 1.2.1 reports (docs/protocol.md)."""

  def test_statistics_and_split(self):
    raw = formats.read_dataset("recbole", assets.path("ml-100k"))
    prepared = preprocess.prepare(raw, DataConfig())
    stats = prepared.stats
    self.assertEqual((stats["users"], stats["items"], stats["interactions"]), (943, 1682, 100000))
    self.assertEqual(stats["items_without_meta"], 0)
    self.assertEqual(len(prepared.split("train").history_items), 97171)  # training prefixes
    self.assertEqual(stats["train_prefixes"], 97171)
    self.assertEqual((len(prepared.split("valid").targets), len(prepared.split("test").targets)),
                     (943, 943))
    self.assertEqual(prepared.item_text[prepared.item_ids.tolist().index("1")],
                     "Toy Story (1995) | Genres: Animation, Children's, Comedy")

    # RecBole's float32 time ties reorder 83 users; the rows a 50-item model sees differ for 39
    # valid and 37 test users (docs/protocol.md).
    exact = preprocess.prepare(raw, DataConfig(time_order="exact"))
    self.assertEqual(sum((prepared.sequence(u) != exact.sequence(u)).any() for u in range(943)), 83)
    for name, changed in (("valid", 39), ("test", 37)):
      a, b = prepared.split(name), exact.split(name)
      rows_changed = [a.targets[u] != b.targets[u]
                      or (a.history(u)[-50:] != b.history(u)[-50:]).any() for u in range(943)]
      self.assertEqual(sum(rows_changed), changed)


if __name__ == "__main__":
  absltest.main()
