"""The ablation runner's plan and its tables: both protocols, paired tests, quintile gains."""

import pathlib

import numpy as np
from absl.testing import absltest

from experiments.analysis import ablate
from slim_jax.models import slim


class PlanTest(absltest.TestCase):

  def test_plan_covers_every_combination_once(self):
    runs = ablate.plan(["gru4rec", "sasrec"], ["minilm", "llm_pooled"], ["paper", "gate"], [0, 1],
                       variants=list(slim.MODES))
    names = [run.name for run in runs]
    self.assertLen(set(names), len(names))
    # per seed and backbone: plain + 2 encoders x (item_text + 2 fusions + shuffled + teacher);
    # per seed and encoder: id_agnostic; per encoder: one zero_shot; one popularity.
    self.assertLen(runs, 2 * 2 * (1 + 2 * 5) + 2 * 2 + 2 + 1)
    self.assertEqual({run.mode for run in runs}, set(slim.MODES))
    controls = [run for run in runs if run.mode in ("shuffled", "teacher_rationales")]
    self.assertTrue(all(run.fusion == "paper" for run in controls))
    self.assertEqual({run.fusion for run in runs if run.mode == "id_based"}, {"paper", "gate"})

  def test_plan_keeps_the_variants_asked_for(self):
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0, 1], variants=["plain", "item_text"])
    self.assertEqual([run.mode for run in runs], ["plain", "item_text"] * 2)
    with self.assertRaisesRegex(ValueError, "backbone_plus"):
      ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0], variants=["backbone_plus"])


def _result(ndcg: float) -> dict:
  return {"test": {"ndcg@10": ndcg, "hr@10": 2 * ndcg,
                   "sampled100_uniform": {"ndcg@10": 3 * ndcg, "hr@10": 4 * ndcg}}}


class TableTest(absltest.TestCase):
  """Five seeds of plain, item_text (better for the sparsest 40% of users) and shuffled (plain
  again): item_text must be measurably better than plain, shuffled not."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    users = 500
    cls.lengths = np.arange(users) + 5  # user u has history length u + 5
    cls.runs, cls.results, cls.users = [], [], []
    for seed in range(5):
      for mode, encoder in (("plain", "-"), ("item_text", "minilm"), ("shuffled", "minilm")):
        hits = rng.random(users) < 0.2
        if mode == "item_text":
          hits |= (np.arange(users) < 200) & (rng.random(users) < 0.3)
        per_user = dict(enumerate(np.where(hits, 0.5, 0.0)))
        fusion = "paper" if mode == "shuffled" else "-"
        cls.runs.append(ablate.Run("gru4rec", mode, fusion, encoder, seed))
        cls.results.append(_result(float(np.mean(list(per_user.values())))))
        cls.users.append({"full": per_user, "sampled": per_user})
    cls.rows = ablate.summarize(cls.runs, cls.results)

  def test_rows_average_seeds_under_both_protocols(self):
    plain = next(r for r in self.rows if r["variant"] == "plain")
    values = [r["test"]["ndcg@10"] for run, r in zip(self.runs, self.results)
              if run.mode == "plain"]
    self.assertEqual(plain["seeds"], 5)
    self.assertAlmostEqual(plain["full/ndcg@10"], np.mean(values))
    self.assertAlmostEqual(plain["full/ndcg@10_std"], np.std(values))
    self.assertAlmostEqual(plain["sampled/ndcg@10"], 3 * np.mean(values))
    self.assertAlmostEqual(plain["sampled/hr@10"], 4 * np.mean(values))

  def test_paired_tests_find_the_effect_and_not_its_absence(self):
    compared = {(c["variant"], c["against"], c["protocol"]): c
                for c in ablate.comparisons(self.runs, self.rows, self.users)}
    better = compared["item_text", "plain", "full"]
    self.assertGreater(better["change"], 0.1)
    self.assertLess(better["p_users"], 1e-3)
    self.assertLess(better["p_seeds"], 0.05)
    self.assertGreater(better["low"], 0.0)  # the interval of the per-user gain excludes zero
    self.assertBetween(better["difference"], better["low"], better["high"])
    self.assertBetween(better["p_users_adjusted"], better["p_users"], 1.0)
    self.assertGreater(compared["shuffled", "plain", "full"]["p_users"], 0.05)
    self.assertLessEqual(compared["shuffled", "plain", "full"]["low"], 0.0)
    self.assertLess(compared["item_text", "shuffled", "sampled"]["p_users"], 1e-3)
    self.assertNotIn(("plain", "plain", "full"), compared)
    table = ablate.markdown(self.rows, list(compared.values()), [], "100 uniform negatives")
    self.assertIn("no measurable difference", table)
    self.assertIn("| gru4rec | item_text | - | minilm |", table)

  def test_quintile_gains_show_where_the_gain_is(self):
    gains = ablate.quintile_gains(self.runs, self.rows, self.users, self.lengths)
    item_text = next(g for g in gains if g["variant"] == "item_text")["groups"]
    self.assertLen(item_text, 5)
    self.assertGreater(item_text[0]["low"], 0.0)  # users 0-99, the sparsest
    self.assertGreater(item_text[1]["low"], 0.0)
    self.assertLess(abs(item_text[4]["gain"]), 0.05)
    plot = pathlib.Path(self.create_tempdir().full_path) / "quintiles.png"
    ablate.plot_gains(plot, gains)
    self.assertGreater(plot.stat().st_size, 1000)
    table = ablate.markdown(self.rows, [], gains, "100 uniform negatives")
    self.assertIn("G0 (5-104)", table)

  def test_the_table_says_how_many_users_read_the_teachers_rationale(self):
    runs = [ablate.Run("gru4rec", "teacher_rationales", "paper", "minilm", seed)
            for seed in (0, 1)]
    results = [{**_result(0.1), "users_with_teacher_rationale": {"test": 47}}] * 2
    rows = ablate.summarize(runs, results)
    self.assertEqual(rows[0]["users_with_teacher_rationale"], {"test": 47})
    self.assertIn("gru4rec | teacher_rationales | paper | minilm: 47 users read the teacher's "
                  "rationale instead of the student's (test split).",
                  ablate.markdown(rows, [], [], "100 uniform negatives"))
    self.assertNotIn("teacher's", ablate.markdown(self.rows, [], [], "100 uniform negatives"))


if __name__ == "__main__":
  absltest.main()
