"""Metrics on hand-computed rankings, sampled evaluation, popularity bias, sparsity groups."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from slim_jax import metrics


class RankTest(absltest.TestCase):

  def test_ranks_with_ties_follow_item_order(self):
    #                 pad  1    2    3    4    5
    scores = jnp.array([[9., 0.5, 0.7, 0.5, 0.5, 0.1],
                        [9., 0.5, 0.7, 0.5, 0.5, 0.1],
                        [9., 0.5, 0.7, 0.5, 0.5, 0.1]])
    scores = metrics.rankable(scores, 5, jnp.array([3, 1, 2]))
    ranks = metrics.target_ranks(scores, jnp.array([3, 1, 2]))
    # item 3 ties with 1 and 4: behind 2 (higher) and 1 (tie, smaller id); padding never counts.
    np.testing.assert_array_equal(ranks, [2, 1, 0])
    top = metrics.top_items(scores, 5)
    np.testing.assert_array_equal(top[0], [2, 1, 3, 4, 5])  # the same order as the ranks

  def test_rows_past_the_catalogue_never_rank(self):
    scores = metrics.rankable(jnp.array([[0., 1., 2., 5., 6.]]), 2, jnp.array([1]))
    self.assertEqual(int(metrics.target_ranks(scores, jnp.array([1]))[0]), 1)

  def test_excluded_history_never_hides_the_target(self):
    scores = jnp.array([[0., 0.9, 0.8, 0.7, 0.6]])
    history = jnp.array([[0, 1, 3, 0]])
    for target, rank in ((3, 1), (4, 1), (2, 0)):
      kept = metrics.rankable(scores, 4, jnp.array([target]), history)
      self.assertEqual(int(metrics.target_ranks(kept, jnp.array([target]))[0]), rank, target)

  def test_metrics_from_ranks(self):
    got = metrics.per_user(np.array([0, 1, 4, 9, 30]), ks=(5, 10))
    np.testing.assert_allclose(got["hr@5"], [1, 1, 1, 0, 0])
    np.testing.assert_allclose(got["ndcg@5"], [1, 1 / np.log2(3), 1 / np.log2(6), 0, 0])
    np.testing.assert_allclose(got["mrr@10"], [1, 1 / 2, 1 / 5, 1 / 10, 0])
    mean = metrics.ranking_metrics(np.array([0, 3]), ks=(1,))
    self.assertEqual((mean["hr@1"], mean["ndcg@1"], mean["mrr@1"]), (0.5, 0.5, 0.5))

  def test_k_larger_than_the_catalogue(self):
    scores = metrics.rankable(jnp.array([[0., 3., 1., 2.]]), 3, jnp.array([2]))
    rank = metrics.target_ranks(scores, jnp.array([2]))
    got = metrics.ranking_metrics(np.asarray(rank), ks=(20,))
    self.assertEqual(got["hr@20"], 1.0)
    self.assertAlmostEqual(got["ndcg@20"], 1 / np.log2(4))


class SampledTest(absltest.TestCase):

  def test_candidates_are_distinct_items_other_than_the_target(self):
    targets = jnp.arange(1, 9, dtype=jnp.int32)
    keys = jax.vmap(lambda u: jax.random.fold_in(jax.random.key(0), u))(targets)
    negatives = np.asarray(metrics.sample_candidates(keys, targets, 20, 10))
    for target, row in zip(np.asarray(targets), negatives):
      self.assertLen(set(row.tolist()), 10)
      self.assertNotIn(target, row)
      self.assertNotIn(0, row)

  def test_candidates_leave_out_the_users_own_items(self):
    targets = jnp.arange(1, 9, dtype=jnp.int32)
    keys = jax.vmap(lambda u: jax.random.fold_in(jax.random.key(0), u))(targets)
    own = np.stack([np.arange(t, t + 8) % 20 for t in range(1, 9)]).astype(np.int32)  # 0 = none
    negatives = np.asarray(metrics.sample_candidates(keys, targets, 20, 11, exclude=own))
    for target, row, seen in zip(np.asarray(targets), negatives, own):
      self.assertLen(set(row.tolist()), 11)  # 20 items less up to 8 own ones: 12 or 13 left
      self.assertEmpty(set(row.tolist()) & set(seen.tolist()) | {0, int(target)} & set(row))
    with self.assertRaisesRegex(ValueError, "sampled_negatives=13: user row 1 .* all but 12"):
      metrics.check_negatives(np.array([[1, 2, 3, 4, 5, 6, 7, 0], [1, 2, 3, 4, 5, 6, 7, 8]]), 20,
                              13)
    metrics.check_negatives(np.array([[1, 2, 3, 4, 5, 6, 7, 8]]), 20, 12)

  def test_popularity_sampling_follows_popularity(self):
    popularity = np.zeros(11)
    popularity[[2, 5, 7]] = [1, 100, 10]
    targets = jnp.full((200,), 7, jnp.int32)
    keys = jax.vmap(lambda u: jax.random.fold_in(jax.random.key(0), u))(jnp.arange(200))
    first = np.asarray(metrics.sample_candidates(keys, targets, 10, 1, popularity))[:, 0]
    self.assertGreater((first == 5).mean(), 0.9)  # 100 : 1 against item 2; 7 is the target
    self.assertTrue(np.isin(first, [2, 5]).all())

  def test_rank_among_sampled(self):
    scores = jnp.array([[0., 0.2, 0.9, 0.2, 0.5, 0.1]])
    rank = metrics.sampled_ranks(scores, jnp.array([3]), jnp.array([[5, 1, 4]]))
    self.assertEqual(int(rank[0]), 2)  # behind 4 (0.5) and 1 (tie, smaller id), ahead of 5


class AnalysisTest(absltest.TestCase):

  def test_popularity_bias(self):
    popularity = np.array([0, 50, 40, 30, 20, 10, 5, 4, 3, 2, 1])  # 10 items; head = {1, 2}
    np.testing.assert_array_equal(np.flatnonzero(metrics.head_items(popularity)), [1, 2])
    top = np.array([[1, 3, 7], [1, 2, 9]])
    got = metrics.popularity_bias(top, popularity, k=2)
    self.assertAlmostEqual(got["mean_popularity@2"], (50 + 30 + 50 + 40) / 4)
    self.assertAlmostEqual(got["long_tail@2"], 1 / 4)
    self.assertAlmostEqual(got["coverage@2"], 3 / 10)

  def test_sparsity_groups_are_equal_sized_quintiles(self):
    lengths = np.array([50, 3, 7, 3, 100, 20, 9, 12, 5, 30])
    groups = metrics.sparsity_groups(lengths)
    np.testing.assert_array_equal(np.bincount(groups), [2, 2, 2, 2, 2])
    np.testing.assert_array_equal(groups, [4, 0, 1, 0, 4, 3, 2, 2, 1, 3])
    rows = metrics.grouped_metrics(np.array([0, 0, 50, 50, 1, 1, 1, 1, 1, 1]), lengths, ks=(1,))
    self.assertEqual([r["users"] for r in rows], [2] * 5)
    self.assertEqual((rows[0]["min_length"], rows[0]["max_length"], rows[0]["hr@1"]), (3, 3, 0.5))
    self.assertEqual(rows[1]["hr@1"], 0.0)


if __name__ == "__main__":
  absltest.main()
