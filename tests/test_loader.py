"""The one data loader: batch contents, determinism, resume, process sharding, mesh placement."""

import numpy as np
from absl.testing import absltest, parameterized

from slim_jax import parallel
from slim_jax.config import DataConfig
from slim_jax.data import formats, loader, preprocess


def _prepared(lengths=(7, 3, 12, 5), num_items=9, seed=0, distinct=False) -> preprocess.Prepared:
  """A real prepared dataset built from a synthetic raw one (`distinct`: no repeats per user)."""
  rng = np.random.default_rng(seed)
  users, items, times = [], [], []
  for user, length in enumerate(lengths):
    users += [f"u{user}"] * length
    chosen = rng.permutation(num_items)[:length] if distinct else rng.integers(0, num_items, length)
    items += [f"i{i}" for i in chosen]
    times += list(range(length))
  raw = formats.RawDataset(
      name="synthetic", users=np.asarray(users), items=np.asarray(items),
      timestamps=np.asarray(times, np.float64), ratings=np.full(len(users), np.nan, np.float32),
      item_meta={}, report={})
  return preprocess.prepare(raw, DataConfig(name="synthetic", time_order="exact"))


def _rows(batch):
  """Non-padding items of each left-padded row."""
  return [list(row[row > 0]) for row in np.asarray(batch)]


class SequenceBatchTest(parameterized.TestCase):

  def test_gather_left_padded(self):
    items = np.arange(1, 11, dtype=np.int32)
    out = loader.gather_left_padded(items, np.array([0, 2, 5]), np.array([3, 9, 5]), 4)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3], [6, 7, 8, 9], [0, 0, 0, 0]])

  def test_last_position_examples_are_every_training_prefix(self):
    prepared = _prepared()
    train = loader.training_part(prepared)
    rows, targets = loader.last_position_examples(train)
    self.assertLen(rows, sum(n - 3 for n in (7, 3, 12, 5)))
    batch = loader.last_position_batch(train, rows, targets, max_len=50)
    seen = set()
    for row, inputs, target in zip(rows, _rows(batch["inputs"]), batch["targets"]):
      seq = list(prepared.sequence(row))
      self.assertEqual(seq[:len(inputs) + 1], inputs + [target])  # a prefix and its next item
      self.assertLess(len(inputs) + 1, len(seq) - 1)  # never reaches valid or test targets
      seen.add((row, len(inputs)))
    self.assertLen(seen, len(rows))

  @parameterized.parameters(5, 2, 1)
  def test_per_position_windows_cover_each_target_once(self, stride):
    prepared = _prepared(lengths=(13, 4, 30), num_items=40, distinct=True)
    train = loader.training_part(prepared)
    rows, ends = loader.per_position_examples(train, stride)
    batch = loader.per_position_batch(train, rows, ends, max_len=5, stride=stride)
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    np.testing.assert_array_equal(targets[:, -stride:] > 0, inputs[:, -stride:] > 0)
    np.testing.assert_array_equal(targets[:, :-stride], 0)
    for user in range(3):
      train_seq = list(prepared.sequence(user)[:-2])
      covered = []
      for x, y in zip(_rows(inputs[rows == user]), targets[rows == user]):
        start = train_seq.index(x[0])
        self.assertEqual(x, train_seq[start:start + len(x)])
        owned = [(column, item) for column, item in enumerate(y) if item]
        for column, item in owned:  # each owned target is the item after its input column
          self.assertEqual(item, train_seq[start + column - (len(y) - len(x)) + 1])
        covered += [item for _, item in owned]
        self.assertLessEqual(len(owned), stride)
      self.assertCountEqual(covered, train_seq[1:])

  def test_eval_batches_pad_the_last_batch(self):
    prepared = _prepared()
    batches = list(loader.next_item_eval(prepared, "test", max_len=4, batch_size=3, mesh=None))
    self.assertLen(batches, 2)
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, [True] * 4 + [False] * 2)
    split = prepared.split("test")
    targets = np.concatenate([b["targets"] for b in batches])[:4]
    np.testing.assert_array_equal(targets, split.targets)
    inputs = np.concatenate([b["inputs"] for b in batches])
    for u in range(4):
      self.assertEqual(_rows(inputs[u:u + 1])[0], list(split.history(u)[-4:]))
    self.assertTrue((inputs[4:] == 0).all())


class TrainingIteratorTest(parameterized.TestCase):

  def _iterator(self, seed=0, mesh=None):
    return loader.next_item_training(_prepared(lengths=(20, 30, 25, 40)), max_len=8,
                                     batch_size=8, seed=seed, mesh=mesh, per_position=False)

  def test_deterministic_under_a_seed(self):
    a, _ = self._iterator(seed=1)
    b, _ = self._iterator(seed=1)
    c, _ = self._iterator(seed=2)
    first = [next(a)["targets"] for _ in range(5)]
    np.testing.assert_array_equal(first, [next(b)["targets"] for _ in range(5)])
    self.assertFalse(np.array_equal(first, [next(c)["targets"] for _ in range(5)]))

  def test_epochs_are_reshuffled_and_complete(self):
    iterator, steps = self._iterator()
    num_examples = sum(n - 3 for n in (20, 30, 25, 40))
    self.assertEqual(steps, num_examples // 8)
    stream = np.concatenate([next(iterator)["targets"] for _ in range(-(-2 * num_examples // 8))])
    first, second = stream[:num_examples], stream[num_examples:2 * num_examples]
    self.assertCountEqual(first, second)  # batches run across the epoch boundary, nothing lost
    self.assertFalse(np.array_equal(first, second))

  def test_resume_sees_the_same_next_batch(self):
    iterator, _ = self._iterator()
    for _ in range(7):
      next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["inputs"] for _ in range(3)]
    resumed, _ = self._iterator()
    resumed.set_state(state)
    np.testing.assert_array_equal([next(resumed)["inputs"] for _ in range(3)], expected)

  @parameterized.parameters(({"data": -1},), ({"data": 2, "fsdp": 4},))
  def test_global_arrays_on_a_mesh(self, axes):
    mesh = parallel.make_mesh(axes)
    sharded, _ = self._iterator(mesh=mesh)
    plain, _ = self._iterator(mesh=None)
    batch, reference = next(sharded), next(plain)
    self.assertEqual(batch["inputs"].sharding, parallel.batch_sharding(mesh, 2))
    self.assertEqual(batch["inputs"].addressable_shards[0].data.shape, (1, 8))
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), reference["inputs"])

  def test_batch_size_must_split_over_the_mesh(self):
    with self.assertRaisesRegex(ValueError, "not a multiple of 8"):
      loader.next_item_training(_prepared(), max_len=8, batch_size=12, seed=0,
                                mesh=parallel.make_mesh(), per_position=False)


class LanguageModelBatchTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.prompts = [rng.integers(3, 100, n).astype(np.int32) for n in (5, 9, 3, 7, 4, 6)]
    self.targets = [rng.integers(3, 100, n).astype(np.int32) for n in (4, 2, 6, 3, 5, 1)]

  def test_loss_only_on_target_tokens_and_bucketed(self):
    batch = loader.lm_batch(self.prompts[:2], self.targets[:2], buckets=(8, 16, 32), pad_id=2)
    self.assertEqual(batch["tokens"].shape, (2, 16))
    np.testing.assert_array_equal(batch["tokens"][0, :9], np.concatenate([self.prompts[0], self.targets[0]]))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] * 5 + [1] * 4 + [0] * 7)
    np.testing.assert_array_equal(batch["segment_ids"][1], [1] * 11 + [0] * 5)
    np.testing.assert_array_equal(batch["positions"][1, :11], np.arange(11))
    with self.assertRaisesRegex(ValueError, "exceeds the largest bucket 8"):
      loader.lm_batch(self.prompts[:2], self.targets[:2], buckets=(8,), pad_id=2)

  def test_packing_keeps_every_token_once(self):
    packs = loader.pack_examples([len(p) + len(t) for p, t in zip(self.prompts, self.targets)], 16)
    self.assertCountEqual([i for pack in packs for i in pack], range(6))
    batch = loader.packed_lm_batch(self.prompts, self.targets, packs, 16, pad_id=0)
    self.assertEqual(int(batch["loss_mask"].sum()), sum(len(t) for t in self.targets))
    self.assertEqual(int((batch["segment_ids"] > 0).sum()),
                     sum(len(p) + len(t) for p, t in zip(self.prompts, self.targets)))
    for row, pack in zip(range(len(packs)), packs):
      for segment, index in enumerate(pack, start=1):
        tokens = batch["tokens"][row][batch["segment_ids"][row] == segment]
        np.testing.assert_array_equal(tokens, np.concatenate([self.prompts[index], self.targets[index]]))
        positions = batch["positions"][row][batch["segment_ids"][row] == segment]
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))

  def test_lm_training_resumes(self):
    make = lambda: loader.lm_training(self.prompts, self.targets, batch_size=2, buckets=(16,),
                                      pad_id=0, seed=3, mesh=None)[0]
    iterator = make()
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)["tokens"]
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], expected)

  def test_lm_eval_batches_cover_every_example_once(self):
    batches = list(loader.lm_eval_batches(self.prompts, self.targets, batch_size=4, buckets=(16,),
                                          pad_id=0, mesh=None))
    self.assertLen(batches, 2)
    loss_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    self.assertEqual(loss_tokens, sum(len(t) for t in self.targets))
    self.assertFalse(batches[1]["segment_ids"][2:].any())  # the two padding rows are empty

  def test_text_batches_cover_every_text_in_order(self):
    batches = list(loader.text_batches(self.prompts, batch_size=4, buckets=(16,), pad_id=0, mesh=None))
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, -1, -1])
    np.testing.assert_array_equal(batches[1]["attention_mask"][1].sum(), len(self.prompts[5]))


class Ml100kLoaderTest(absltest.TestCase):

  def test_ml100k_prefix_count(self):
    from slim_jax import assets
    raw = formats.read_dataset("recbole", assets.path("ml-100k"))
    prepared = preprocess.prepare(raw, DataConfig())
    rows, _ = loader.last_position_examples(loader.training_part(prepared))
    self.assertLen(rows, 97_171)


if __name__ == "__main__":
  absltest.main()
