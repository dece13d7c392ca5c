"""Meshes, sharding rules and batch placement on 8 emulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

from slim_jax import parallel

RULES = [
    (r"embed/embedding", P("tensor", "fsdp")),
    (r"attn/(q|k|v)_proj/kernel", P("fsdp", "tensor")),
    (r"norm/scale|bias", P()),
]

PARAMS = {
    "embed": {"embedding": np.zeros((16, 8), np.float32)},
    "layers_0": {"attn": {"q_proj": {"kernel": np.zeros((8, 12), np.float32)},
                          "k_proj": {"kernel": np.zeros((8, 4), np.float32)}},
                 "norm": {"scale": np.ones(8, np.float32)}},
}


class MeshTest(parameterized.TestCase):

  def test_eight_devices(self):
    self.assertEqual(jax.device_count(), 8)

  @parameterized.parameters(
      ({"data": -1, "fsdp": 1, "tensor": 1}, {"data": 8, "fsdp": 1, "tensor": 1}),
      ({"data": 2, "fsdp": -1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}),
      ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
  )
  def test_shapes(self, axes, expected):
    mesh = parallel.make_mesh(axes)
    self.assertEqual(dict(mesh.shape), expected)
    self.assertTrue(all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types))

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, "at most one"):
      parallel.make_mesh({"data": -1, "fsdp": -1})
    with self.assertRaisesRegex(ValueError, "not divisible by 3"):
      parallel.make_mesh({"data": -1, "fsdp": 3})
    with self.assertRaisesRegex(ValueError, "needs 4 devices, have 8"):
      parallel.make_mesh({"data": 2, "fsdp": 2})

  def test_one_device(self):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    self.assertEqual(mesh.size, 1)


class RulesTest(absltest.TestCase):

  def test_first_matching_rule_places_each_parameter(self):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = parallel.shard_params(PARAMS, RULES, mesh)
    self.assertEqual(sharded["embed"]["embedding"].sharding.spec, P("tensor", "fsdp"))
    q = sharded["layers_0"]["attn"]["q_proj"]["kernel"]
    self.assertEqual(q.sharding.spec, P("fsdp", "tensor"))
    self.assertEqual(q.addressable_shards[0].data.shape, (4, 6))
    self.assertEqual(sharded["layers_0"]["norm"]["scale"].sharding.spec, P())

  def test_indivisible_dimension_is_named(self):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    params = {"embed": {"embedding": np.zeros((16, 12), np.float32)}}
    with self.assertRaisesRegex(ValueError, r"dim 1 of 'embed/embedding' \(shape \(16, 12\)\) "
                                r"over mesh axis 'fsdp' of size 8"):
      parallel.param_shardings(params, RULES, mesh)

  def test_unmatched_parameter_is_an_error(self):
    mesh = parallel.make_mesh()
    with self.assertRaisesRegex(ValueError, "no sharding rule matches parameter 'mlp/w'"):
      parallel.param_shardings({"mlp": {"w": np.zeros(2)}}, RULES, mesh)

  def test_rule_rank_too_high(self):
    mesh = parallel.make_mesh()
    with self.assertRaisesRegex(ValueError, "rank 1"):
      parallel.param_shardings({"embed": {"embedding": np.zeros(8)}}, RULES, mesh)

  def test_axes_the_mesh_lacks_are_replicated(self):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    shardings = parallel.param_shardings(PARAMS, RULES, mesh)
    self.assertEqual(shardings["embed"]["embedding"].spec, P(None, "fsdp"))

  def test_abstract_parameters(self):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    shardings = parallel.param_shardings(abstract, RULES, mesh)
    self.assertEqual(shardings["layers_0"]["attn"]["k_proj"]["kernel"].spec, P("fsdp", "tensor"))


class BatchTest(parameterized.TestCase):

  @parameterized.parameters(({"data": -1},), ({"data": 2, "fsdp": 4},), ({"data": 2, "fsdp": 2, "tensor": 2},))
  def test_global_batch_is_split_over_batch_axes(self, axes):
    mesh = parallel.make_mesh(axes)
    local = {"inputs": np.arange(16 * 3).reshape(16, 3), "valid": np.ones(16, bool)}
    batch = parallel.global_batch(local, mesh)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])
    rows = 16 // parallel.batch_size_multiple(mesh)
    self.assertEqual(batch["inputs"].addressable_shards[0].data.shape, (rows, 3))
    total = jax.jit(lambda b: jnp.sum(b["inputs"]))(batch)
    self.assertEqual(int(total), local["inputs"].sum())


if __name__ == "__main__":
  absltest.main()
