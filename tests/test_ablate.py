"""The ablation runner: its plan, order and config-hashed run directories, and its tables (both
protocols, the primary contrasts with Holm per backbone, the controls, quintile gains, the runs
still missing)."""

import json
import pathlib
from unittest import mock

import numpy as np
from absl.testing import absltest, flagsaver

from experiments.analysis import ablate
from slim_jax import config as config_lib
from slim_jax import layout, stats
from slim_jax.models import slim
from tests import fixtures

NONE = ablate.NONE
MAIN = ablate.main_settings(["minilm"], ["paper"], ["causal"], ["false"])


class PlanTest(absltest.TestCase):

  def test_plan_covers_every_combination_once(self):
    runs = ablate.plan(["gru4rec", "sasrec"], ["minilm", "llm_pooled"], ["paper", "gate"], [0, 1],
                       variants=list(slim.MODES))
    names = [run.name for run in runs]
    self.assertLen(set(names), len(names))
    # per seed and backbone: plain + 2 encoders x (item_text, item_text_permuted, 2 id_based,
    # shuffled, constant_rationale, history_text, teacher); per seed and encoder: id_agnostic;
    # per encoder: one zero_shot; one popularity.
    self.assertLen(runs, 2 * 2 * (1 + 2 * 8) + 2 * 2 + 2 + 1)
    self.assertEqual({run.mode for run in runs}, set(slim.MODES))
    controls = [run for run in runs if run.mode in ("shuffled", "constant_rationale",
                                                    "history_text", "teacher_rationales")]
    self.assertTrue(all(run.fusion == "paper" for run in controls))
    self.assertEqual({run.fusion for run in runs if run.mode == "id_based"}, {"paper", "gate"})
    self.assertIn("gru4rec_plain_s0", names)
    self.assertIn("sasrec_id_based_gate_llm_pooled_read-causal_s1", names)
    self.assertIn("gru4rec_item_text_minilm_s0", names)
    self.assertIn("zero_shot_minilm_s0", names)

  def test_schedules_and_item_text_inputs_beyond_the_main_one(self):
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0], list(slim.MODES),
                       schedules=["causal", "paper"], item_text_inputs=["false", "true"])
    names = [run.name for run in runs]
    self.assertLen(set(names), len(names))
    by_mode = lambda mode: {(run.schedule, run.item_text_input) for run in runs
                            if run.mode == mode}
    both = {("causal", "false"), ("paper", "false"), ("causal", "true"), ("paper", "true")}
    self.assertEqual(by_mode("id_based"), both)
    self.assertEqual(by_mode("history_text"), {("causal", "false"), ("paper", "false")})
    self.assertEqual(by_mode("item_text"), {(NONE, "false"), (NONE, "true")})
    for mode in ("shuffled", "constant_rationale", "teacher_rationales"):
      self.assertEqual(by_mode(mode), {("causal", "false")})
    self.assertEqual(by_mode("item_text_permuted"), {(NONE, "false")})
    self.assertEqual(by_mode("plain"), {(NONE, NONE)})
    self.assertEqual(by_mode("id_agnostic"), {("causal", NONE)})
    self.assertIn("gru4rec_id_based_paper_minilm_read-paper_textinput_s0", names)

  def test_plan_keeps_the_variants_asked_for_and_refuses_unknown_values(self):
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0, 1], variants=["plain", "item_text"])
    self.assertEqual([run.mode for run in runs], ["plain", "item_text"] * 2)
    with self.assertRaisesRegex(ValueError, "backbone_plus"):
      ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0], variants=["backbone_plus"])
    with self.assertRaisesRegex(ValueError, "--schedules: 'leaky'"):
      ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0], ["id_based"], schedules=["leaky"])
    with self.assertRaisesRegex(ValueError, "--item_text_inputs"):
      ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0], ["id_based"], item_text_inputs=["1"])
    with self.assertRaisesRegex(ValueError, "minilm_sphere"):
      ablate.plan(["gru4rec"], ["minilm_sphere"], ["paper"], [0], ["id_based"])

  def test_encoder_names(self):
    self.assertEqual(ablate.encoder_setting("minilm"), ("minilm", "none", False))
    self.assertEqual(ablate.encoder_setting("minilm_center"), ("minilm", "center", False))
    self.assertEqual(ablate.encoder_setting("minilm_whiten"), ("minilm", "whiten", False))
    self.assertEqual(ablate.encoder_setting("llm_pooled"), ("llm_pooled", "none", False))
    self.assertEqual(ablate.encoder_setting("minilm_finetuned"), ("minilm", "none", True))
    self.assertEqual(ablate.encoder_setting("minilm_aligned_whiten"),
                     ("minilm_aligned", "whiten", False))

  def test_run_config_carries_every_setting(self):
    cfg = config_lib.Config()
    run = ablate.Run("sasrec", "id_based", "gate", "minilm_whiten", "paper", "true", 3)
    written = ablate.run_config(run, cfg)
    self.assertEqual((written.rec.backbone, written.rec.seed), ("sasrec", 3))
    self.assertEqual((written.encoder.kind, written.encoder.postprocess), ("minilm", "whiten"))
    self.assertEqual((written.slim.fusion, written.slim.rationale_schedule,
                      written.slim.item_text_input, written.slim.modes),
                     ("gate", "paper", True, ("id_based",)))
    plain = ablate.run_config(ablate.Run("sasrec", "plain", NONE, NONE, NONE, NONE, 0), cfg)
    self.assertEqual((plain.slim.fusion, plain.slim.rationale_schedule), ("paper", "causal"))
    self.assertTrue(ablate.run_config(
        ablate.Run("sasrec", "id_based", "paper", "minilm_finetuned", "causal", "false", 0),
        cfg).slim.finetune_encoder)


class OrderTest(absltest.TestCase):

  def test_seed_order_completes_seeds_and_starts_with_the_primary_runs(self):
    runs = ablate.plan(["gru4rec", "sasrec"], ["minilm", "llm_pooled"], ["paper", "gate"],
                       [0, 1, 2], list(slim.MODES), ["causal", "paper"])
    ordered = ablate.order(runs, "seed", ablate.main_settings(["minilm"], ["paper"], ["causal"],
                                                              ["false"]))
    self.assertCountEqual(ordered, runs)
    seeds = [run.seed for run in ordered]
    self.assertEqual(seeds, sorted(seeds))  # stopped anywhere: every earlier seed complete
    primary = {mode for pair in stats.PRIMARY_CONTRASTS for mode in pair}
    first = ordered[:2 * len(primary)]  # seed 0's primary runs at the main settings, per backbone
    self.assertEqual({run.mode for run in first}, primary)
    self.assertTrue(all(ablate.at_main(run.fields, MAIN) for run in first))

  def test_group_order_keeps_a_groups_seeds_together(self):
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0, 1], ["plain", "item_text",
                                                                     "item_text_permuted"])
    ordered = ablate.order(runs, "group", MAIN)
    self.assertEqual([(run.mode, run.seed) for run in ordered],
                     [("plain", 0), ("plain", 1), ("item_text", 0), ("item_text", 1),
                      ("item_text_permuted", 0), ("item_text_permuted", 1)])


class CacheTest(absltest.TestCase):
  """A run is reused only from a directory holding its config hash; any other trains anew."""

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(self.create_tempdir().full_path)
    self.run = ablate.Run("gru4rec", "item_text", NONE, "minilm", NONE, "false", 0)
    self.cfg = ablate.run_config(self.run, config_lib.Config())

  def train(self, cfg, directory, trained):
    """execute() with a stand-in trainer that records what it trained and writes its files."""
    def fake(rec_cfg, prepared, out, *args):
      trained.append((rec_cfg.epochs, out))
      _write_run(pathlib.Path(out), {"test": {"ndcg@10": rec_cfg.epochs}}, np.zeros(3))
      return {"trained": rec_cfg.epochs}
    with mock.patch.object(ablate.recommend, "train_recommender", fake):
      return ablate.execute(self.run, cfg, directory, self.root, None,
                            {("minilm", "none"): object()}, None, None)

  def test_hash_follows_the_config_and_the_mode(self):
    digest = ablate.config_hash(self.cfg, "item_text")
    self.assertEqual(digest, ablate.config_hash(ablate.run_config(self.run, config_lib.Config()),
                                                "item_text"))
    self.assertNotEqual(digest, ablate.config_hash(self.cfg, "id_based"))
    longer = config_lib.apply_overrides(self.cfg, ["rec.epochs=7"])
    self.assertNotEqual(digest, ablate.config_hash(longer, "item_text"))
    self.assertLen(digest, 64)

  def test_reused_when_the_hash_matches_retrained_when_stale(self):
    runs_root, trained = self.root / "runs", []
    digest = ablate.config_hash(self.cfg, "item_text")
    directory = ablate.run_directory(runs_root, self.run.name, digest)
    self.assertEqual(directory, runs_root / "gru4rec_item_text_minilm_s0")
    self.assertEqual(self.train(self.cfg, directory, trained), {"trained": self.cfg.rec.epochs})
    self.assertEqual((directory / ablate.CONFIG_HASH).read_text().strip(), digest)
    # The same config: found in the same directory, read, not trained again.
    self.assertEqual(ablate.run_directory(runs_root, self.run.name, digest), directory)
    self.assertEqual(self.train(self.cfg, directory, trained),
                     {"test": {"ndcg@10": self.cfg.rec.epochs}})
    self.assertLen(trained, 1)
    # Another setting: a fresh directory named by its hash; the old run stays as it was.
    changed = config_lib.apply_overrides(self.cfg, ["rec.epochs=7"])
    other = ablate.config_hash(changed, "item_text")
    fresh = ablate.run_directory(runs_root, self.run.name, other)
    self.assertEqual(fresh, runs_root / f"gru4rec_item_text_minilm_s0_{other[:12]}")
    self.assertEqual(self.train(changed, fresh, trained), {"trained": 7})
    self.assertEqual(trained[-1], (7, fresh))
    self.assertEqual(json.loads((directory / layout.METRICS).read_text())["test"]["ndcg@10"],
                     self.cfg.rec.epochs)
    # Both are found again, each by its own hash.
    self.assertEqual(ablate.run_directory(runs_root, self.run.name, digest), directory)
    self.assertEqual(ablate.run_directory(runs_root, self.run.name, other), fresh)

  def test_a_finished_run_of_another_sweep_is_found_by_its_hash(self):
    digest = ablate.config_hash(self.cfg, "item_text")
    elsewhere = ablate.run_directory(self.root / "main_sweep" / "runs", self.run.name, digest)
    self.assertEqual(ablate.finished_runs(self.root), {})  # no run yet
    elsewhere.mkdir(parents=True)
    (elsewhere / ablate.CONFIG_HASH).write_text(digest + "\n")
    self.assertEqual(ablate.finished_runs(self.root), {})  # started, not finished
    _write_run(elsewhere, {"test": {"ndcg@10": 0.5}}, np.zeros(3))
    self.assertEqual(ablate.finished_runs(self.root), {digest: elsewhere})

  def test_a_run_without_a_recorded_hash_is_not_reused(self):
    legacy = self.root / "runs" / self.run.name
    _write_run(legacy, {"test": {"ndcg@10": 0.5}}, np.zeros(3))  # from before config hashes
    digest = ablate.config_hash(self.cfg, "item_text")
    directory = ablate.run_directory(self.root / "runs", self.run.name, digest)
    self.assertNotEqual(directory, legacy)
    self.assertFalse(ablate.is_complete(directory))

  def test_a_hash_prefix_of_another_config_is_refused(self):
    digest = ablate.config_hash(self.cfg, "item_text")
    (self.root / "runs" / self.run.name).mkdir(parents=True)
    clash = self.root / "runs" / f"{self.run.name}_{digest[:12]}"
    clash.mkdir()
    (clash / ablate.CONFIG_HASH).write_text("0" * 64)
    with self.assertRaisesRegex(RuntimeError, "another config"):
      ablate.run_directory(self.root / "runs", self.run.name, digest)


def _result(ndcg: float, history_share: float | None = None) -> dict:
  test = {"ndcg@10": ndcg, "hr@10": 2 * ndcg,
          "sampled100_uniform": {"ndcg@10": 3 * ndcg, "hr@10": 4 * ndcg}}
  if history_share is not None:
    test[ablate.HISTORY_SHARE] = history_share
  return {"test": test}


def _write_run(directory: pathlib.Path, result: dict, ranks: np.ndarray) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / layout.METRICS).write_text(json.dumps(result))
  np.savez(directory / layout.RANKED_TEST, users=np.arange(len(ranks)), ranks=ranks,
           sampled_ranks=ranks, negatives=np.zeros((len(ranks), 100), np.int32))


class SummaryTest(absltest.TestCase):

  def test_standard_deviation_over_seeds_has_one_degree_of_freedom_less(self):
    runs = [ablate.Run("gru4rec", "plain", NONE, NONE, NONE, NONE, seed) for seed in range(3)]
    values = [0.05, 0.06, 0.08]
    (row,) = ablate.summarize(runs, [_result(v) for v in values])
    self.assertAlmostEqual(row["full/ndcg@10_std"], np.std(values, ddof=1))
    self.assertAlmostEqual(row["full/ndcg@10_std"], 0.0152753, places=6)
    table = ablate.markdown([row], [], [], "100 uniform negatives", MAIN)
    self.assertIn("| 0.0633 ± 0.0153 |", table)
    (single,) = ablate.summarize(runs[:1], [_result(0.05)])
    self.assertIsNone(single["full/ndcg@10_std"])
    table = ablate.markdown([single], [], [], "100 uniform negatives", MAIN)
    self.assertIn("| 1 | 0.0500 | 0.1000 | 0.1500 | 0.2000 |", table)
    self.assertNotIn("±", table)

  def test_history_share_is_a_column_when_runs_report_it(self):
    runs = [ablate.Run("gru4rec", "plain", NONE, NONE, NONE, NONE, seed) for seed in range(2)]
    old = ablate.summarize(runs, [_result(0.05), _result(0.06)])
    self.assertNotIn(ablate.HISTORY_SHARE, old[0])
    self.assertNotIn("history share", ablate.markdown(old, [], [], "100 negatives", MAIN))
    new = ablate.summarize(runs, [_result(0.05, 0.1), _result(0.06, 0.3)])
    self.assertAlmostEqual(new[0][ablate.HISTORY_SHARE], 0.2)
    table = ablate.markdown(new + old, [], [], "100 negatives", MAIN)
    self.assertIn("history share@10 |", table)
    self.assertIn("| 0.2000 ± 0.1414 |", table)

  def test_the_table_says_how_many_users_read_the_teachers_rationale(self):
    runs = [ablate.Run("gru4rec", "teacher_rationales", "paper", "minilm", "causal", "false",
                       seed) for seed in (0, 1)]
    results = [{**_result(0.1), "users_with_teacher_rationale": {"test": 47}}] * 2
    rows = ablate.summarize(runs, results)
    self.assertEqual(rows[0]["users_with_teacher_rationale"], {"test": 47})
    self.assertIn("gru4rec | teacher_rationales | paper | minilm | causal | false: 47 users read "
                  "the teacher's rationale instead of the student's (test split).",
                  ablate.markdown(rows, [], [], "100 uniform negatives", MAIN))


# Per-user hit rates of the synthetic sweep: item_text beats plain for the sparsest 40% of
# users; id_based adds to that for every user; shuffled, history_text, constant_rationale and
# item_text_permuted are item_text again; the paper's schedule (id_based, history_text) adds more.
RATES = {"plain": 0.2, "item_text": 0.2, "item_text_permuted": 0.2, "shuffled": 0.2,
         "history_text": 0.2, "constant_rationale": 0.2, "id_based": 0.28}
SPARSE_GAIN = {"plain": 0.0}  # the others: 0.3 for users < 200


def _synthetic_runs(backbones=("gru4rec", "sasrec"), seeds=range(5)):
  rng = np.random.default_rng(0)
  users = 500
  runs, results, per_user = [], [], []
  for seed in seeds:
    for backbone in backbones:
      for mode, rate in RATES.items():
        schedules = ["causal", "paper"] if mode in ablate.SCHEDULED else ["causal"]
        for schedule in schedules if mode in ablate.READERS else [NONE]:
          hits = rng.random(users) < rate + (0.15 if schedule == "paper" else 0.0)
          if mode != "plain":
            hits |= (np.arange(users) < 200) & (rng.random(users) < 0.3)
          values = dict(enumerate(np.where(hits, 0.5, 0.0)))
          fusion = "paper" if mode in ablate.READERS else NONE
          encoder, text_input = (NONE, NONE) if mode == "plain" else ("minilm", "false")
          runs.append(ablate.Run(backbone, mode, fusion, encoder, schedule, text_input, seed))
          results.append(_result(float(np.mean(list(values.values())))))
          per_user.append({"full": values, "sampled": values})
  return runs, results, per_user


class TableTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.lengths = np.arange(500) + 5  # user u has history length u + 5
    cls.runs, cls.results, cls.users = _synthetic_runs()
    cls.rows = ablate.summarize(cls.runs, cls.results)
    cls.compared = ablate.comparisons(cls.runs, cls.rows, cls.users, MAIN)
    cls.by_key = {(c["backbone"], c["variant"], c["schedule"], c["against"], c["protocol"]): c
                  for c in cls.compared}
    cls.keys = set(cls.by_key)

  def test_rows_average_seeds_under_both_protocols(self):
    plain = next(r for r in self.rows if r["variant"] == "plain" and r["backbone"] == "gru4rec")
    values = [r["test"]["ndcg@10"] for run, r in zip(self.runs, self.results)
              if run.mode == "plain" and run.backbone == "gru4rec"]
    self.assertEqual(plain["seeds"], 5)
    self.assertAlmostEqual(plain["full/ndcg@10"], np.mean(values))
    self.assertAlmostEqual(plain["full/ndcg@10_std"], np.std(values, ddof=1))
    self.assertAlmostEqual(plain["sampled/ndcg@10"], 3 * np.mean(values))
    self.assertAlmostEqual(plain["sampled/hr@10"], 4 * np.mean(values))

  def test_primary_contrasts_per_backbone_with_holm(self):
    primary = [c for c in self.compared if c["primary"]]
    for backbone in ("gru4rec", "sasrec"):
      for protocol in stats.PROTOCOLS:
        family = [c for c in primary if c["backbone"] == backbone and c["protocol"] == protocol]
        self.assertEqual([(c["variant"], c["against"]) for c in family],
                         list(stats.PRIMARY_CONTRASTS))
        self.assertTrue(all(c["schedule"] in (NONE, "causal") for c in family))
        np.testing.assert_allclose([c["p_users_adjusted"] for c in family],
                                   stats.holm([c["p_users"] for c in family]))
        np.testing.assert_allclose([c["p_seeds_adjusted"] for c in family],
                                   stats.holm([c["p_seeds"] for c in family]))
    better = self.by_key["gru4rec", "item_text", NONE, "plain", "full"]
    self.assertGreater(better["change"], 0.1)
    self.assertLess(better["p_users_adjusted"], 1e-3)
    self.assertLess(better["p_seeds_adjusted"], 0.05)
    self.assertGreater(better["low"], 0.0)  # the interval of the per-user gain excludes zero
    self.assertBetween(better["difference"], better["low"], better["high"])
    self.assertAlmostEqual(better["mde"],
                           stats.minimum_detectable_effect(better["low"], better["high"]))
    rationale = self.by_key["gru4rec", "id_based", "causal", "history_text", "full"]
    self.assertLess(rationale["p_users_adjusted"], 0.05)
    self.assertGreater(rationale["low"], 0.0)

  def test_controls(self):
    controls = [c for c in self.compared if not c["primary"]]
    np.testing.assert_allclose([c["p_users_adjusted"] for c in controls],
                               stats.adjusted([c["p_users"] for c in controls]))
    same = self.by_key["gru4rec", "shuffled", "causal", "plain", "full"]
    self.assertLess(same["p_users"], 1e-3)  # shuffled is item_text again, better than plain
    permuted = self.by_key["gru4rec", "item_text", NONE, "item_text_permuted", "full"]
    self.assertGreater(permuted["p_users"], 0.05)
    self.assertLessEqual(permuted["low"], 0.0)
    self.assertGreaterEqual(permuted["high"], 0.0)
    self.assertIn(("gru4rec", "id_based", "causal", "constant_rationale", "full"), self.keys)
    leak = self.by_key["gru4rec", "id_based", "paper", "schedule causal", "full"]
    self.assertLess(leak["p_users"], 1e-3)
    self.assertGreater(leak["change"], 0.2)
    # Under the paper's schedule id_based has no shuffled to meet (its controls run causal).
    self.assertNotIn(("gru4rec", "id_based", "paper", "shuffled", "full"), self.keys)
    self.assertIn(("gru4rec", "id_based", "paper", "history_text", "full"), self.keys)
    self.assertIn(("gru4rec", "history_text", "paper", "schedule causal", "full"), self.keys)
    self.assertNotIn(("gru4rec", "plain", NONE, "plain", "full"), self.keys)
    self.assertNotIn(("gru4rec", "plain", NONE, "shuffled", "full"), self.keys)
    # Each contrast once: the primary pairs are not repeated among the controls.
    self.assertLen(self.by_key, len(self.compared))

  def test_each_other_encoder_against_the_main_one(self):
    """An encoder ablation: each variant under another encoder meets the same variant under the
    main encoder among the controls; the primary family stays at the main encoder."""
    encoders = ["minilm", "minilm_whiten"]
    main = ablate.main_settings(encoders, ["paper"], ["causal"], ["false"])
    runs = ablate.plan(["sasrec"], encoders, ["paper"], range(3), ["plain", "item_text", "id_based"])
    rng = np.random.default_rng(3)
    results, users = [], []
    for run in runs:
      hits = rng.random(500) < (0.4 if run.encoder == "minilm_whiten" else 0.2)
      values = dict(enumerate(np.where(hits, 0.5, 0.0)))
      results.append(_result(float(np.mean(list(values.values())))))
      users.append({"full": values, "sampled": values})
    rows = ablate.summarize(runs, results)
    compared = ablate.comparisons(runs, rows, users, main)
    by_key = {(c["variant"], c["encoder"], c["against"], c["protocol"]): c for c in compared}
    for variant in ("item_text", "id_based"):
      whiten = by_key[variant, "minilm_whiten", "encoder minilm", "full"]
      self.assertFalse(whiten["primary"])
      self.assertGreater(whiten["low"], 0.0)
    self.assertTrue(all(c["encoder"] in (NONE, "minilm") for c in compared if c["primary"]))

  def test_markdown(self):
    table = ablate.markdown(self.rows, self.compared, [], "100 uniform negatives", MAIN)
    self.assertIn("Primary contrasts of NDCG@10 at encoder minilm, fusion paper, schedule causal, "
                  "item_text_input false:", table)
    self.assertIn("| backbone | contrast | seeds | users | MDE | protocol | change | "
                  "difference [95% CI] | p over seeds | Holm | p over users | Holm |", table)
    self.assertIn("| gru4rec | id_based vs history_text | 5 | 500 |", table)
    self.assertIn("no measurable difference", table)
    self.assertIn("| gru4rec | item_text | - | minilm | - | false | item_text_permuted | "
                  "full ranking |", table)
    self.assertIn("| gru4rec | id_based | paper | minilm | paper | false | schedule causal |",
                  table)

  def test_quintile_gains_show_where_the_gain_is(self):
    gains = ablate.quintile_gains(self.runs, self.rows, self.users, self.lengths)
    item_text = next(g for g in gains if g["variant"] == "item_text")["groups"]
    self.assertLen(item_text, 5)
    self.assertGreater(item_text[0]["low"], 0.0)  # users 0-99, the sparsest
    self.assertGreater(item_text[1]["low"], 0.0)
    self.assertLess(abs(item_text[4]["gain"]), 0.05)
    plot = pathlib.Path(self.create_tempdir().full_path) / "quintiles.png"
    ablate.plot_gains(plot, gains[:3])
    self.assertGreater(plot.stat().st_size, 1000)
    table = ablate.markdown(self.rows, [], gains, "100 uniform negatives", MAIN)
    self.assertIn("G0 (5-104)", table)


class TableOnlyTest(absltest.TestCase):
  """--table_only: the groups with a run for every seed, the others listed as missing."""

  def test_tables_from_the_runs_that_exist(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0, 1, 2],
                       ["plain", "item_text", "id_based", "shuffled"])
    directories = {run: root / "runs" / run.name for run in runs}
    rng = np.random.default_rng(1)
    absent = {ablate.Run("gru4rec", "shuffled", "paper", "minilm", "causal", "false", 2),
              ablate.Run("gru4rec", "id_based", "paper", "minilm", "causal", "false", 2)}
    for run in runs:
      if run not in absent:
        ranks = rng.integers(0, 30, 200)
        _write_run(directories[run], _result(float(np.mean(ranks < 10))), ranks)
    interrupted = directories[next(iter(absent))]
    interrupted.mkdir(parents=True)  # started, no metrics yet
    text = ablate.write_tables(root, runs, directories, MAIN, np.arange(200) + 5,
                               "100 uniform negatives")
    self.assertEqual(text + "\n", (root / "table.md").read_text())
    saved = json.loads((root / "table.json").read_text())
    self.assertEqual({row["variant"] for row in saved["rows"]}, {"plain", "item_text"})
    self.assertTrue(all(row["seeds"] == 3 for row in saved["rows"]))
    self.assertCountEqual(saved["missing"], [run.name for run in absent])
    self.assertEqual(saved["complete_seeds"], [0, 1])
    self.assertEqual(saved["main"], MAIN)
    self.assertEqual([(c["variant"], c["against"], c["primary"]) for c in saved["comparisons"]
                      if c["protocol"] == "full"], [("item_text", "plain", True)])
    self.assertIn("Not in the tables: the groups of these 2 missing runs: "
                  "gru4rec_id_based_paper_minilm_read-causal_s2, "
                  "gru4rec_shuffled_paper_minilm_read-causal_s2. Seeds complete for every run: "
                  "0, 1.", text)
    self.assertTrue((root / "quintiles.png").is_file())

  def test_main_tables_the_runs_of_this_config_and_trains_nothing(self):
    """--table_only end to end: each run is looked up by its config hash; a run directory from
    before config hashes is stale, so its run counts as missing."""
    workdir = pathlib.Path(self.create_tempdir().full_path)
    rng = np.random.default_rng(2)
    prepared = fixtures.prepared_from_sequences([rng.integers(1, 40, 8) for _ in range(60)], 40)
    cfg = config_lib.from_flags(ablate._CONFIG.default, ["rec.epochs=3"])
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0, 1], ["plain", "item_text"])
    stale = runs[3]  # item_text, seed 1
    for run in runs:
      digest = ablate.config_hash(ablate.run_config(run, cfg), run.mode)
      directory = ablate.run_directory(workdir / "ablations" / "runs", run.name, digest)
      _write_run(directory, _result(0.1), rng.integers(0, 20, 60))
      if run != stale:
        (directory / ablate.CONFIG_HASH).write_text(digest + "\n")
    with flagsaver.flagsaver(workdir=str(workdir), backbones=["gru4rec"], seeds=["0", "1"],
                             variants=["plain", "item_text"], set=["rec.epochs=3"],
                             table_only=True), \
        mock.patch.object(ablate.pipeline, "load_prepared", return_value=prepared), \
        mock.patch.object(ablate.recommend, "train_recommender") as train:
      ablate.main([])
    train.assert_not_called()
    saved = json.loads((workdir / "ablations" / "table.json").read_text())
    self.assertEqual([(row["variant"], row["seeds"]) for row in saved["rows"]], [("plain", 2)])
    self.assertEqual(saved["missing"], [stale.name])
    self.assertEqual(saved["complete_seeds"], [0])

  def test_complete_groups_and_seeds(self):
    runs = ablate.plan(["gru4rec"], ["minilm"], ["paper"], [0, 1], ["plain", "item_text"])
    present = set(runs) - {runs[3]}  # item_text, seed 1
    kept, missing = ablate.complete_groups(runs, present)
    self.assertEqual([run.mode for run in kept], ["plain", "plain"])
    self.assertEqual(missing, [runs[3]])
    self.assertEqual(ablate.complete_seeds(runs, present), [0])


if __name__ == "__main__":
  absltest.main()
