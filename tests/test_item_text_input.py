"""slim.item_text_input: the fused item table also embeds the backbone's input items."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from slim_jax import parallel
from slim_jax.models import slim
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig
from slim_jax.train import recommend
from tests import test_slim as base

BACKBONES = ("sasrec", "gru4rec", "srgnn", "bert4rec")
INPUTS, USERS = base.INPUTS, base.USERS
ONLY_IN_ROW_2 = 21  # the one item of row 2, in no other row
NOWHERE = 25  # in no row


def _predict(model, params, side):
  return model.apply(params, INPUTS, USERS, side, method="predict")


def _with_text(side, item, delta=1.0):
  """`side` with item `item`'s text vector moved."""
  return dict(side, item_text=side["item_text"].at[item].add(delta))


def _with_item_table(backbone_params, table):
  """The backbone's parameters with its item_emb replaced by `table`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: table if "item_emb" in jax.tree_util.keystr(path) else x, backbone_params)


class ItemTextInputTest(parameterized.TestCase):

  @parameterized.product(backbone=BACKBONES, mode=("item_text", "id_based", "history_text"))
  def test_shapes_and_parameters(self, backbone, mode):
    """The same parameters (names and initial values) as without it, the backbone's shapes."""
    model, params, side = base._model(mode, backbone, item_text_input=True)
    _, unfused_params, _ = base._model(mode, backbone)
    self.assertTrue(model.text_input)
    jax.tree.map(np.testing.assert_array_equal, params, unfused_params)
    states, table = model.apply(params, INPUTS, USERS, side)
    steps = 1 if backbone == "srgnn" else INPUTS.shape[1]
    self.assertEqual(states.shape, (4, steps, 16))
    self.assertEqual(table.shape, (model.rows, 16))
    state, table = _predict(model, params, side)
    self.assertEqual(state.shape, (4, 16))
    self.assertTrue(np.isfinite(np.asarray(state)).all())
    self.assertTrue(np.isfinite(np.asarray(table)).all())

  @parameterized.parameters(*BACKBONES)
  def test_inputs_are_embedded_with_the_fused_table_scored_against(self, backbone):
    """item_text: the state is the plain backbone's with the fused table as its item_emb, and
    the table the fused one, as without item_text_input (whose state is the plain backbone's)."""
    model, params, side = base._model("item_text", backbone, item_text_input=True)
    p = params["params"]
    plain = recommend.build_backbone(dataclasses.replace(base.CFG, backbone=backbone),
                                     base.NUM_ITEMS)
    item_emb = p["backbone"].get("encoder", p["backbone"])["item_emb"]["embedding"]
    fused = model.apply(params, side, item_emb, method="item_table")
    state, table = _predict(model, params, side)
    np.testing.assert_array_equal(table, fused)
    expected, _ = plain.apply({"params": _with_item_table(p["backbone"], fused)}, INPUTS,
                              method="predict")
    np.testing.assert_allclose(state, expected, atol=1e-5)
    unfused = base._model("item_text", backbone)[0]
    unfused_state, unfused_table = _predict(unfused, params, side)
    np.testing.assert_array_equal(unfused_table, table)
    raw, _ = plain.apply({"params": p["backbone"]}, INPUTS, method="predict")
    np.testing.assert_array_equal(unfused_state, raw)
    self.assertFalse(np.allclose(state, raw))

  @parameterized.product(backbone=BACKBONES, mode=("item_text", "id_based"))
  def test_an_items_text_changes_the_states_of_the_rows_holding_it(self, backbone, mode):
    model, params, side = base._model(mode, backbone, item_text_input=True)
    before, table = map(np.asarray, _predict(model, params, side))
    after, changed_table = map(np.asarray, _predict(model, params,
                                                    _with_text(side, ONLY_IN_ROW_2)))
    self.assertFalse(np.allclose(before[2], after[2]))
    np.testing.assert_array_equal(np.delete(before, 2, 0), np.delete(after, 2, 0))
    self.assertFalse(np.allclose(table[ONLY_IN_ROW_2], changed_table[ONLY_IN_ROW_2]))
    # An item in no row changes its own scores only.
    elsewhere, elsewhere_table = map(np.asarray, _predict(model, params,
                                                          _with_text(side, NOWHERE)))
    np.testing.assert_array_equal(before, elsewhere)
    np.testing.assert_array_equal(np.delete(table, NOWHERE, 0),
                                  np.delete(elsewhere_table, NOWHERE, 0))

  @parameterized.parameters(*BACKBONES)
  def test_without_it_item_text_leaves_the_item_side_states_alone(self, backbone):
    model, params, side = base._model("item_text", backbone)
    self.assertFalse(model.text_input)
    before, _ = _predict(model, params, side)
    after, _ = _predict(model, params, _with_text(side, ONLY_IN_ROW_2))
    np.testing.assert_array_equal(before, after)

  def test_plain_and_the_backbone_free_modes_ignore_it(self):
    for mode in ("plain", "id_agnostic", "zero_shot", "popularity"):
      model, params, side = base._model(mode, item_text_input=True)
      self.assertFalse(model.text_input)
      unfused, unfused_params, _ = base._model(mode)
      expected = _predict(unfused, unfused_params, side)
      jax.tree.map(np.testing.assert_array_equal, _predict(model, params, side), expected)
    self.assertEqual(set(slim.FUSED_MODES) & {"plain", "id_agnostic", "zero_shot"}, set())

  @parameterized.parameters("sasrec", "srgnn")
  def test_training_smoke(self, backbone):
    prepared, encoded = base.genre_prepared(num_users=24, num_items=40, length=8)
    cfg = RecConfig(backbone=backbone, hidden=16, max_len=8, inner=32, batch=16, eval_batch=32,
                    epochs=1, eval_every=1, sampled_negatives=10)
    summary = recommend.train_recommender(
        cfg, prepared, self.create_tempdir().full_path, parallel.make_mesh({"data": -1}),
        "item_text", SlimConfig(item_text_input=True, rationale_schedule="paper"), encoded)
    self.assertEqual(summary["mode"], "item_text")
    self.assertGreater(summary["steps"], 0)
    for split in ("valid", "test"):
      for metric in ("hr@10", "ndcg@10"):
        self.assertTrue(np.isfinite(summary[split][metric]), (split, metric))


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
