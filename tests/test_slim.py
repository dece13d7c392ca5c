"""SLIM's recommenders: fusion shapes and masking, the shuffled control, ID-agnostic ranking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from slim_jax import assets, embed, encode, parallel
from slim_jax.data import loader
from slim_jax.data.side_inputs import derangement, shuffled_sources, side_inputs, teacher_users
from slim_jax.models import bert, slim
from slim_jax.models.backbone import last_column
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig
from slim_jax.train import recommend
from tests.fixtures import prepared_from_sequences

NUM_ITEMS, NUM_USERS, DIM = 30, 5, 8
INPUTS = jnp.array([[0, 0, 3, 7, 3, 9], [4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 21],
                    [0, 0, 0, 1, 2, 3]], jnp.int32)
USERS = jnp.array([0, 1, 2, -1], jnp.int32)  # -1: a padding row of an evaluation batch
CFG = RecConfig(backbone="sasrec", hidden=16, max_len=6, inner=32).resolved()
# One sequence per user, of different lengths: the causal schedule's cut-offs depend on them.
PREPARED = prepared_from_sequences([np.arange(1, 1 + n) + u for u, n in enumerate((8, 11, 5, 14,
                                                                                   9))], NUM_ITEMS)
PAPER = {"rationale_schedule": "paper"}


def _encoded(seed: int = 0, present=(True, True, False, True, True)):
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(NUM_USERS, DIM)).astype(np.float32)
  item_text = rng.normal(size=(NUM_ITEMS + 1, DIM)).astype(np.float32)
  return encode.Encoded(item_text, {"valid": (vectors, np.array(present))})


def _model(mode, backbone="sasrec", encoded=None, **slim_fields):
  """A model of `mode` with its training side inputs (the paper's schedule unless asked)."""
  cfg = dataclasses.replace(CFG, backbone=backbone)
  slim_cfg = SlimConfig(**{**PAPER, **slim_fields})
  model = recommend.build_model(cfg, NUM_ITEMS, mode=mode, slim=slim_cfg)
  side = side_inputs(encoded or _encoded(), PREPARED, model.rows, slim_cfg, mode)
  side = jax.tree.map(jnp.asarray, side["train"])
  params = model.init(jax.random.key(0), INPUTS, USERS, side)
  return model, params, side


def _read(model, params, side, users=USERS, inputs=INPUTS, positions=None, train=False,
          **apply):
  """The raw text vectors [B, D] each row's last column reads (identity projection)."""
  return model.apply(params, inputs, users, side, train, last_column(inputs), positions,
                     lambda x: x, method="user_text", **apply)[:, 0]


def _param_paths(params) -> set[str]:
  return {"/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(params["params"])}


def _dense(params, x):
  return x @ params["kernel"] + params["bias"]


class FusionTest(parameterized.TestCase):

  @parameterized.product(fusion=slim.FUSIONS, backbone=("sasrec", "gru4rec", "srgnn", "bert4rec"),
                         mode=("item_text", "id_based"))
  def test_shapes(self, fusion, backbone, mode):
    model, params, side = _model(mode, backbone, fusion=fusion)
    states, table = model.apply(params, INPUTS, USERS, side)
    steps = 1 if backbone == "srgnn" else INPUTS.shape[1]
    self.assertEqual(states.shape, (4, steps, 16))
    self.assertEqual(table.shape, (model.rows, 16))
    state, _ = model.apply(params, INPUTS, USERS, side, method="predict")
    self.assertEqual(state.shape, (4, 16))
    self.assertTrue(np.isfinite(np.asarray(state)).all())

  def test_paper_fusion_shares_g_l_and_g_f_between_item_and_user(self):
    """z_i = g_f([g_l(z_text_i); z_id_i]) and s_u = g_f([g_l(s_text_u); s_seq_u]), one g_l and
    one g_f (§2.3), recomputed here from the parameters."""
    model, params, side = _model("id_based", "gru4rec")
    self.assertEqual(model.cfg.fusion, "paper")
    p = params["params"]
    backbone = recommend.build_backbone(dataclasses.replace(CFG, backbone="gru4rec"), NUM_ITEMS)
    seq_state, id_table = backbone.apply({"params": p["backbone"]}, INPUTS, method="predict")
    g_l = lambda x: _dense(p["text_proj"], x)
    g_f = lambda text, ids: _dense(p["fuse_proj"], jnp.concatenate([text, ids], -1))
    rationale = _read(model, params, side)
    state, table = model.apply(params, INPUTS, USERS, side, method="predict")
    np.testing.assert_allclose(table, g_f(g_l(side["item_text"]), id_table), atol=1e-5)
    np.testing.assert_allclose(state, g_f(g_l(rationale), seq_state), atol=1e-5)
    self.assertEqual(_param_paths(params) - {p for p in _param_paths(params)
                                             if p.startswith("backbone/")},
                     {"text_proj/kernel", "text_proj/bias", "fuse_proj/kernel", "fuse_proj/bias"})

  @parameterized.parameters(*slim.FUSIONS)
  def test_a_rationale_changes_only_its_users_state(self, fusion):
    model, params, side = _model("id_based", fusion=fusion)
    predict = lambda side: np.asarray(model.apply(params, INPUTS, USERS, side, method="predict")[0])
    before = predict(side)
    changed = dict(side, rationale=side["rationale"].at[1].add(1.0))
    after = predict(changed)
    self.assertFalse(np.allclose(before[1], after[1]))
    np.testing.assert_array_equal(np.delete(before, 1, 0), np.delete(after, 1, 0))

  def test_item_text_reads_no_rationale(self):
    """backbone+: no parameter beyond g_l and g_f of the item side, no rationale in its side
    inputs, and the same scores whatever the rationales are."""
    model, params, side = _model("item_text")
    self.assertEqual(set(side), {"item_text"})
    self.assertEqual({p for p in _param_paths(params) if not p.startswith("backbone/")},
                     {"text_proj/kernel", "text_proj/bias", "fuse_proj/kernel", "fuse_proj/bias"})
    scores = lambda side: np.asarray(jnp.einsum("bh,rh->br", *model.apply(
        params, INPUTS, USERS, side, method="predict")))
    other = side_inputs(_encoded(present=(False,) * NUM_USERS), PREPARED, model.rows,
                        SlimConfig(), "item_text")["train"]
    np.testing.assert_array_equal(scores(side), scores(jax.tree.map(jnp.asarray, other)))
    id_based = jax.tree.map(jnp.asarray, side_inputs(_encoded(), PREPARED, model.rows,
                                                     SlimConfig(**PAPER), "id_based")["train"])
    np.testing.assert_array_equal(scores(side), scores(id_based))  # extra keys are never read
    plain_state, plain_table = recommend.build_backbone(CFG, NUM_ITEMS).apply(
        {"params": params["params"]["backbone"]}, INPUTS, method="predict")
    state, table = model.apply(params, INPUTS, USERS, side, method="predict")
    np.testing.assert_array_equal(state, plain_state)  # the user side is the backbone's
    self.assertFalse(np.allclose(table, plain_table))

  def test_users_without_a_rationale_read_zeros(self):
    model, params, side = _model("id_based")
    vectors = _read(model, params, side)
    np.testing.assert_array_equal(vectors[2], 0.0)  # user 2 has none
    np.testing.assert_array_equal(vectors[3], 0.0)  # padding row
    np.testing.assert_array_equal(vectors[0], side["rationale"][0, 0])

  def test_plain_is_the_backbone_and_ignores_side_inputs(self):
    model, params, side = _model("plain")
    backbone = recommend.build_backbone(CFG, NUM_ITEMS)
    expected, _ = backbone.apply({"params": params["params"]["backbone"]}, INPUTS,
                                 method="predict")
    state, _ = model.apply(params, INPUTS, USERS, {}, method="predict")
    np.testing.assert_array_equal(state, expected)

  def test_id_agnostic_is_one_shared_map_without_item_ids(self):
    model, params, side = _model("id_agnostic")
    self.assertEqual(_param_paths(params), {"text_proj/kernel", "text_proj/bias"})
    state, table = model.apply(params, INPUTS, USERS, side, method="predict")
    g_t = lambda x: _dense(params["params"]["text_proj"], x)
    np.testing.assert_allclose(table, g_t(side["item_text"]), atol=1e-6)
    np.testing.assert_allclose(state[:2], g_t(side["rationale"][:2, 0]), atol=1e-6)
    np.testing.assert_allclose(state[2], g_t(jnp.zeros(DIM)), atol=1e-6)  # user 2: no rationale

  def test_zero_shot_scores_are_the_raw_vectors(self):
    model, params, side = _model("zero_shot")
    state, table = model.apply(params, INPUTS, USERS, side, method="predict")
    np.testing.assert_array_equal(state[:2], side["rationale"][:2, 0])
    np.testing.assert_array_equal(table, side["item_text"])
    self.assertEmpty(jax.tree.leaves(params))

  def test_popularity_scores_training_counts(self):
    model, params, side = _model("popularity")
    state, table = model.apply(params, INPUTS, USERS, side, method="predict")
    np.testing.assert_array_equal((state @ table.T)[0, :NUM_ITEMS + 1],
                                  PREPARED.item_popularity())
    self.assertEmpty(jax.tree.leaves(params))

  def test_modes_that_need_rationales_say_which_stage_to_run(self):
    no_rationales = encode.Encoded(np.ones((NUM_ITEMS + 1, DIM), np.float32), {})
    for mode in ("id_based", "shuffled", "constant_rationale", "id_agnostic", "zero_shot"):
      with self.assertRaisesRegex(ValueError, "--stages=generate,encode"):
        side_inputs(no_rationales, PREPARED, 32, SlimConfig(), mode)
    with self.assertRaisesRegex(ValueError, "--stages=teacher,encode"):
      side_inputs(_encoded(), PREPARED, 32, SlimConfig(), "teacher_rationales")
    with self.assertRaisesRegex(ValueError, "--stages=encode"):
      side_inputs(None, PREPARED, 32, SlimConfig(), "item_text")
    self.assertEqual(set(side_inputs(no_rationales, PREPARED, 32, SlimConfig(),
                                     "item_text")["test"]), {"item_text"})
    # The causal schedule names the stage and the settings when cut-off rationales are missing.
    with self.assertRaisesRegex(ValueError, "generate,encode with prompt.history=causal"):
      side_inputs(_encoded(), PREPARED, 32, SlimConfig(), "id_based")

  def test_rationale_dropout_zeroes_some_training_rows(self):
    model, params, side = _model("id_based", rationale_dropout=0.5)
    users = jnp.zeros(256, jnp.int32)
    vectors = _read(model, params, side, users, jnp.ones((256, 6), jnp.int32), train=True,
                    rngs={"dropout": jax.random.key(1)})
    dropped = np.asarray((vectors == 0).all(-1)).mean()
    self.assertBetween(dropped, 0.35, 0.65)


class SideInputsTest(absltest.TestCase):

  def test_derangement_moves_everyone(self):
    for count in (2, 3, 10, 943):
      permutation = derangement(count, seed=count)
      self.assertEqual(sorted(permutation), list(range(count)))
      self.assertFalse((permutation == np.arange(count)).any())

  def test_every_user_gets_another_users_rationale(self):
    present = np.array([True, True, False, True, True, False])
    source = shuffled_sources(present, seed=0)
    owners = np.flatnonzero(present)
    np.testing.assert_array_equal(present[source], present)
    self.assertFalse((source[owners] == owners).any())
    self.assertCountEqual(source[owners], owners)
    np.testing.assert_array_equal(source[~present], np.flatnonzero(~present))

  def test_side_inputs_per_split(self):
    vectors, present = np.eye(3, dtype=np.float32), np.ones(3, bool)
    test_vectors = 2 * vectors
    prepared = prepared_from_sequences([np.array([1, 2, 3, 4])] * 3, 4)
    sides = side_inputs(encode.Encoded(np.ones((5, 3), np.float32), {
        "valid": (vectors, present), "test": (test_vectors, present)}), prepared, 7,
        SlimConfig(**PAPER), "id_based")
    np.testing.assert_array_equal(sides["train"]["rationale"][:, 0], vectors)
    np.testing.assert_array_equal(sides["test"]["rationale"][:, 0], test_vectors)
    np.testing.assert_array_equal(sides["train"]["rationale_cutoff"], 0)  # every row reads it
    self.assertEqual(sides["valid"]["item_text"].shape, (7, 3))
    np.testing.assert_array_equal(sides["valid"]["item_text"][5:], 0.0)
    tokens = (np.arange(3)[:, None] * np.ones((1, 4), np.int32), np.full(3, 4, np.int32))
    shuffled = side_inputs(
        encode.Encoded(np.ones((5, 3), np.float32), {"valid": (vectors, present)},
                       {"valid": tokens}), prepared, 7,
        SlimConfig(finetune_encoder=True, **PAPER), "shuffled")["test"]
    self.assertFalse((shuffled["rationale"][:, 0] == vectors).all(1).any())
    # the token ids move with the vectors: user u reads the tokens of the user whose vector it has
    np.testing.assert_array_equal(shuffled["rationale_ids"][:, 0, 0],
                                  shuffled["rationale"][:, 0].argmax(1))


  def test_teacher_rationales_replace_the_students_where_the_teacher_wrote_one(self):
    student, has_student = np.eye(4, dtype=np.float32), np.array([True, True, False, True])
    teacher, has_teacher = 5 * np.eye(4, dtype=np.float32), np.array([False, True, True, False])
    tokens = lambda vectors: (vectors.astype(np.int32), np.full(4, 4, np.int32))
    encoded = encode.Encoded(np.ones((5, 4), np.float32), {"valid": (student, has_student)},
                             {"valid": tokens(student)}, {"valid": (teacher, has_teacher)},
                             {"valid": tokens(teacher)})
    prepared = prepared_from_sequences([np.array([1, 2, 3, 4])] * 4, 4)
    side = side_inputs(encoded, prepared, 7, SlimConfig(finetune_encoder=True, **PAPER),
                       "teacher_rationales")["train"]
    np.testing.assert_array_equal(side["rationale"][:, 0], [student[0], teacher[1], teacher[2],
                                                            student[3]])
    np.testing.assert_array_equal(side["rationale_cutoff"], 0)  # every user has one
    np.testing.assert_array_equal(side["rationale_ids"], side["rationale"])
    self.assertEqual(teacher_users(encoded), {"valid": 2})
    own = side_inputs(encoded, prepared, 7, SlimConfig(**PAPER), "id_based")["train"]
    np.testing.assert_array_equal(own["rationale"][:, 0], student)


def genre_prepared(num_users=60, num_items=80, genres=4, length=12, seed=0):
  """Each user watches items of one genre only, in random order: a sequence model barely helps,
  but the user's genre (their "rationale") and the items' genres (their "text") say it all."""
  rng = np.random.default_rng(seed)
  item_genre = np.arange(num_items) % genres
  user_genre = rng.integers(0, genres, num_users)
  seqs = [rng.choice(np.flatnonzero(item_genre == g), length, replace=False) + 1
          for g in user_genre]
  prepared = prepared_from_sequences(seqs, num_items)
  onehot = np.eye(genres, dtype=np.float32)
  item_vectors = np.concatenate([np.zeros((1, genres), np.float32), onehot[item_genre]])
  return prepared, encode.Encoded(item_vectors,
                                  {"valid": (onehot[user_genre], np.ones(num_users, bool))})


class IdAgnosticTrainingTest(parameterized.TestCase):

  @parameterized.parameters("zero_shot", "id_agnostic", "id_based")
  def test_rationales_beat_popularity_on_genre_data(self, mode):
    prepared, encoded = genre_prepared()
    cfg = RecConfig(backbone="gru4rec", hidden=16, max_len=10, gru_hidden=16, batch=16,
                    eval_batch=64, lr=1e-2, epochs=6, eval_every=3, sampled_negatives=20,
                    exclude_history=True)
    summary = recommend.train_recommender(cfg, prepared, self.create_tempdir().full_path,
                                          parallel.make_mesh({"data": -1}), mode,
                                          SlimConfig(**PAPER), encoded)
    # Nine unseen genre-mates are left at test time: a genre-aware ranker's HR@10 approaches 1.
    self.assertGreater(summary["test"]["hr@10"], summary["popularity_test"]["hr@10"] + 0.3)
    self.assertEqual(summary["mode"], mode)

  def test_popularity_mode_is_the_popularity_ranking(self):
    prepared, _ = genre_prepared()
    cfg = RecConfig(backbone="gru4rec", hidden=16, max_len=10, eval_batch=64,
                    sampled_negatives=20)
    summary = recommend.train_recommender(cfg, prepared, self.create_tempdir().full_path,
                                          parallel.make_mesh({"data": -1}), "popularity")
    for metric in ("hr@10", "ndcg@10", "mrr@20"):
      self.assertAlmostEqual(summary["test"][metric], summary["popularity_test"][metric])
    self.assertEqual(summary["steps"], 0)



class FinetunedEncoderTest(absltest.TestCase):
  """Ablation (b): MiniLM inside the recommender's step, trained with it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.minilm = bert.load(assets.path("minilm"))
    prepared, frozen = genre_prepared()
    genres = ("dramas", "comedies", "westerns", "cartoons")
    user_genre = frozen.rationales["valid"][0].argmax(1)
    texts = [f"This user watches {genres[g]} and will want more {genres[g]}." for g in user_genre]
    # The encode stage's own path: rows keyed by user id, token ids for the fine-tuned copy.
    cfg = embed.EncoderConfig(batch_size=8, max_len=32)
    stored = encode.encode_rationales(
        cfg, [{"user_id": user_id, "split": "valid", "text": text}
              for user_id, text in zip(prepared.user_ids, texts)],
        absltest.get_default_test_tmpdir() + "/finetune_vectors")
    rationales, tokens = encode.user_tables(stored, prepared)
    cls.vectors = stored["vectors"]
    # Item texts by the same encoder: the item side's g_l is the one the rationales go through.
    genre_vectors = embed.encode([f"A film among the {genre}." for genre in genres], cfg,
                                 absltest.get_default_test_tmpdir() + "/finetune_items")
    item_vectors = np.concatenate([np.zeros_like(genre_vectors[:1]),
                                   genre_vectors[frozen.item_vectors[1:].argmax(1)]])
    cls.prepared = prepared
    cls.encoded = encode.Encoded(item_vectors, rationales, tokens)
    cls.cfg = RecConfig(backbone="gru4rec", hidden=16, max_len=10, gru_hidden=16,
                        batch=16).resolved()
    cls.slim = SlimConfig(finetune_encoder=True, **PAPER)

  def build(self):
    model = recommend.build_model(self.cfg, self.prepared.num_items, mode="id_based",
                                  slim=self.slim, encoder=self.minilm)
    mesh = parallel.make_mesh({"data": -1})
    sides = recommend.device_sides(
        side_inputs(self.encoded, self.prepared, model.rows, self.slim, "id_based"), mesh)
    tx = recommend.optimizer(self.cfg, 10)
    state, shardings = recommend.init_state(model, tx, self.cfg, mesh, sides["train"],
                                            self.minilm.params)
    return model, mesh, sides, tx, state, shardings

  def test_starts_as_the_frozen_encoder_and_trains(self):
    model, mesh, sides, tx, state, shardings = self.build()
    users = jnp.arange(8, dtype=jnp.int32)
    vectors = _read(model, state.params, sides["train"], users, jnp.ones((8, 10), jnp.int32))
    np.testing.assert_allclose(vectors, self.vectors[:8], atol=1e-5)

    step = recommend.make_train_step(model, tx, self.cfg, shardings, mesh)
    batches, _ = loader.next_item_training(self.prepared, max_len=10, batch_size=16, seed=0,
                                           mesh=mesh, per_position=True)
    trained, metrics = step(state, next(batches), sides["train"])
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    before = state.params["params"]["rationale_encoder"]
    after = trained.params["params"]["rationale_encoder"]
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    self.assertTrue(changed["layer_0"]["query"]["kernel"])


if __name__ == "__main__":
  absltest.main()
