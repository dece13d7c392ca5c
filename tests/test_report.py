"""report.py's paired tests on one seed of constructed runs: the primary contrasts with Holm and
their minimum detectable effect, the controls with Benjamini-Hochberg, one shared computation
(`stats.contrasts`) with the ablation table."""

import pathlib

import numpy as np
from absl.testing import absltest

from slim_jax import layout, report, stats

# Hit rates: item_text helps, id_based more, shuffled and history_text are item_text again.
RATES = {"plain": 0.15, "item_text": 0.25, "id_based": 0.35, "shuffled": 0.25,
         "history_text": 0.25, "constant_rationale": 0.25, "item_text_permuted": 0.15,
         "id_agnostic": 0.1}


class TestsSectionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.train_dir = pathlib.Path(absltest.get_default_test_tmpdir()) / "train"
    rng = np.random.default_rng(0)
    cls.variants = {}
    for mode, rate in RATES.items():
      name = mode if mode == "id_agnostic" else f"gru4rec_{mode}"
      ranks = np.where(rng.random(800) < rate, 0, 50)
      (cls.train_dir / name).mkdir(parents=True, exist_ok=True)
      np.savez(cls.train_dir / name / layout.RANKED_TEST, users=np.arange(800), ranks=ranks,
               sampled_ranks=ranks // 10, negatives=np.zeros((800, 100), np.int32))
      cls.variants[name] = {"backbone": "gru4rec", "mode": mode,
                            "config": {"sampled_negatives": 100}}
    cls.compared = report.contrasts(cls.variants, cls.train_dir)

  def test_primary_family_with_holm(self):
    primary = [c for c in self.compared if c["primary"]]
    for protocol in stats.PROTOCOLS:
      family = [c for c in primary if c["protocol"] == protocol]
      self.assertEqual([(c["variant"], c["against"]) for c in family],
                       [(f"gru4rec_{a}", f"gru4rec_{b}") for a, b in stats.PRIMARY_CONTRASTS])
      np.testing.assert_allclose([c["p_users_adjusted"] for c in family],
                                 stats.holm([c["p_users"] for c in family]))
      self.assertTrue(all(c["p_seeds"] is None for c in family))  # one seed
    rationale = next(c for c in primary if c["against"] == "gru4rec_history_text")
    self.assertLess(rationale["p_users_adjusted"], 1e-3)
    self.assertGreater(rationale["low"], 0.0)

  def test_controls_with_benjamini_hochberg(self):
    controls = [c for c in self.compared if not c["primary"]]
    np.testing.assert_allclose([c["p_users_adjusted"] for c in controls],
                               stats.adjusted([c["p_users"] for c in controls]))
    pairs = {(c["variant"], c["against"]) for c in controls}
    self.assertIn(("gru4rec_item_text", "gru4rec_item_text_permuted"), pairs)
    self.assertIn(("gru4rec_id_based", "gru4rec_constant_rationale"), pairs)
    self.assertIn(("id_agnostic", "gru4rec_plain"), pairs)
    self.assertNotIn(("gru4rec_item_text", "gru4rec_plain"), pairs)  # primary, not repeated

  def test_section(self):
    text = report.tests_section(self.variants, self.train_dir)
    self.assertIn("| variant | against | protocol | NDCG@10 change | per-user difference [95% CI] "
                  "| MDE | p over users | p (Holm) |", text)
    self.assertIn("| gru4rec_id_based | gru4rec_shuffled | full ranking |", text)
    self.assertIn("| gru4rec_item_text | gru4rec_item_text_permuted | 100 negatives |", text)
    self.assertIn(stats.NO_DIFFERENCE, text)
    self.assertIn("Holm", text)


if __name__ == "__main__":
  absltest.main()
