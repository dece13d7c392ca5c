"""Sequential recommender backbones and their losses: shapes, masks, graphs, loss values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from slim_jax.checkpoints import recbole
from slim_jax.models import bert4rec, gru4rec, recommender, srgnn
from slim_jax.models.backbones import BACKBONES
from slim_jax.models.recommender import RecConfig
from slim_jax.train.recommend import build_backbone

NUM_ITEMS = 30
INPUTS = jnp.array([[0, 0, 0, 3, 7, 3, 9, 12],
                    [4, 5, 6, 7, 8, 9, 10, 11],
                    [0, 0, 0, 0, 0, 0, 0, 21]], jnp.int32)


def _model(backbone):
  """(params, model.apply) of a small backbone."""
  model = build_backbone(RecConfig(backbone=backbone, hidden=16, max_len=12, inner=32,
                                   gru_hidden=24).resolved(), NUM_ITEMS)
  return model.init(jax.random.key(0), INPUTS), model.apply


class BackboneTest(parameterized.TestCase):

  def test_gru_equals_torch_gru(self):
    """MaskedGRU is torch.nn.GRU (RecBole's layer) with the same weights, on unmasked columns."""
    import torch  # test-only reference
    x = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)
    gru = gru4rec.MaskedGRU(6)
    params = gru.init(jax.random.key(0), x, np.ones((3, 7), bool))["params"]["cell"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases
    ours = gru.apply({"params": {"cell": params}}, x, np.ones((3, 7), bool))
    gates = ("r", "z", "n")  # torch stacks the reset, update and new gates' rows
    weight = lambda side: np.concatenate([params[side + g]["kernel"].T for g in gates])
    bias = lambda side: np.concatenate([params[side + g].get("bias", np.zeros(6, np.float32))
                                        for g in gates])  # flax's hr, hz have no bias
    reference = torch.nn.GRU(5, 6, batch_first=True)
    with torch.no_grad():
      for name, value in (("weight_ih_l0", weight("i")), ("weight_hh_l0", weight("h")),
                          ("bias_ih_l0", bias("i")), ("bias_hh_l0", bias("h"))):
        getattr(reference, name).copy_(torch.from_numpy(np.asarray(value)))
      expected = reference(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)

  @parameterized.parameters("sasrec", "gru4rec", "srgnn", "bert4rec")
  def test_shapes(self, backbone):
    params, apply = _model(backbone)
    states, table = apply(params, INPUTS)
    steps = 1 if backbone == "srgnn" else INPUTS.shape[1]
    self.assertEqual(states.shape, (3, steps, 16))
    self.assertEqual(table.shape, (NUM_ITEMS + 1 + (backbone == "bert4rec"), 16))
    state, _ = apply(params, INPUTS, method="predict")
    self.assertEqual(state.shape, (3, 16))
    self.assertTrue(np.isfinite(np.asarray(state)).all())

  @parameterized.parameters("sasrec", "gru4rec", "srgnn", "bert4rec")
  def test_extra_left_padding_changes_nothing(self, backbone):
    params, apply = _model(backbone)
    padded = jnp.pad(INPUTS, ((0, 0), (4, 0)))
    state, _ = apply(params, INPUTS, method="predict")
    state_padded, _ = apply(params, padded, method="predict")
    # BERT4Rec's mask token pushes the oldest item of a full window (row 1) out; padding does not.
    rows = np.array([0, 2] if backbone == "bert4rec" else [0, 1, 2])
    np.testing.assert_allclose(state_padded[rows], state[rows], atol=1e-5)
    if backbone in ("sasrec", "gru4rec"):  # every real position, not just the last
      states, _ = apply(params, INPUTS)
      states_padded, _ = apply(params, padded)
      real = np.asarray(INPUTS > 0)
      np.testing.assert_allclose(np.asarray(states_padded[:, 4:])[real], np.asarray(states)[real],
                                 atol=1e-5)

  @parameterized.parameters("sasrec", "gru4rec")
  def test_no_position_sees_a_later_one(self, backbone):
    params, apply = _model(backbone)
    changed = INPUTS.at[:, 5:].set(jnp.array([1, 2, 13]))
    states, _ = apply(params, INPUTS)
    states_changed, _ = apply(params, changed)
    real = np.asarray(INPUTS[:, :5] > 0)  # padded positions are never read
    np.testing.assert_allclose(np.asarray(states_changed[:, :5])[real],
                               np.asarray(states[:, :5])[real], atol=1e-6)
    self.assertGreater(float(jnp.abs(states_changed[:, 5:] - states[:, 5:]).max()), 1e-3)

  def test_bert4rec_sees_both_directions(self):
    params, apply = _model("bert4rec")
    changed = INPUTS.at[1, 7].set(13)
    states, _ = apply(params, INPUTS)
    states_changed, _ = apply(params, changed)
    self.assertGreater(float(jnp.abs(states_changed[1, 0] - states[1, 0]).max()), 1e-4)

  def test_bert4rec_predicts_from_an_appended_mask_token(self):
    params, apply = _model("bert4rec")
    state, _ = apply(params, INPUTS, method="predict")
    shifted = jnp.concatenate([INPUTS[:, 1:], jnp.full((3, 1), NUM_ITEMS + 1)], 1)
    states, _ = apply(params, shifted)
    np.testing.assert_allclose(state, states[:, -1], atol=1e-5)

  def test_bert4rec_masks_only_real_items(self):
    inputs, targets = bert4rec.mask_items(jax.random.key(3), INPUTS, 0.5, NUM_ITEMS + 1)
    masked = np.asarray(inputs == NUM_ITEMS + 1)
    self.assertTrue(masked.any())
    np.testing.assert_array_equal(np.asarray(targets)[masked], np.asarray(INPUTS)[masked])
    np.testing.assert_array_equal(np.asarray(targets)[~masked], 0)
    np.testing.assert_array_equal(np.asarray(inputs)[~masked], np.asarray(INPUTS)[~masked])
    self.assertFalse(masked[np.asarray(INPUTS) == 0].any())

  def test_bert4rec_can_mask_only_the_last_item(self):
    """RecBole's ft_ratio: a batch that masks its last column asks exactly the next-item task."""
    inputs, targets = bert4rec.mask_last(INPUTS, NUM_ITEMS + 1)
    np.testing.assert_array_equal(inputs[:, :-1], INPUTS[:, :-1])
    np.testing.assert_array_equal(inputs[:, -1], NUM_ITEMS + 1)
    np.testing.assert_array_equal(targets, INPUTS[:, -1])

  @parameterized.parameters("sasrec", "gru4rec", "bert4rec")
  def test_columns_select_states(self, backbone):
    """Asking for some columns gives exactly their states (the last block computes only them)."""
    params, apply = _model(backbone)
    columns = jnp.array([[7, 3], [0, 5], [7, 7]], jnp.int32)
    states = apply(params, INPUTS)[0]
    np.testing.assert_allclose(apply(params, INPUTS, columns=columns)[0],
                               jnp.take_along_axis(states, columns[..., None], 1), atol=1e-5)

  @parameterized.parameters("sasrec", "gru4rec")
  def test_dropout_only_in_training(self, backbone):
    params, apply = _model(backbone)
    train = lambda seed: apply(params, INPUTS, train=True,
                                     rngs={"dropout": jax.random.key(seed)})[0]
    self.assertGreater(float(jnp.abs(train(1) - train(2)).max()), 1e-3)
    np.testing.assert_array_equal(apply(params, INPUTS)[0], apply(params, INPUTS)[0])

  @parameterized.parameters("sasrec", "bert4rec")
  def test_attention_dropout_differs_per_row(self, backbone):
    """Torch's dropout (RecBole) draws a mask per element; flax's default would share one
    [L, L] attention mask across the batch, correlating every row's noise."""
    model = build_backbone(RecConfig(backbone=backbone, hidden=16, max_len=12, inner=32,
                                     dropout=0.0, attn_dropout=0.5).resolved(), NUM_ITEMS)
    same_rows = jnp.tile(INPUTS[1:2], (2, 1))
    params = model.init(jax.random.key(0), same_rows)
    states = model.apply(params, same_rows, train=True, rngs={"dropout": jax.random.key(1)})[0]
    self.assertGreater(float(jnp.abs(states[0] - states[1]).max()), 1e-3)


class SessionGraphTest(absltest.TestCase):

  def test_graph_with_repeats(self):
    # 5 -> 6 -> 5 -> 6 -> 7: the edge 5 -> 6 repeats and counts once, as in RecBole.
    node, in_weight, out_weight = srgnn.session_graph(jnp.array([[0, 0, 5, 6, 5, 6, 7]]))
    np.testing.assert_array_equal(node[0], [0, 0, 2, 3, 2, 3, 6])
    # edges: 0->0, 0->5 (padding), 5->6, 6->5, 5->6 (repeat), 6->7; each target has in-degree 1,
    # 6 has two successors
    np.testing.assert_allclose(in_weight[0], [0, 0, 1, 1, 0, 1])
    np.testing.assert_allclose(out_weight[0], [0, 0, 1, 0.5, 0, 0.5])

  def test_single_item_has_no_edges(self):
    node, in_weight, out_weight = srgnn.session_graph(jnp.array([[0, 0, 0, 9]]))
    np.testing.assert_array_equal(node[0], [0, 0, 0, 3])
    self.assertEqual(float(jnp.abs(in_weight).sum() + jnp.abs(out_weight).sum()), 0.0)

  def test_equals_recbole_srgnn(self):
    """Our SRGNN holding a torch RecBole SRGNN's weights (converted as for a RecBole checkpoint)
    gives its session states, with repeated items and edges, padding, and two graph steps."""
    import torch  # test-only reference

    from tests.srgnn_reference import SRGNN as RecBoleSRGNN
    rows = [[3, 7, 3, 9, 12, 7, 3, 9], [4, 5, 6, 7, 8, 9, 10, 11], [21], [5, 5, 6, 5, 6]]
    left = np.zeros((len(rows), 8), np.int32)
    right = np.zeros_like(left)
    for i, row in enumerate(rows):
      left[i, 8 - len(row):] = right[i, :len(row)] = row
    for steps in (1, 2):
      with self.subTest(steps=steps):
        torch.manual_seed(steps)
        reference = RecBoleSRGNN(NUM_ITEMS + 1, 16, steps).eval()
        with torch.no_grad():
          expected = reference(torch.from_numpy(right).long(), torch.tensor([len(r) for r in rows]))
        tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
        params = recbole.srgnn_params(tensors, np.arange(NUM_ITEMS + 1))
        model = build_backbone(
            RecConfig(backbone="srgnn", hidden=16, max_len=8, layers=steps).resolved(), NUM_ITEMS)
        state, _ = model.apply({"params": jax.tree.map(jnp.asarray, params)}, left,
                               method="predict")
        np.testing.assert_allclose(state, expected.numpy(), atol=1e-5)


class LossTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.states = jax.random.normal(jax.random.key(0), (4, 8))
    self.table = jax.random.normal(jax.random.key(1), (7, 8))  # 5 items + padding + 1 extra row
    self.targets = jnp.array([1, 5, 2, 0])

  def test_cross_entropy_is_a_softmax_over_items_and_padding(self):
    per = recommender.cross_entropy(self.states, self.table, self.targets, num_items=5)
    logits = np.asarray(self.states @ self.table[:6].T, np.float64)  # the extra row never counts
    expected = (np.log(np.exp(logits).sum(1)) - logits[np.arange(4), np.asarray(self.targets)])
    np.testing.assert_allclose(per, expected, rtol=1e-5)

  def test_zero_targets_carry_no_loss(self):
    cfg = RecConfig(loss="ce")
    full = recommender.loss(self.states, self.table, self.targets, jax.random.key(0), cfg, 5)
    per = recommender.cross_entropy(self.states, self.table, self.targets, 5)
    self.assertAlmostEqual(float(full), float(per[:3].mean()), places=5)

  def test_bpr_and_sampled_softmax_by_hand(self):
    negatives = jnp.array([[2, 3], [1, 5], [4, 4], [1, 1]])
    s = np.asarray(self.states @ self.table.T, np.float64)
    pos = s[np.arange(4), np.asarray(self.targets)]
    neg = np.take_along_axis(s, np.asarray(negatives), 1)
    np.testing.assert_allclose(recommender.bpr(self.states, self.table, self.targets, negatives),
                               np.log1p(np.exp(neg - pos[:, None])).mean(1), atol=1e-6)
    sampled = recommender.sampled_softmax(self.states, self.table, self.targets, negatives)
    neg[1, 1] = -np.inf  # the negative equal to the target is dropped
    expected = np.log(np.exp(pos) + np.exp(neg).sum(1)) - pos
    np.testing.assert_allclose(sampled, expected, atol=1e-6)

  def test_negatives_are_items(self):
    negatives = recommender.sample_negatives(jax.random.key(0), (1000,), 5)
    self.assertEqual(set(np.asarray(negatives).tolist()), {1, 2, 3, 4, 5})

  def test_losses_never_train_rows_past_the_catalogue(self):
    for loss in ("ce", "bpr", "sampled"):
      cfg = RecConfig(loss=loss, num_negatives=3)
      value = recommender.loss(self.states, self.table, self.targets, jax.random.key(0), cfg, 5)
      grad = jax.grad(lambda t: recommender.loss(self.states, t, self.targets, jax.random.key(0),
                                                 cfg, 5))(self.table)
      self.assertTrue(np.isfinite(float(value)))
      self.assertEqual(float(jnp.abs(grad[6]).sum()), 0.0, loss)  # rows past the catalogue

  def test_scored_columns_keep_the_loss_of_every_target(self):
    states = jax.random.normal(jax.random.key(2), (3, 6, 8))
    targets = jnp.array([[0, 0, 0, 0, 3, 4], [1, 0, 2, 0, 0, 5], [0, 0, 0, 0, 0, 0]])
    inputs = jnp.ones_like(targets)  # rows of 6 columns
    columns, kept = recommender.scored_columns(inputs, targets, 3)
    self.assertEqual(columns.shape, (3, 3))
    self.assertEqual(sorted(np.asarray(kept[1]).tolist()), [1, 2, 5])
    np.testing.assert_array_equal(jnp.take_along_axis(targets, columns, 1), kept)
    kept_states = jnp.take_along_axis(states, columns[..., None], 1)
    cfg = RecConfig(loss="ce")
    full, scored = (recommender.loss(s.reshape(-1, 8), self.table, t.reshape(-1),
                                     jax.random.key(0), cfg, 5)
                    for s, t in ((states, targets), (kept_states, kept)))
    self.assertAlmostEqual(float(full), float(scored), places=5)
    _, newest = recommender.scored_columns(inputs, targets, 2)  # a row with more drops its oldest
    self.assertEqual(sorted(np.asarray(newest[1]).tolist()), [2, 5])
    columns, kept = recommender.scored_columns(inputs, targets, 6)  # all columns, in order
    np.testing.assert_array_equal(columns, jnp.tile(jnp.arange(6), (3, 1)))
    columns, kept = recommender.scored_columns(inputs, targets[:, -1], 3)  # one target: last column
    np.testing.assert_array_equal(columns, [[5], [5], [5]])
    np.testing.assert_array_equal(kept, [[4], [5], [0]])

  def test_targets_per_row(self):
    def per_row(**kw):
      cfg = RecConfig(**kw).resolved()
      return cfg.spec.task.targets_per_row(cfg)
    self.assertEqual(per_row(backbone="sasrec"), 10)  # a stride-10 window's last 10 columns
    self.assertEqual(per_row(backbone="gru4rec"), 50)  # tiled windows: every column
    self.assertEqual(per_row(backbone="bert4rec"), 10)  # RecBole's mask_item_length
    self.assertEqual(per_row(backbone="bert4rec", mask_ratio=1.0), 50)
    self.assertEqual(per_row(backbone="bert4rec", mask_ratio=0.0), 1)


class ConfigTest(absltest.TestCase):

  def test_backbone_defaults(self):
    self.assertEqual(RecConfig().resolved().dropout, 0.5)
    gru = RecConfig(backbone="gru4rec").resolved()
    self.assertEqual((gru.dropout, gru.layers, gru.batch), (0.3, 1, 8))
    self.assertEqual(RecConfig(backbone="srgnn").resolved().batch, 256)
    sasrec = RecConfig(backbone="sasrec").resolved()  # windows every 10 items: 5x the rows
    self.assertEqual((sasrec.stride, sasrec.batch), (10, 40))
    self.assertEqual(RecConfig(backbone="sasrec", stride=50).resolved().batch, 8)
    self.assertEqual(RecConfig(backbone="sasrec", dropout=0.2).resolved().dropout, 0.2)
    bert = RecConfig(backbone="bert4rec").resolved()  # RecBole's recipe: prefixes, last masks
    self.assertEqual((bert.train_mode, bert.batch, bert.mask_last_ratio),
                     ("last_position", 256, 0.5))

  def test_bad_values_name_the_field(self):
    for bad, field in ((dict(backbone="lstm"), "rec.backbone"), (dict(loss="hinge"), "rec.loss"),
                       (dict(backbone="srgnn", train_mode="per_position"), "train_mode"),
                       (dict(mask_last_ratio=1.5), "rec.mask_last_ratio")):
      with self.assertRaisesRegex(ValueError, field):
        dataclasses.replace(RecConfig(), **bad).resolved()

  def test_table_rows(self):
    self.assertEqual(BACKBONES["sasrec"].table_rows(10), 11)
    self.assertEqual(BACKBONES["bert4rec"].table_rows(10), 12)  # the mask token's row
    self.assertEqual(BACKBONES["sasrec"].table_rows(10, 8), 16)

  def test_registry(self):
    """Each spec is registered under its name, and its defaults fill RecConfig's None fields."""
    fields = {field.name: field.default for field in dataclasses.fields(RecConfig)}
    for name, spec in BACKBONES.items():
      self.assertEqual(spec.name, name)
      self.assertEqual({key: fields[key] for key in spec.defaults},
                       dict.fromkeys(spec.defaults), name)


if __name__ == "__main__":
  absltest.main()
