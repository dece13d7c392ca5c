"""LoRA: a separate adapter pytree equal to merged weights, trained alone, sharded, and
interchangeable with Hugging Face PEFT."""

import functools
import math
import tempfile

import jax
import numpy as np
import peft
from absl.testing import absltest, parameterized

from slim_jax import parallel
from slim_jax.checkpoints import peft as peft_io
from slim_jax.data import loader
from slim_jax.models import llama, lora as lora_lib
from slim_jax.models.llama import Llama
from slim_jax.models.lora import LoraConfig
from slim_jax.train import distill
from slim_jax.train.distill import DistillConfig
from tests import llama_reference as ref

TINY = llama.PRESETS["tiny"]
ALL = LoraConfig(rank=4, alpha=8.0, dropout=0.1,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"))


def _random_lora(model, seed=1):
  """Adapters with B != 0, so that they change the logits."""
  adapters = lora_lib.init_lora(model, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in
                                      zip(keys, leaves)])


def _tokens(shape, seed=0):
  return np.random.default_rng(seed).integers(0, TINY.vocab_size, shape).astype(np.int32)


class LoraTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params = ref.random_params(TINY)
    self.tokens = _tokens((2, 24))

  def test_fresh_adapters_leave_the_model_unchanged(self):
    model = Llama(TINY, ALL)
    adapters = lora_lib.init_lora(model, jax.random.key(0))
    self.assertEqual(adapters["layers_1"]["mlp"]["down_proj"]["lora_a"].shape, (128, 4))
    self.assertFalse(np.any(adapters["layers_0"]["self_attn"]["q_proj"]["lora_b"]))
    self.assertTrue(np.all(adapters["layers_0"]["self_attn"]["q_proj"]["lora_a"]))
    base = np.asarray(model.apply({"params": self.params}, self.tokens)[0])
    adapted = np.asarray(model.apply({"params": self.params, "lora": adapters}, self.tokens)[0])
    np.testing.assert_array_equal(adapted, base)

  def test_adapters_equal_merged_weights(self):
    model = Llama(TINY, ALL)
    adapters = _random_lora(model)
    adapted = np.asarray(model.apply({"params": self.params, "lora": adapters}, self.tokens)[0])
    merged = ref.jax_logits(TINY, {"params": lora_lib.merge(self.params, adapters, ALL)},
                            self.tokens)
    base = ref.jax_logits(TINY, {"params": self.params}, self.tokens)
    self.assertGreater(np.abs(adapted - base).max(), 0.1)
    np.testing.assert_allclose(adapted, merged, atol=1e-4)

  def test_dropout_only_with_a_dropout_rng(self):
    model = Llama(TINY, ALL)
    variables = {"params": self.params, "lora": _random_lora(model)}
    plain = model.apply(variables, self.tokens)[0]
    dropped = model.apply(variables, self.tokens, rngs={"dropout": jax.random.key(3)})[0]
    self.assertGreater(np.abs(np.asarray(dropped - plain)).max(), 1e-3)

  @parameterized.parameters(False, True)
  def test_saved_adapter_loads_in_peft_with_equal_logits(self, scan):
    config = LoraConfig(rank=8, alpha=16.0, targets=("down_proj", "q_proj", "v_proj"))
    model = Llama(TINY, config)
    adapters = _random_lora(model)
    ours = np.asarray(model.apply({"params": self.params, "lora": adapters}, self.tokens)[0])
    with tempfile.TemporaryDirectory() as tmp:
      peft_io.save_peft(tmp, adapters, config)
      theirs = peft.PeftModel.from_pretrained(ref.torch_model(TINY, self.params), tmp).eval()
      loaded, loaded_config = peft_io.load_peft(tmp, scan_layers=scan)
    np.testing.assert_allclose(ref.torch_logits(theirs, self.tokens), ours, atol=1e-4)
    self.assertEqual(loaded_config, config)
    if scan:
      self.assertEqual(loaded["layers"]["self_attn"]["q_proj"]["lora_a"].shape, (2, 64, 8))
      loaded = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], loaded["layers"])
                for i in range(2)}
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(adapters))

  def test_loads_adapter_trained_with_peft(self):
    torch_model = ref.torch_model(TINY, self.params)
    peft_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "up_proj"],
                                  init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(torch_model, peft_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
      theirs.save_pretrained(tmp)
      adapters, config = peft_io.load_peft(tmp)
    self.assertEqual((config.rank, config.scale, config.targets), (4, 3.0, ("k_proj", "up_proj")))
    ours = np.asarray(Llama(TINY, config).apply({"params": self.params, "lora": adapters},
                                                self.tokens)[0])
    np.testing.assert_allclose(ours, ref.torch_logits(theirs, self.tokens), atol=1e-4)

  def test_rejects_unsupported_peft_configs(self):
    with tempfile.TemporaryDirectory() as tmp:
      model = Llama(TINY, ALL)
      peft_io.save_peft(tmp, lora_lib.init_lora(model, jax.random.key(0)), ALL)
      path = f"{tmp}/adapter_config.json"
      raw = open(path).read().replace('"use_rslora": false', '"use_rslora": true')
      open(path, "w").write(raw)
      with self.assertRaisesRegex(ValueError, "adapter_config.json: use_rslora=True"):
        peft_io.load_peft(tmp)


@functools.cache
def _train(axes=(("data", 1),), steps=3):
  """Losses and final adapters of a few distillation steps (slim_jax.train.distill) on a mesh of
  these axes; the default is one device."""
  cfg = DistillConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=ALL.targets,
                      batch_size=8, lr=1e-2, warmup_steps=0)
  mesh = parallel.make_mesh(dict(axes), jax.devices()[:math.prod(size for _, size in axes)])
  base = parallel.shard_params(ref.random_params(TINY), llama.partition_rules(TINY), mesh)
  _, state, _, step = distill.build_step(TINY, cfg, base, mesh)
  tokens = _tokens((8, 16))  # a 4-token prompt, then 12 target tokens to learn
  batch = parallel.global_batch(
      loader.lm_batch(list(tokens[:, :4]), list(tokens[:, 4:]), (16,), pad_id=0), mesh)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(base, state, batch)
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.lora)


class LoraTrainingTest(parameterized.TestCase):

  def test_loss_decreases_and_adapters_learn(self):
    losses, adapters = _train()
    self.assertLess(losses[-1], losses[0])
    self.assertTrue(np.any(adapters["layers_0"]["mlp"]["up_proj"]["lora_b"]))

  @parameterized.named_parameters(("fsdp8", (("data", 1), ("fsdp", 8), ("tensor", 1))),
                                  ("fsdp2_tensor4", (("data", 1), ("fsdp", 2), ("tensor", 4))))
  def test_sharded_training_equals_single_device(self, axes):
    expected_losses, expected = _train()
    losses, adapters = _train(axes)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    # Adam divides by sqrt(v): last-ulp gradient differences grow to ~1e-5 in the weights
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), adapters, expected)


if __name__ == "__main__":
  absltest.main()
