"""Recommender training: models that learn what popularity cannot (synthetic sequences; a short
MovieLens-100K run), BERT4Rec's masked task, determinism and resumption, the moving average, the
tracked test curve and the prefix finish."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
from absl.testing import absltest, parameterized

from slim_jax import assets, config, parallel
from slim_jax.data import formats, loader, preprocess
from slim_jax.data.preprocess import Prepared
from slim_jax.models.recommender import RecConfig
from slim_jax.train import recommend
from tests.fixtures import prepared_from_sequences


def synthetic_prepared(num_users=64, num_items=40, length=24, seed=0) -> Prepared:
  """Users walk the catalogue with their own stride (1, 2 or 3): the next item is predictable
  from the last two, which popularity cannot know."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, num_items, num_users)
  strides = rng.integers(1, 4, num_users)
  seqs = [(s + d * np.arange(length)) % num_items + 1 for s, d in zip(starts, strides)]
  return prepared_from_sequences(seqs, num_items)


TINY = RecConfig(hidden=16, max_len=10, inner=32, gru_hidden=32, batch=16, eval_batch=64,
                 lr=5e-3, patience=100, eval_every=2, sampled_negatives=10, seed=3)


class RecommenderTrainingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.prepared = synthetic_prepared()
    cls.mesh = parallel.make_mesh({"data": -1})

  @parameterized.parameters(
      ("sasrec", 8, dict(table_axis="tensor")),  # item-table rows (41, padded to 42) sharded
      ("gru4rec", 8, {}), ("gru4rec", 8, dict(ema_decay=0.9)), ("srgnn", 2, {}),
      ("bert4rec", 6, dict(lr=3e-3, dropout=0.1, attn_dropout=0.1)))  # RecBole's prefixes
  def test_learns_what_popularity_cannot(self, backbone, epochs, overrides):
    cfg = dataclasses.replace(TINY, backbone=backbone, epochs=epochs, **overrides)
    workdir = self.create_tempdir().full_path
    mesh = parallel.make_mesh({"data": 4, "tensor": 2}) if cfg.table_axis else self.mesh
    summary = recommend.train_recommender(cfg, self.prepared, workdir, mesh)
    self.assertGreater(summary["test"]["hr@10"], 2 * summary["popularity_test"]["hr@10"] + 0.1)
    written = json.loads((pathlib.Path(workdir) / "metrics.json").read_text())
    self.assertEqual(written["test"]["ndcg@10"], summary["test"]["ndcg@10"])
    self.assertLen(written["test"]["groups"], 5)
    self.assertIn("sampled10_uniform", written["test"])

  @parameterized.named_parameters(("next_item", 1.0, 0.2), ("every_item", 0.0, 1.0))
  def test_bert4rec_step_scores_its_masked_task(self, last_ratio, mask_ratio):
    """A BERT4Rec step's loss is the full encoder's on the masked window ending at the target:
    a next-item batch (mask_last_ratio=1) scores only the last column, a cloze batch the masked
    ones (mask_ratio=1 masks every item, so the draw is known)."""
    cfg = dataclasses.replace(TINY, backbone="bert4rec", train_mode="last_position",
                              mask_last_ratio=last_ratio, mask_ratio=mask_ratio, dropout=0.0,
                              attn_dropout=0.0).resolved()
    num_items = self.prepared.num_items
    model = recommend.build_model(cfg, num_items)
    tx = recommend.optimizer(cfg, 1)
    side = recommend.device_sides(None, self.mesh)["train"]
    state, shardings = recommend.init_state(model, tx, cfg, self.mesh, side)
    train = loader.training_part(self.prepared)
    rows, targets = loader.last_position_examples(train)
    pick = np.random.default_rng(0).choice(len(rows), cfg.batch, replace=False)
    batch = loader.last_position_batch(train, rows[pick], targets[pick], cfg.max_len)
    _, reported = recommend.make_train_step(model, tx, cfg, shardings, self.mesh)(state, batch,
                                                                                   side)
    window = np.concatenate([batch["inputs"][:, 1:], batch["targets"][:, None]], 1)
    masked = np.zeros_like(window, bool)
    masked[:, -1 if last_ratio else slice(None)] = True
    masked &= window > 0
    states, table = model.apply(state.params, np.where(masked, num_items + 1, window),
                                batch["users"], side)
    expected = recommend.recommender.loss(states[masked], table, window[masked], None, cfg,
                                          num_items)
    np.testing.assert_allclose(reported["loss"], expected, rtol=1e-5)

  def test_deterministic_and_resumable(self):
    """A run stopped half-way and resumed equals one uninterrupted run from the same seed."""
    cfg = dataclasses.replace(TINY, backbone="gru4rec", epochs=4)
    train = lambda cfg, workdir: recommend.train_recommender(cfg, self.prepared, workdir,
                                                             self.mesh)
    whole = train(cfg, self.create_tempdir().full_path)
    workdir = self.create_tempdir().full_path
    half = train(dataclasses.replace(cfg, epochs=2), workdir)
    resumed = train(cfg, workdir)
    self.assertEqual(resumed["history"][:len(half["history"])], half["history"])
    self.assertEqual(resumed["test"], whole["test"])
    self.assertEqual([r["valid/ndcg@10"] for r in resumed["history"]],
                     [r["valid/ndcg@10"] for r in whole["history"]])

  def test_moving_average_follows_each_step(self):
    cfg = dataclasses.replace(TINY, backbone="gru4rec", ema_decay=0.9).resolved()
    model = recommend.build_model(cfg, self.prepared.num_items)
    tx = recommend.optimizer(cfg, total_steps=3)
    side = recommend.device_sides(None, self.mesh)["train"]
    state, shardings = recommend.init_state(model, tx, cfg, self.mesh, side)
    step = recommend.make_train_step(model, tx, cfg, shardings, self.mesh)
    batches, _ = loader.next_item_training(self.prepared, max_len=cfg.max_len,
                                           batch_size=cfg.batch, seed=0, mesh=self.mesh,
                                           per_position=True)
    expected = state.params
    for _ in range(3):
      state, _ = step(state, next(batches), side)
      expected = jax.tree.map(lambda average, new: 0.9 * average + 0.1 * new, expected,
                              state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state.ema_params, expected)
    self.assertIs(state.eval_params, state.ema_params)

  def test_tracked_test_curve_meets_the_final_test(self):
    """track_test ranks the test users at every validation; at the best step that is the
    final test evaluation of the selected state."""
    cfg = dataclasses.replace(TINY, backbone="gru4rec", epochs=4, eval_every=1, track_test=True)
    summary = recommend.train_recommender(cfg, self.prepared, self.create_tempdir().full_path,
                                          self.mesh)
    self.assertLen(summary["history"], 4)
    best = next(r for r in summary["history"] if r["step"] == summary["best_step"])
    self.assertAlmostEqual(best["test/ndcg@10"], summary["test"]["ndcg@10"], places=6)
    self.assertAlmostEqual(best["test/hr@10"], summary["test"]["hr@10"], places=6)
    self.assertNotIn("test/ndcg@10", recommend.train_recommender(
        dataclasses.replace(cfg, track_test=False, epochs=1), self.prepared,
        self.create_tempdir().full_path, self.mesh)["history"][0])

  def test_prefix_finish_goes_on_from_the_best_window_state(self):
    """rec.finish_on_prefixes: prefixes train on from the windows' best state, the better phase's
    state is the one tested, and a finish added to a finished windows run equals one run."""
    cfg = dataclasses.replace(TINY, backbone="sasrec", epochs=2, eval_every=1, track_test=True,
                              finish_on_prefixes=True)
    train = lambda cfg, workdir: recommend.train_recommender(cfg, self.prepared, workdir,
                                                             self.mesh)
    whole = train(cfg, self.create_tempdir().full_path)
    self.assertEqual([r["phase"] for r in whole["history"]], [0, 0, 1, 1])
    elapsed = [r["elapsed_seconds"] for r in whole["history"]]
    self.assertEqual(elapsed, sorted(elapsed))
    best = max(reversed(whole["history"]), key=lambda r: r["valid/ndcg@10"])  # a tie: the later
    self.assertEqual(whole["phase"], best["phase"])
    self.assertAlmostEqual(whole["test"]["ndcg@10"], best["test/ndcg@10"], places=6)
    # From scratch, the first prefix epoch would validate exactly as a plain prefix run's.
    fresh = train(dataclasses.replace(cfg, train_mode="last_position", finish_on_prefixes=False,
                                      batch=None, epochs=1), self.create_tempdir().full_path)
    self.assertNotEqual(fresh["history"][0]["valid/ndcg@10"], whole["history"][2]["valid/ndcg@10"])
    workdir = self.create_tempdir().full_path
    train(dataclasses.replace(cfg, finish_on_prefixes=False), workdir)
    finished = train(cfg, workdir)
    untimed = lambda history: [{k: v for k, v in row.items()
                                if k not in ("elapsed_seconds", "eval_seconds")} for row in history]
    self.assertEqual(untimed(finished["history"]), untimed(whole["history"]))
    self.assertEqual(finished["test"], whole["test"])
    with self.assertRaisesRegex(ValueError, "finish_on_prefixes"):
      dataclasses.replace(cfg, train_mode="last_position").resolved()
    resolved = cfg.resolved()  # the prefix phase is resolved as it comes
    self.assertEqual(recommend.training_phases(resolved)[1], dataclasses.replace(
        resolved, train_mode="last_position", batch=None, finish_on_prefixes=False).resolved())


class MovieLensTest(absltest.TestCase):

  def test_short_run_clearly_beats_popularity(self):
    prepared = preprocess.prepare(formats.read_dataset("recbole", assets.path("ml-100k")),
                                  config.DataConfig())
    # 4 epochs: NDCG@10 2.5 times popularity's, HR@10 2.2 times (8 epochs: 2.7, 2.5).
    cfg = RecConfig(backbone="gru4rec", epochs=4, eval_every=4)
    one_device = parallel.make_mesh({"data": 1}, jax.devices()[:1])  # 8 tiny shards cost more
    summary = recommend.train_recommender(cfg, prepared, self.create_tempdir().full_path,
                                          one_device)
    popularity = summary["popularity_test"]
    self.assertGreater(summary["test"]["ndcg@10"], 1.5 * popularity["ndcg@10"])
    self.assertGreater(summary["test"]["hr@10"], 1.5 * popularity["hr@10"])
    self.assertEqual(summary["steps"], 4 * summary["steps_per_epoch"])


if __name__ == "__main__":
  absltest.main()
