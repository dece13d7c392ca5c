"""The paired tests on constructed data: a known effect is found, no effect is not (beyond the
test's own false-positive rate); Holm's correction against a hand-computed example; the minimum
detectable effect against its formula and its power; the primary family per backbone; and the
per-quintile gains with their intervals."""

import numpy as np
import scipy.stats
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


class CorrectionTest(absltest.TestCase):

  def test_holm_against_a_hand_computed_example(self):
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (the
    # step-down never lowers a later p below an earlier one).
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.6, 0.3]), [0.6, 0.6])
    np.testing.assert_allclose(stats.holm([0.5, 0.2, 0.9]), [1.0, 0.6, 1.0])  # capped at 1
    self.assertEqual(stats.holm([0.02]), [0.02])
    self.assertEqual(stats.holm([]), [])

  def test_holm_is_stricter_than_benjamini_hochberg(self):
    p = np.random.default_rng(6).uniform(0, 0.1, 8)
    self.assertTrue(np.all(np.array(stats.holm(p)) >= np.array(stats.adjusted(p)) - 1e-12))

  def test_adjusted_within_families(self):
    adjusted = stats.adjusted_within([0.01, 0.04, None, 0.02, 0.03], ["a", "a", "a", "b", "b"],
                                     stats.holm)
    np.testing.assert_allclose(adjusted[:2], [0.02, 0.04])
    self.assertIsNone(adjusted[2])
    np.testing.assert_allclose(adjusted[3:], [0.04, 0.04])


class MinimumDetectableEffectTest(absltest.TestCase):

  def test_formula(self):
    # An interval of +-1.96 is a standard error of 1: MDE = z_0.975 + z_0.8.
    self.assertAlmostEqual(stats.minimum_detectable_effect(-1.959964, 1.959964),
                           1.959964 + 0.841621, places=5)
    self.assertAlmostEqual(stats.minimum_detectable_effect(0.1, 0.3),
                           2.801585 * 0.2 / (2 * 1.959964), places=5)
    self.assertAlmostEqual(stats.minimum_detectable_effect(-1.0, 1.0, power=0.5),
                           1.0, places=6)  # z_0.5 = 0: the interval's half-width

  def test_an_effect_of_that_size_is_found_four_times_in_five(self):
    rng = np.random.default_rng(7)
    _, low, high = stats.mean_interval(rng.normal(0.0, 1.0, 400))
    mde = stats.minimum_detectable_effect(low, high)
    self.assertBetween(mde, 0.12, 0.16)  # 2.8 standard errors of 0.05
    found = [scipy.stats.ttest_1samp(rng.normal(mde, 1.0, 400), 0.0).pvalue < stats.ALPHA
             for _ in range(1000)]
    self.assertBetween(np.mean(found), 0.74, 0.86)  # 0.8; binomial sd over 1000: 0.013


def _users(rng, users: int, hit_rate: float) -> dict[int, float]:
  return dict(enumerate(np.where(rng.random(users) < hit_rate, 0.5, 0.0)))


class ContrastTest(absltest.TestCase):

  def test_contrast_of_seeds_and_users(self):
    rng = np.random.default_rng(8)
    mine = {seed: _users(rng, 600, 0.3) for seed in range(4)}
    theirs = {seed: _users(rng, 600, 0.2) for seed in range(1, 5)}  # seeds 1-3 shared
    c = stats.contrast(mine, theirs)
    self.assertEqual((c["seeds"], c["users"]), (3, 600))
    self.assertAlmostEqual(c["change"], c["mean"] / c["base_mean"] - 1)
    self.assertAlmostEqual(c["difference"], c["mean"] - c["base_mean"])
    self.assertBetween(c["difference"], c["low"], c["high"])
    self.assertGreater(c["low"], 0.0)
    self.assertAlmostEqual(c["mde"], stats.minimum_detectable_effect(c["low"], c["high"]))
    self.assertAlmostEqual(c["mde_relative"], c["mde"] / c["base_mean"])
    self.assertLess(c["p_users"], 1e-3)
    self.assertLess(c["p_seeds"], 0.05)
    self.assertIsNone(stats.contrast({0: mine[0]}, {0: theirs[1]})["p_seeds"])
    with self.assertRaisesRegex(ValueError, "no seed"):
      stats.contrast({0: mine[0]}, {1: theirs[1]})

  def test_primary_family_per_backbone_and_protocol(self):
    """Two backbones, every primary contrast present for the first, two for the second: Holm
    within each backbone's (and protocol's) family, BH over the controls."""
    rng = np.random.default_rng(9)
    rates = {"plain": 0.2, "item_text": 0.25, "id_based": 0.26, "shuffled": 0.25,
             "history_text": 0.255, "constant_rationale": 0.25}
    rows, users = [], {}
    for backbone, variants in (("gru4rec", list(rates)), ("sasrec", ["plain", "item_text",
                                                                       "id_based"])):
      for variant in variants:
        rows.append({"backbone": backbone, "variant": variant, "main": True})
        users[backbone, variant] = {s: {p: _users(rng, 500, rates[variant])
                                        for p in stats.PROTOCOLS} for s in range(3)}
    rows.append({"backbone": "gru4rec", "variant": "id_based", "main": False})  # e.g. a fusion
    users["gru4rec", "id_based", False] = users["gru4rec", "id_based"]
    reference = lambda row, variant: next(
        (r for r in rows if r["variant"] == variant and r["backbone"] == row["backbone"]
         and r["main"]), None)
    pairs = stats.contrast_pairs(rows, reference, lambda row: row["main"])
    key = lambda row: (row["backbone"], row["variant"], *([] if row["main"] else [False]))
    compared = stats.contrasts(pairs, lambda row: users[key(row)])

    primary = [c for c in compared if c["primary"]]
    named = lambda cs: sorted((c["row"]["backbone"], c["row"]["variant"], c["base"]["variant"])
                              for c in cs if c["protocol"] == "full")
    self.assertEqual(named(primary), [
        ("gru4rec", "id_based", "history_text"), ("gru4rec", "id_based", "item_text"),
        ("gru4rec", "id_based", "shuffled"), ("gru4rec", "item_text", "plain"),
        ("sasrec", "id_based", "item_text"), ("sasrec", "item_text", "plain")])
    self.assertTrue(all(c["row"]["main"] for c in primary))
    for backbone in ("gru4rec", "sasrec"):
      for protocol in stats.PROTOCOLS:
        family = [c for c in primary if c["row"]["backbone"] == backbone
                  and c["protocol"] == protocol]
        for kind in ("seeds", "users"):
          np.testing.assert_allclose([c[f"p_{kind}_adjusted"] for c in family],
                                     stats.holm([c[f"p_{kind}"] for c in family]))
    controls = [c for c in compared if not c["primary"]]
    np.testing.assert_allclose([c["p_users_adjusted"] for c in controls],
                               stats.adjusted([c["p_users"] for c in controls]))
    # Each pair once, in one direction: a primary pair is not repeated among the controls.
    pair = lambda c: (frozenset((id(c["row"]), id(c["base"]))), c["protocol"])
    self.assertLen({pair(c) for c in compared}, len(compared))
    self.assertIn(("gru4rec", "id_based", "constant_rationale"), named(controls))
    # The primary contrasts away from the main settings are controls.
    self.assertIn(("gru4rec", "id_based", "item_text"),
                  named([c for c in controls if not c["row"]["main"]]))
    self.assertIn(("gru4rec", "shuffled", "plain"), named(controls))
    self.assertNotIn(("gru4rec", "plain", "plain"), named(controls))
    self.assertNotIn(("gru4rec", "plain", "shuffled"), named(controls))  # the reverse is there

  def test_descriptions(self):
    c = {"difference": 0.01234, "low": -0.002, "high": 0.0267, "mde": 0.0201,
         "mde_relative": 0.25}
    self.assertEqual(stats.describe_interval(c), "+0.0123 [-0.0020, +0.0267]")
    self.assertEqual(stats.describe_mde(c), "0.0201 (25.0%)")
    self.assertEqual(stats.describe_change(0.031), "+3.1%")
    self.assertEqual(stats.describe_change(None), "")


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
