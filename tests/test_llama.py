"""The Flax LLaMA equals Hugging Face's LlamaForCausalLM and is invariant to padding, scan, remat,
sharding and the attention kernel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl.testing import absltest, parameterized

from slim_jax import parallel
from slim_jax.checkpoints import hf
from slim_jax.models import llama
from slim_jax.models.llama import Llama, RopeScaling
from slim_jax.models.lora import LoraConfig
from slim_jax.train import distill
from tests import llama_reference as ref

TINY = llama.PRESETS["tiny"]
VARIANTS = {
    "gqa": TINY,
    "mha": llama.PRESETS["tiny_mha"],
    "tied": llama.PRESETS["tiny_tied"],
    "linear_rope": dataclasses.replace(TINY, rope_scaling=RopeScaling("linear", 2.0)),
    "llama3_rope": dataclasses.replace(
        TINY, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
    "chunked_attention": dataclasses.replace(TINY, attention_chunk=16),  # chunks 16, 16, 8
}


def _tokens(config, shape, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


class LlamaParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*VARIANTS.items())
  def test_logits_match_transformers(self, config):
    params = ref.random_params(config)
    tokens = _tokens(config, (2, 40))
    ours = ref.jax_logits(config, {"params": params}, tokens)
    theirs = ref.torch_logits(ref.torch_model(config, params), tokens)
    self.assertGreater(np.abs(theirs).max(), 1.0)  # not trivially small
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

  @parameterized.named_parameters(
      *llama.PRESETS.items(), *[(name, VARIANTS[name]) for name in ("linear_rope", "llama3_rope")])
  def test_inverse_frequencies_equal_transformers(self, config):
    hf_config = transformers.LlamaConfig(**hf.config_to_hf(config))
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    np.testing.assert_array_equal(llama.inverse_frequencies(config), rope.inv_freq.numpy())

  @parameterized.parameters(0, 4)
  def test_left_padded_rows_equal_unpadded(self, chunk):
    config = dataclasses.replace(TINY, attention_chunk=chunk)
    params = ref.random_params(config)
    tokens = _tokens(config, (1, 12))
    alone = ref.jax_logits(config, {"params": params}, tokens)
    padded = np.concatenate([np.zeros((1, 5), np.int32), tokens], axis=1)
    mask = np.arange(17)[None] >= 5
    batched = ref.jax_logits(config, {"params": params}, padded, mask)
    np.testing.assert_allclose(batched[:, 5:], alone, atol=1e-5)

  @parameterized.parameters(0, 4)
  def test_packed_segments_equal_each_example_alone(self, chunk):
    config = dataclasses.replace(TINY, attention_chunk=chunk)
    params = ref.random_params(config)
    first, second = _tokens(config, (1, 7), seed=1), _tokens(config, (1, 9), seed=2)
    row = np.concatenate([first, second, np.zeros((1, 4), np.int32)], axis=1)
    segments = np.array([[1] * 7 + [2] * 9 + [0] * 4], np.int32)
    apply = jax.jit(lambda tokens: Llama(config).apply({"params": params}, tokens,
                                                       segment_ids=segments)[0])
    packed = np.asarray(apply(row))
    np.testing.assert_allclose(packed[:, :7], ref.jax_logits(config, {"params": params}, first),
                               atol=1e-5)
    np.testing.assert_allclose(packed[:, 7:16],
                               ref.jax_logits(config, {"params": params}, second), atol=1e-5)
    # segment 2 never sees segment 1: new tokens there leave segment 2's logits as they were
    changed = row.copy()
    changed[:, :7] = _tokens(config, (1, 7), seed=3)
    again = np.asarray(apply(changed))
    self.assertGreater(np.abs(again[:, :7] - packed[:, :7]).max(), 0.1)
    np.testing.assert_array_equal(again[:, 7:16], packed[:, 7:16])

  def test_segment_positions_restart_with_each_segment(self):
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(llama.segment_positions(segments),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])

  def test_query_chunks_score_only_keys_up_to_their_end(self):
    self.assertEqual(llama.query_chunks(40, 40, 0, 16),
                     [(0, 16, 16), (16, 32, 32), (32, 40, 40)])
    # a prefill of 20 tokens into a cache of 30 slots: the empty slots are never scored
    self.assertEqual(llama.query_chunks(20, 30, 0, 16), [(0, 16, 16), (16, 20, 20)])
    self.assertEqual(llama.query_chunks(20, 30, 0, 0), [(0, 20, 30)])
    # decoding: the write index is traced, so one chunk scores every slot
    self.assertEqual(llama.query_chunks(1, 30, jnp.int32(7), 16), [(0, 1, 30)])

  def test_attention_softmax_gradient_equals_autodiff(self):
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)), jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7)), jnp.float32)
    ours = jax.vjp(llama.softmax, scores)[1](cotangent)
    autodiff = jax.vjp(lambda s: jax.nn.softmax(s, axis=-1), scores)[1](cotangent)
    np.testing.assert_allclose(ours[0], autodiff[0], atol=1e-6)

  @parameterized.parameters("", "nothing_saveable", "dots_with_no_batch_dims_saveable")
  def test_scan_and_remat_equal_unrolled(self, policy):
    params = ref.random_params(TINY)
    # chunked attention (16 tokens in chunks of 8) under scan and remat too
    unrolled_config = dataclasses.replace(TINY, attention_chunk=8)
    scanned_config = dataclasses.replace(unrolled_config, scan_layers=True, remat_policy=policy)
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *x: jnp.stack(x), params["layers_0"],
                                     params["layers_1"])
    tokens = _tokens(TINY, (2, 16))
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "loss_mask": np.ones((2, 16))}

    def loss_and_grads(config, p):
      def loss(p):
        total, count = distill.rationale_nll(Llama(config), {"params": p}, batch)
        return total / count
      return jax.jit(jax.value_and_grad(loss))(p)

    loss, grads = loss_and_grads(unrolled_config, params)
    scan_loss, scan_grads = loss_and_grads(scanned_config, stacked)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(scan_grads["layers"]["mlp"]["up_proj"]["kernel"][1],
                               grads["layers_1"]["mlp"]["up_proj"]["kernel"], atol=1e-6)

  def test_bf16_compute_stays_close(self):
    params = ref.random_params(TINY)
    tokens = _tokens(TINY, (2, 16))
    fp32 = ref.jax_logits(TINY, {"params": params}, tokens)
    bf16_config = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16 = ref.jax_logits(bf16_config, {"params": bf16_params}, tokens)
    self.assertEqual(bf16.dtype, np.float32)  # logits always fp32
    np.testing.assert_allclose(bf16, fp32, atol=0.1 * np.abs(fp32).max())

  def test_unknown_remat_policy_is_rejected(self):
    config = dataclasses.replace(TINY, remat_policy="save_nothing_please")
    with self.assertRaisesRegex(ValueError, "save_nothing_please"):
      Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


# the kinds that run on CPU: xla, and pallas in TPU interpret mode (rows of 128 tokens, its block)
CPU_KINDS = ("xla", "pallas")
PRESET_NAMES = ("tiny", "tiny_mha")  # GQA, MHA


def _with_attention(preset: str, kind: str):
  return dataclasses.replace(llama.PRESETS[preset], attention=kind)


class AttentionKindsTest(parameterized.TestCase):
  """Every attention kind that runs on CPU gives the chunked kind's logits and gradients."""

  def assert_runs_as(self, kind, length, index=0):
    """The case really runs `kind`, not expressible_kind's xla fallback."""
    self.assertEqual(llama.expressible_kind(kind, "float32", length, index), kind)

  @parameterized.product(kind=CPU_KINDS, preset=PRESET_NAMES)
  def test_left_padded_batch_equals_chunked(self, kind, preset):
    self.assert_runs_as(kind, 128)
    params = ref.random_params(llama.PRESETS[preset])
    tokens = _tokens(TINY, (2, 128))
    mask = np.arange(128)[None] >= np.array([[37], [0]])
    chunked = ref.jax_logits(_with_attention(preset, "chunked"), {"params": params}, tokens, mask)
    ours = ref.jax_logits(_with_attention(preset, kind), {"params": params}, tokens, mask)
    np.testing.assert_allclose(ours[mask], chunked[mask], atol=1e-5, rtol=0)

  @parameterized.product(kind=CPU_KINDS, preset=PRESET_NAMES)
  def test_packed_rows_equal_chunked(self, kind, preset):
    self.assert_runs_as(kind, 128)
    params = ref.random_params(llama.PRESETS[preset])
    tokens = _tokens(TINY, (2, 128))
    segments = np.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * 128], np.int32)

    def logits(kind):
      model = Llama(_with_attention(preset, kind))
      return np.asarray(jax.jit(lambda t: model.apply({"params": params}, t,
                                                      segment_ids=segments)[0])(tokens))

    real = segments > 0
    np.testing.assert_allclose(logits(kind)[real], logits("chunked")[real], atol=1e-5, rtol=0)

  @parameterized.product(kind=CPU_KINDS, preset=PRESET_NAMES)
  def test_prefill_and_decode_equal_chunked(self, kind, preset):
    self.assert_runs_as(kind, 128)  # the prefill; decoding (a traced index) runs xla
    params = ref.random_params(llama.PRESETS[preset])
    prompts, steps = _tokens(TINY, (2, 128)), 3
    new_tokens = _tokens(TINY, (2, steps), seed=1)
    mask = np.zeros((2, 128 + steps), bool)
    mask[0, 37:128], mask[1, :128] = True, True

    def logits(kind):
      model = Llama(_with_attention(preset, kind))
      variables = {"params": params}
      prefill = jax.jit(lambda t, m, c: model.apply(variables, t, m, c, 0, last_only=True))
      decode = jax.jit(lambda t, m, c, i: model.apply(variables, t, m, c, i, last_only=True))
      out, cache = prefill(prompts, mask, llama.init_cache(model.config, 2, 128 + steps))
      outs, step_mask = [out], mask.copy()
      for step in range(steps):
        step_mask[:, 128 + step] = True
        out, cache = decode(new_tokens[:, step:step + 1], step_mask, cache, jnp.int32(128 + step))
        outs.append(out)
      return np.concatenate(outs, axis=1)

    np.testing.assert_allclose(logits(kind), logits("chunked"), atol=1e-5, rtol=0)

  @parameterized.product(kind=CPU_KINDS, packed=(False, True))
  def test_lora_gradients_equal_chunked(self, kind, packed):
    self.assert_runs_as(kind, 128)
    params = ref.random_params(TINY)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj"))
    adapters = jax.tree.map(  # B != 0, so that A has a gradient too
        lambda x: 0.2 * jax.random.normal(jax.random.key(1), x.shape),
        Llama(TINY, lora).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["lora"])
    segments = np.array([[1] * 50 + [2] * 60 + [0] * 18, [0] * 28 + [1] * 100], np.int32)
    positions = llama.segment_positions(segments)
    # the loss is on every token but each example's first, which a padding query would predict
    batch = {"tokens": _tokens(TINY, (2, 128)), "segment_ids": segments, "positions": positions,
             "loss_mask": ((segments > 0) & (positions > 0)).astype(np.float32)}

    def grads(kind):
      model = Llama(dataclasses.replace(TINY, attention=kind), lora)
      def loss(adapters):
        total, count = distill.rationale_nll(model, {"params": params, "lora": adapters}, batch,
                                             packed=packed)
        return total / count
      return jax.jit(jax.grad(loss))(adapters)

    expected = grads("chunked")
    self.assertGreater(np.abs(expected["layers_0"]["self_attn"]["k_proj"]["lora_a"]).max(), 1e-3)
    jax.tree.map(lambda ours, theirs: np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0),
                 grads(kind), expected)

  def test_pallas_sharded_equals_unsharded_chunked(self):
    config = _with_attention("tiny", "pallas")
    params = ref.random_params(TINY)
    tokens = _tokens(TINY, (8, 128))
    expected = ref.jax_logits(TINY, {"params": params}, tokens)
    # rows and heads both split; 4 devices, as JAX's TPU interpreter (jax 0.10.2) hangs on the
    # 8-device fsdp 2 x tensor 4 mesh
    mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    sharded = parallel.shard_params(params, llama.partition_rules(config), mesh)
    with jax.set_mesh(mesh):
      batch = jax.device_put(tokens, parallel.batch_sharding(mesh, 2))
      logits = jax.jit(Llama(config).apply)({"params": sharded}, batch)[0]
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)

  def test_auto_is_chunked_on_cpu(self):
    self.assertEqual(TINY.attention, "auto")
    self.assertEqual(llama.attention_kind(TINY), "chunked")
    self.assertEqual(llama.attention_kind(_with_attention("tiny", "pallas")), "pallas")

  def test_fused_kernels_fall_back_to_xla_where_they_cannot_express_the_call(self):
    fallback = llama.expressible_kind
    self.assertEqual(fallback("cudnn", "bfloat16", 100, 0), "cudnn")
    self.assertEqual(fallback("cudnn", "float32", 100, 0), "xla")  # fp16/bf16 kernels only
    self.assertEqual(fallback("pallas", "float32", 256, 0), "pallas")
    self.assertEqual(fallback("pallas", "float32", 100, 0), "xla")  # 128-slot key blocks
    for kind in ("cudnn", "pallas"):  # decoding (a traced index), or a later static one
      self.assertEqual(fallback(kind, "bfloat16", 128, jnp.int32(0)), "xla")
      self.assertEqual(fallback(kind, "bfloat16", 128, 128), "xla")
    for kind in ("chunked", "xla"):
      self.assertEqual(fallback(kind, "float32", 1, jnp.int32(7)), kind)

  def test_unknown_attention_is_rejected(self):
    with self.assertRaisesRegex(ValueError, r"LlamaConfig\.attention='flash': expected one of "
                                r"\('auto', 'chunked', 'xla', 'cudnn', 'pallas'\)"):
      dataclasses.replace(TINY, attention="flash")


class ShardedLlamaTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}, False),
      ("fsdp2_tensor4", {"data": 1, "fsdp": 2, "tensor": 4}, False),
      ("fsdp2_tensor4_scan", {"data": 1, "fsdp": 2, "tensor": 4}, True))
  def test_sharded_logits_equal_unsharded(self, axes, scan):
    config = dataclasses.replace(TINY, scan_layers=scan)
    tensors = hf.params_to_hf(ref.random_params(TINY), TINY)
    params = jax.device_get(hf.params_from_reader(lambda name, i: tensors[name][i], config))
    tokens = _tokens(config, (8, 16))
    expected = ref.jax_logits(config, {"params": params}, tokens)
    mesh = parallel.make_mesh(axes)
    sharded = parallel.shard_params(params, llama.partition_rules(config), mesh)
    embedding = sharded["embed_tokens"]["embedding"]
    self.assertEqual(embedding.addressable_shards[0].data.shape,
                     (256 // axes["tensor"], 64 // axes["fsdp"]))
    with jax.set_mesh(mesh):
      batch = jax.device_put(tokens, parallel.batch_sharding(mesh, 2))
      logits = jax.jit(Llama(config).apply)({"params": sharded}, batch)[0]
    self.assertEqual(logits.addressable_shards[0].data.shape[0], 8 // axes["fsdp"])
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
