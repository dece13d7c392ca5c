"""Checkpoints: the embedded GGUF SmolLM2 converts to a HF directory transformers loads with the
same logits as ours; HF directories (single or sharded) load straight into sharded arrays."""

import dataclasses
import json
import pathlib
import tempfile

import jax
import numpy as np
import torch
import transformers
from absl.testing import absltest, parameterized

from slim_jax import assets, checkpoints, parallel
from slim_jax.checkpoints import hf
from slim_jax.checkpoints.tokenizer import load_tokenizer
from slim_jax.models import llama
from slim_jax.models.llama import RopeScaling
from tests import llama_reference as ref
from tests.fixtures import TINY_LLAMA, random_params, word_tokenizer

TINY = llama.PRESETS["tiny"]


class SmolLM2Test(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.gguf = assets.path("smollm2")
    cls.dir = checkpoints.convert_gguf_to_hf(cls.gguf, pathlib.Path(cls.tmp.name) / "smollm2")
    cls.config, cls.params, cls.tokenizer = checkpoints.load(cls.dir)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_logits_match_transformers(self):
    self.assertEqual(self.config, llama.PRESETS["smollm2_135m"])
    ids = self.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Recommend a movie like Toy Story."}],
        add_generation_prompt=True, tokenize=False)
    tokens = np.array([self.tokenizer(ids, add_special_tokens=False)["input_ids"]])
    exact = ref.torch_logits(
        transformers.LlamaForCausalLM.from_pretrained(self.dir, dtype=torch.float64), tokens)
    ours = ref.jax_logits(self.config, {"params": self.params}, tokens)
    # Measured against transformers in float64, not in fp32: SmolLM2's residual stream carries
    # ~2.5e4 "massive activations" (one fp32 ulp there is 2e-3), so any fp32 run is ~1e-4 from the
    # exact logits, by GEMM summation order alone. transformers' own fp32 logits are 6e-5 to 1e-4
    # from them as the CPU's ISA changes (ATEN_CPU_CAPABILITY), and ours vs theirs in fp32 went
    # 0.97e-4 on one CI machine, 1.15e-4 on the next. Ours are 9.4e-5 from exact at every XLA ISA
    # (xla_cpu_max_isa SSE4_2, AVX2, AVX512), mean 1.4e-5, while rms_norm_eps 1% off already
    # breaks both bounds (2.7e-4, mean 3.3e-5) and rope_theta 1% off gives 3e-2.
    np.testing.assert_allclose(ours, exact, atol=1.5e-4, rtol=0)
    self.assertLess(np.mean(np.abs(ours - exact)), 2e-5)

  def test_gguf_and_converted_directory_hold_the_same_weights(self):
    _, from_gguf, _ = checkpoints.load(self.gguf)
    jax.tree.map(np.testing.assert_array_equal, from_gguf, self.params)

  def test_tokenizer(self):
    auto = transformers.AutoTokenizer.from_pretrained(self.dir)
    ours = load_tokenizer(self.gguf)
    text = "<|im_start|>user\nCafé « naïve » — 2024 films, e.g. WALL·E!<|im_end|>\n"
    ids = ours(text)["input_ids"]
    self.assertEqual(auto(text)["input_ids"], ids)
    self.assertEqual(ids[0], 1)  # <|im_start|> stays whole
    self.assertEqual(ours.decode(ids), text)
    self.assertLen(ours("2024")["input_ids"], 4)  # llama.cpp's "smollm": one token per digit
    self.assertEqual((ours.bos_token_id, ours.eos_token_id, ours.pad_token_id), (1, 2, 2))
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}],
                                    add_generation_prompt=True, tokenize=False)
    self.assertTrue(chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))

  def test_convert_is_idempotent(self):
    before = {p.name: p.stat().st_mtime_ns for p in self.dir.iterdir()}
    checkpoints.convert_gguf_to_hf(self.gguf, self.dir)
    self.assertEqual({p.name: p.stat().st_mtime_ns for p in self.dir.iterdir()}, before)
    config = json.loads((self.dir / "config.json").read_text())
    self.assertEqual((config["rms_norm_eps"], config["rope_theta"]), (1e-5, 100000.0))


class HfDirectoryTest(parameterized.TestCase):

  def test_reads_transformers_sharded_checkpoint_into_mesh_shards(self):
    config = dataclasses.replace(TINY, scan_layers=True)
    params = ref.random_params(TINY)
    with tempfile.TemporaryDirectory() as tmp:
      ref.torch_model(TINY, params).save_pretrained(tmp, max_shard_size="100KB")
      self.assertTrue((pathlib.Path(tmp) / hf.INDEX).is_file())
      self.assertEqual(hf.load_config(tmp), TINY)
      mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
      loaded = hf.load_params(tmp, config, mesh)
    kernel = loaded["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, in, out]
    self.assertEqual(kernel.addressable_shards[0].data.shape, (2, 32, 16))
    np.testing.assert_array_equal(kernel[1], params["layers_1"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])

  def test_save_hf_sharded_roundtrip(self):
    params = ref.random_params(llama.PRESETS["tiny_tied"])
    tokenizer = word_tokenizer(["a few words"])  # fits the tiny vocabulary, as load() checks
    with tempfile.TemporaryDirectory() as tmp:
      hf.write_hf(tmp, llama.PRESETS["tiny_tied"],
                  hf.params_to_hf(params, llama.PRESETS["tiny_tied"]), tokenizer,
                  shard_bytes=50_000)
      self.assertTrue(hf.is_complete(tmp))
      self.assertGreater(len(list(pathlib.Path(tmp).glob("model-*-of-*.safetensors"))), 2)
      config, loaded, _ = checkpoints.load(tmp)
    self.assertEqual(config, llama.PRESETS["tiny_tied"])
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

  @parameterized.parameters(None, RopeScaling("linear", 4.0),
                            RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  def test_config_roundtrip(self, scaling):
    config = dataclasses.replace(llama.PRESETS["llama3_8b"], rope_scaling=scaling)
    self.assertEqual(hf.config_from_hf(hf.config_to_hf(config)), config)

  def test_rejects_other_architectures(self):
    with self.assertRaisesRegex(ValueError, "x/config.json: model_type='mistral'"):
      hf.config_from_hf({"model_type": "mistral"}, "x/config.json")
    with self.assertRaisesRegex(ValueError, "attention_bias=True"):
      hf.config_from_hf({**hf.config_to_hf(TINY), "attention_bias": True})

  def test_refuses_a_tokenizer_larger_than_the_vocabulary(self):
    tokenizer = word_tokenizer([" ".join(f"w{i}" for i in range(TINY_LLAMA.vocab_size))])
    directory = hf.save_hf(pathlib.Path(self.create_tempdir().full_path) / "m", TINY_LLAMA,
                           random_params(TINY_LLAMA), tokenizer)
    with self.assertRaisesRegex(ValueError, r"259 tokens but the model's vocab_size is 256"):
      checkpoints.load(directory)


if __name__ == "__main__":
  absltest.main()
