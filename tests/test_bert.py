"""The BERT sentence encoder against PyTorch references: transformers' BertModel (hidden states of
tiny random checkpoints in every directory layout we read) and sentence-transformers (pooled,
normalised embeddings of the embedded all-MiniLM-L6-v2 and of tiny models in each pooling mode)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # torch references load local directories only
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import torch
from absl.testing import absltest, parameterized
from sentence_transformers import SentenceTransformer

from slim_jax import assets, parallel
from slim_jax.models import bert
from tests.fixtures import (cosine_distance, encode_ours, state_numpy, tiny_torch_bert,
                            write_hf_dir, write_sentence_transformers_dir)

TEXTS = (
    "Toy Story (1995) | Genres: Animation, Children's, Comedy",
    "a",
    "",
    "   padded   with spaces  ",
    "The user prefers dark thrillers and noir. " * 60,  # truncated at max_seq_length
    "Step 1: the user enjoys 1990s comedies. Step 2: likely genres are Comedy, Romance.",
    "Café naïve résumé — 日本語のテキスト",
    "word " * 254,  # 254 words + [CLS] + [SEP]: exactly max_seq_length (256), nothing truncated
)


def write_sharded_legacy_dir(model, directory: pathlib.Path) -> pathlib.Path:
  """Two shards + index, BertForPreTraining-style names ("bert." prefix, LayerNorm gamma/beta)
  and a head tensor that the encoder must ignore."""
  directory.mkdir(parents=True, exist_ok=True)
  model.config.to_json_file(directory / "config.json")
  renamed = {"bert." + name.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): value
             for name, value in state_numpy(model).items()}
  renamed["cls.predictions.bias"] = np.zeros(model.config.vocab_size, np.float32)
  names = sorted(renamed)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, members in shards.items():
    safetensors.numpy.save_file({n: renamed[n] for n in members}, directory / file)
  index = {"metadata": {}, "weight_map": {n: f for f, ms in shards.items() for n in ms}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  return directory


class MiniLMTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.directory = assets.path("minilm")
    cls.model = bert.load(cls.directory)
    cls.reference = SentenceTransformer(str(cls.directory), device="cpu")

  def test_reads_the_sentence_transformers_config(self):
    self.assertEqual(self.model.max_len, 256)  # sentence_bert_config.json, not tokenizer.json's 128
    self.assertEqual(self.model.pooling, bert.Pooling("mean", normalize=True))
    self.assertEqual((self.model.config.num_layers, self.model.config.hidden_size), (6, 384))

  def test_tokens_match_sentence_transformers(self):
    ours = self.model.tokenize(TEXTS)
    theirs = self.reference.tokenize(list(TEXTS))
    for row, tokens in enumerate(ours):
      length = int(theirs["attention_mask"][row].sum())
      np.testing.assert_array_equal(tokens, theirs["input_ids"][row, :length].numpy())
    self.assertEqual(max(len(t) for t in ours), 256)

  def test_embeddings_match_sentence_transformers(self):
    expected = self.reference.encode(list(TEXTS), batch_size=3, convert_to_numpy=True)
    ours, _ = encode_ours(self.model, TEXTS)
    self.assertLess(cosine_distance(ours, expected).max(), 1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
    short, _ = encode_ours(self.model, TEXTS[:4])  # the same texts, padded to another length
    self.assertLess(cosine_distance(short, expected[:4]).max(), 1e-5)

  def test_partition_rules_place_every_param(self):
    for axes in ({"data": 2, "fsdp": 1, "tensor": 4}, {"data": 2, "fsdp": 4, "tensor": 1}):
      mesh = parallel.make_mesh(axes)
      shardings = parallel.param_shardings(self.model.params, bert.PARTITION_RULES, mesh)
      query = shardings["layer_0"]["query"]["kernel"].spec
      self.assertEqual(tuple(query), ("fsdp", "tensor"))
      self.assertEqual(tuple(shardings["layer_5"]["output"]["kernel"].spec), ("tensor", "fsdp"))


class TinyBertTest(parameterized.TestCase):

  @parameterized.product(layout=["single", "sharded_legacy"], hidden_act=["gelu", "gelu_new"])
  def test_hidden_states_match_transformers(self, layout, hidden_act):
    model = tiny_torch_bert(hidden_act)
    write = write_hf_dir if layout == "single" else write_sharded_legacy_dir
    directory = write(model, pathlib.Path(self.create_tempdir().full_path))
    config, params = bert.load_weights(directory)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 11)).astype(np.int32)
    mask = (np.arange(11)[None] < np.array([[11], [5], [1]])).astype(np.int32)
    with torch.no_grad():
      expected = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours = np.asarray(bert.Bert(config).apply({"params": params}, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=2e-5, rtol=1e-5)

  @parameterized.parameters(("mean", True), ("cls", True), ("max", False),
                            ("mean_sqrt_len", False))
  def test_pooling_matches_sentence_transformers(self, mode, normalize):
    directory = write_sentence_transformers_dir(
        pathlib.Path(self.create_tempdir().full_path), mode, normalize)
    model = bert.load(directory)
    self.assertEqual((model.pooling, model.max_len), (bert.Pooling(mode, normalize), 16))
    expected = SentenceTransformer(str(directory), device="cpu").encode(
        list(TEXTS), batch_size=4, convert_to_numpy=True)
    ours, token_ids = encode_ours(model, TEXTS, 20)
    self.assertEqual(max(len(t) for t in token_ids), 16)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)

  def test_gradients_reach_every_param(self):
    """Fine-tuning the encoder inside a jitted step needs d(embedding)/d(params)."""
    config = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                             intermediate_size=24, max_position_embeddings=16)
    shapes = jax.eval_shape(bert.init, config, jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    ids = jnp.array([[1, 5, 7, 0], [2, 3, 4, 9]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
    target = jax.random.normal(jax.random.key(1), (2, 16))
    loss = lambda p: jnp.sum(bert.apply(p, ids, mask, config) * target)
    grads = jax.jit(jax.grad(loss))(params)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
      name = parallel.path_str(path)
      self.assertTrue(np.all(np.isfinite(grad)), name)
      if "token_type" not in name:  # only type 0 is ever used
        self.assertGreater(float(jnp.abs(grad).max()), 0, name)

  def test_bad_directories_name_the_file_and_field(self):
    directory = write_hf_dir(tiny_torch_bert(), pathlib.Path(self.create_tempdir().full_path))
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    del tensors["encoder.layer.1.attention.self.key.weight"]
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    with self.assertRaisesRegex(KeyError, r"encoder\.layer\.1\.attention\.self\.key\.weight"):
      bert.load_weights(directory)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "model_type": "roberta"}))
    with self.assertRaisesRegex(ValueError, r"config\.json: model_type='roberta'"):
      bert.load_weights(directory)

  def test_unsupported_pooling_names_its_config(self):
    directory = write_sentence_transformers_dir(pathlib.Path(self.create_tempdir().full_path))
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode": "weightedmean"}))
    with self.assertRaisesRegex(ValueError, r"1_Pooling/config\.json: pooling \['weightedmean'\]"):
      bert.load(directory)


if __name__ == "__main__":
  absltest.main()
