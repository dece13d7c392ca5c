"""The ablation runner's plan and its combined table."""

import numpy as np
from absl.testing import absltest

from experiments import ablate


class AblateTest(absltest.TestCase):

  def test_plan_covers_every_combination_once(self):
    runs = ablate.plan(["gru4rec", "sasrec"], ["minilm", "llm_pooled"], ["add", "gate"], [0, 1],
                       agnostic=True)
    names = [run.name for run in runs]
    self.assertLen(set(names), len(names))
    # per seed and backbone: plain + 2 encoders x (2 fusions + shuffled); per seed and encoder:
    # ID-agnostic; per encoder: one zero-shot.
    self.assertLen(runs, 2 * 2 * (1 + 2 * 3) + 2 * 2 + 2)
    self.assertEqual({run.mode for run in runs},
                     {"plain", "id_based", "id_agnostic", "zero_shot"})
    shuffled = [run for run in runs if run.variant.startswith("shuffled")]
    self.assertTrue(all(run.mode == "id_based" and run.variant == "shuffled/add"
                        for run in shuffled))

  def test_table_averages_seeds_against_plain(self):
    runs = [ablate.Run("gru4rec", "plain", "-", s) for s in (0, 1)]
    runs += [ablate.Run("gru4rec", "id_based/add", "minilm", s) for s in (0, 1)]
    results = [{"test": {"ndcg@10": v, "hr@10": 2 * v}} for v in (0.04, 0.06, 0.06, 0.06)]
    rows = {row["variant"]: row for row in ablate.table(runs, results)}
    self.assertAlmostEqual(rows["plain"]["ndcg@10"], 0.05)
    self.assertAlmostEqual(rows["plain"]["ndcg@10_std"], np.std([0.04, 0.06]))
    self.assertAlmostEqual(rows["id_based/add"]["ndcg@10_vs_plain"], 0.2)
    self.assertAlmostEqual(rows["id_based/add"]["hr@10_vs_plain"], 0.2)
    self.assertEqual(rows["plain"]["seeds"], 2)
    self.assertIn("+20.0%", ablate.markdown(list(rows.values())))


if __name__ == "__main__":
  absltest.main()
