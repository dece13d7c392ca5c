"""The paired tests on constructed data: a known effect is found, no effect is not (beyond the
test's own false-positive rate), and the per-quintile gains with their intervals."""

import numpy as np
from absl.testing import absltest

from slim_jax import metrics, stats


def ndcg_like(rng, users: int, hit_rate: float = 0.1) -> np.ndarray:
  """Per-user NDCG@10 as a recommender yields it: mostly 0, the rest 1/log2(rank + 2)."""
  ranks = rng.integers(0, 10, users)
  return np.where(rng.random(users) < hit_rate, 1.0 / np.log2(ranks + 2.0), 0.0)


class PairedTests(absltest.TestCase):

  def test_over_users_finds_a_known_effect(self):
    rng = np.random.default_rng(0)
    base = ndcg_like(rng, 943)
    better = np.where(rng.random(943) < 0.1, 1.0, base)  # one user in ten gains a top hit
    self.assertLess(stats.p_over_users(better, base), 1e-3)

  def test_over_users_without_effect_rejects_at_its_rate(self):
    rng = np.random.default_rng(1)
    rejections = [stats.p_over_users(ndcg_like(rng, 943), ndcg_like(rng, 943)) < stats.ALPHA
                  for _ in range(400)]
    self.assertLess(np.mean(rejections), 0.08)  # 5% expected; binomial sd over 400 runs: 1.1%

  def test_over_seeds_finds_a_known_effect(self):
    rng = np.random.default_rng(2)
    plain = 0.065 + 0.003 * rng.normal(size=5)
    self.assertLess(stats.p_over_seeds(plain + 0.008 + 0.002 * rng.normal(size=5), plain), 0.01)

  def test_over_seeds_without_effect_rejects_at_its_rate(self):
    rng = np.random.default_rng(3)
    rejections = [stats.p_over_seeds(0.065 + 0.003 * rng.normal(size=5),
                                     0.065 + 0.003 * rng.normal(size=5)) < stats.ALPHA
                  for _ in range(1000)]
    self.assertBetween(np.mean(rejections), 0.02, 0.08)

  def test_degenerate_pairs(self):
    self.assertEqual(stats.p_over_users([0.1, 0.0], [0.1, 0.0]), 1.0)
    self.assertEqual(stats.p_over_seeds([0.1, 0.2], [0.1, 0.2]), 1.0)
    self.assertIsNone(stats.p_over_seeds([0.1], [0.2]))

  def test_describe_p_says_no_measurable_difference_whatever_the_sign(self):
    self.assertEqual(stats.describe_p(0.003), "0.003")
    self.assertEqual(stats.describe_p(0.21), "0.21: no measurable difference")
    self.assertEqual(stats.describe_p(None), "—")


class PerUserTest(absltest.TestCase):

  def test_users_are_averaged_over_seeds_then_paired(self):
    ranked = {"users": np.array([2, 0, 1]), "ranks": np.array([0, 20, 1]),
              "sampled_ranks": np.array([0, 3, 0])}
    full = stats.user_metric(ranked)
    self.assertEqual(full, {2: 1.0, 0: 0.0, 1: 1 / np.log2(3)})
    self.assertEqual(stats.user_metric(ranked, "sampled")[0], 1 / np.log2(5))
    averaged = stats.seed_averaged([full, {0: 1.0, 1: 0.0}])  # user 2 missing from one seed
    self.assertEqual(averaged, {0: 0.5, 1: 0.5 / np.log2(3)})
    users, a, b = stats.paired_users(averaged, full)
    np.testing.assert_array_equal(users, [0, 1])
    np.testing.assert_allclose(a - b, [0.5, -0.5 / np.log2(3)])


class GainByHistoryTest(absltest.TestCase):

  def test_a_gain_of_the_sparsest_users_shows_in_their_quintile_alone(self):
    rng = np.random.default_rng(4)
    lengths = rng.integers(5, 500, 1000)
    sparsest = metrics.sparsity_groups(lengths) == 0
    gain = dict(enumerate(np.where(sparsest, 0.05, 0.0) + 0.02 * rng.normal(size=1000)))
    rows = stats.gain_by_history(gain, lengths)
    self.assertEqual([row["group"] for row in rows], [0, 1, 2, 3, 4])
    self.assertEqual(sum(row["users"] for row in rows), 1000)
    self.assertGreater(rows[0]["low"], max(row["high"] for row in rows[1:]))
    for row in rows:
      self.assertBetween(row["gain"], row["low"], row["high"])
    for row in rows[1:]:
      self.assertLess(abs(row["gain"]), 0.005)  # about 3 standard errors of 0.0014
    self.assertLessEqual(rows[0]["max_length"], rows[1]["min_length"])

  def test_interval_holds_the_mean(self):
    values = np.random.default_rng(5).normal(0.3, 1.0, 400)
    mean, low, high = stats.mean_interval(values)
    self.assertLess(low, mean)
    self.assertLess(mean, high)
    self.assertLess(high - low, 0.3)  # about 4 standard errors of 0.05
    self.assertEqual(stats.mean_interval([0.2, 0.2]), (0.2, 0.2, 0.2))


if __name__ == "__main__":
  absltest.main()
