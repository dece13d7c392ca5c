"""Sampling with a KV cache: equal to recomputing everything, to transformers' generate, across
left padding, LoRA and meshes; compiled once per prompt bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest, parameterized

from slim_jax import assets, checkpoints, parallel, sampler
from slim_jax.sampler import SamplingConfig
from slim_jax.models import llama, lora as lora_lib
from slim_jax.models.llama import Llama
from slim_jax.models.lora import LoraConfig
from tests import llama_reference as ref

TINY = llama.PRESETS["tiny"]
GREEDY = SamplingConfig(max_new_tokens=8)
NO_STOP = (-1,)


def _generate(model, variables, prompts, sampling=GREEDY, stop_ids=NO_STOP, key=0):
  return sampler.generate_ids(model, variables, prompts, jax.random.key(key), sampling,
                              stop_ids, pad_id=0)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, TINY.vocab_size, n).tolist() for n in lengths]


class TinyGenerateTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.model = Llama(TINY)
    self.variables = {"params": ref.random_params(TINY)}

  def test_cached_decoding_equals_full_recomputation(self):
    prompt = _prompts([5])[0]
    tokens = list(prompt)
    apply = jax.jit(self.model.apply)
    for _ in range(GREEDY.max_new_tokens):
      logits = apply(self.variables, jnp.array([tokens]))[0]
      tokens.append(int(jnp.argmax(logits[0, -1])))
    self.assertEqual(_generate(self.model, self.variables, [prompt])[0], tokens[len(prompt):])

  def test_left_padded_batch_equals_one_by_one(self):
    prompts = _prompts([3, 11, 7])
    batched = _generate(self.model, self.variables, prompts)
    self.assertEqual(batched, [_generate(self.model, self.variables, [p])[0] for p in prompts])

  def test_compiles_once_per_bucket(self):
    _generate(self.model, self.variables, _prompts([9]))
    before = sampler.generate_tokens._cache_size()
    _generate(self.model, self.variables, _prompts([12]))
    _generate(self.model, self.variables, _prompts([16]))
    self.assertEqual(sampler.generate_tokens._cache_size(), before)
    _generate(self.model, self.variables, _prompts([17]))
    self.assertEqual(sampler.generate_tokens._cache_size(), before + 1)

  def test_stops_at_stop_tokens(self):
    prompts = _prompts([4, 6])
    free = _generate(self.model, self.variables, prompts)
    stop = free[0][2]
    stopped = _generate(self.model, self.variables, prompts, stop_ids=(stop,))
    self.assertEqual(stopped[0], free[0][:free[0].index(stop)])
    out = sampler.generate_tokens(
        self.model, self.variables, *sampler.left_pad(prompts[:1], 0), jax.random.key(0),
        sampling=GREEDY, stop_ids=(stop,), pad_id=0)
    self.assertEqual(np.asarray(out)[0, 3:].tolist(), [0] * (GREEDY.max_new_tokens - 3))

  def test_sampling(self):
    prompts = _prompts([5, 5])
    greedy = _generate(self.model, self.variables, prompts)
    self.assertEqual(_generate(self.model, self.variables, prompts,
                               SamplingConfig(8, temperature=1.0, top_k=1)), greedy)
    self.assertEqual(_generate(self.model, self.variables, prompts,
                               SamplingConfig(8, temperature=1.0, top_p=1e-6)), greedy)
    hot = SamplingConfig(8, temperature=2.0)
    first = _generate(self.model, self.variables, prompts, hot, key=1)
    self.assertEqual(_generate(self.model, self.variables, prompts, hot, key=1), first)
    self.assertNotEqual(_generate(self.model, self.variables, prompts, hot, key=2), first)

  def test_top_k_and_top_p_keep_only_the_head(self):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    counts = lambda s: np.bincount(np.asarray(sampler.sample(logits, jax.random.key(0), s)),
                                   minlength=4)
    top_k = counts(SamplingConfig(temperature=1.0, top_k=2))
    self.assertEqual(top_k[2:].tolist(), [0, 0])
    self.assertAlmostEqual(top_k[0] / 4000, 0.5 / 0.8, delta=0.03)
    top_p = counts(SamplingConfig(temperature=1.0, top_p=0.85))  # 0.5 + 0.3 < 0.85: keeps 3
    self.assertEqual(top_p[3], 0)
    self.assertGreater(top_p[2], 0)

  def test_no_repeat_ngram_forbids_repeating_any_generated_trigram(self):
    prompts = _prompts([5, 7, 9])
    trigrams = lambda ids: [tuple(ids[k:k + 3]) for k in range(len(ids) - 2)]
    plain = _generate(self.model, self.variables, prompts, SamplingConfig(40))
    self.assertTrue(any(len(set(trigrams(ids))) < len(trigrams(ids)) for ids in plain))  # loops
    for ids in _generate(self.model, self.variables, prompts,
                         SamplingConfig(40, no_repeat_ngram=3)):
      self.assertLen(ids, 40)
      self.assertEqual(len(set(trigrams(ids))), len(trigrams(ids)))

  def test_repetition_penalty_applies_only_to_generated_tokens(self):
    logits = jnp.array([[2.0, -1.0, 3.0, 0.5]])
    generated = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(sampler.penalize_repeats(logits, generated, 2.0),
                               [[1.0, -2.0, 3.0, 0.5]])
    prompts = _prompts([6])
    penalized = _generate(self.model, self.variables, prompts,
                          SamplingConfig(24, repetition_penalty=1e6))[0]
    self.assertEqual(len(set(penalized)), len(penalized))  # no token twice

  def test_guided_steps_force_each_marker_after_a_line_end_then_stop(self):
    everything = tuple(range(TINY.vocab_size))  # every token ends a line
    guided = SamplingConfig(16, step_markers=((101, 102), (103, 104, 105)), line_ends=everything)
    # a finished row goes on with pad_id, here a stop id as EOS is in use
    for ids in _generate(self.model, self.variables, _prompts([4, 6]), guided, stop_ids=(0,)):
      self.assertLen(ids, 8)  # a token, marker 2, a token, marker 3, the last step's token
      self.assertEqual((ids[1:3], ids[4:7]), ([101, 102], [103, 104, 105]))

  def test_lora_unmerged_equals_merged(self):
    config = LoraConfig(rank=4, targets=("q_proj", "v_proj", "up_proj"))
    model = Llama(TINY, config)
    adapters = jax.tree.map(lambda x: x + 0.1, lora_lib.init_lora(model, jax.random.key(0)))
    prompts = _prompts([4, 9])
    unmerged = _generate(model, {**self.variables, "lora": adapters}, prompts)
    merged = lora_lib.merge(self.variables["params"], adapters, config)
    self.assertEqual(unmerged, _generate(self.model, {"params": merged}, prompts))
    self.assertNotEqual(unmerged, _generate(self.model, self.variables, prompts))

  @parameterized.named_parameters(("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}),
                                  ("fsdp2_tensor4", {"data": 1, "fsdp": 2, "tensor": 4}))
  def test_sharded_generation_equals_unsharded(self, axes):
    prompts = _prompts([3, 5, 8, 13, 2, 9, 4, 6])
    expected = _generate(self.model, self.variables, prompts)
    mesh = parallel.make_mesh(axes)
    sharded = parallel.shard_params(self.variables["params"], llama.partition_rules(TINY), mesh)
    with jax.set_mesh(mesh):
      self.assertEqual(_generate(self.model, {"params": sharded}, prompts), expected)


class SmolLM2GenerateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config, cls.params, cls.tokenizer = checkpoints.load(assets.path("smollm2"))

  def test_greedy_32_tokens_equal_transformers_generate(self):
    prompts = [sampler.chat_prompt(self.tokenizer, text) for text in (
        "Name three movies similar to The Matrix.", "What is 12 times 7?")]
    ours = sampler.generate_ids(Llama(self.config), {"params": self.params}, prompts,
                                jax.random.key(0), SamplingConfig(32), (2,), pad_id=2)
    torch_model = ref.torch_model(self.config, self.params)
    for prompt, tokens in zip(prompts, ours):
      with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                   eos_token_id=2, pad_token_id=2)
      theirs = out[0, len(prompt):].tolist()
      self.assertEqual(tokens, theirs[:theirs.index(2)] if 2 in theirs else theirs)
      self.assertGreater(len(tokens), 3)

  def test_generate_text_answers(self):
    prompt = sampler.chat_prompt(self.tokenizer, "What is the capital of France?")
    (answer,) = sampler.generate_text(Llama(self.config), {"params": self.params}, self.tokenizer,
                                      [prompt], jax.random.key(0), SamplingConfig(24))
    self.assertIn("Paris", answer)


if __name__ == "__main__":
  absltest.main()
