"""The BERT sentence encoder against PyTorch references: transformers' BertModel (hidden states of
tiny random checkpoints in every directory layout we read) and sentence-transformers (pooled,
normalised embeddings of the embedded all-MiniLM-L6-v2 and of tiny models in each pooling mode)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # torch references load local directories only
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import torch
import transformers
from absl.testing import absltest, parameterized
from sentence_transformers import SentenceTransformer

from slim_jax import assets, parallel
from slim_jax.models import bert

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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def padded(token_ids, length):
  ids = np.zeros((len(token_ids), length), np.int32)
  mask = np.zeros((len(token_ids), length), np.int32)
  for row, tokens in enumerate(token_ids):
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask


def cosine_distance(a, b):
  return 1 - np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def tiny_torch_bert(hidden_act="gelu", vocab_size=99, seed=0):
  """A random BertModel whose weights are all O(0.1-1), so every parameter matters."""
  config = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, hidden_act=hidden_act,
      layer_norm_eps=1e-12)
  torch.manual_seed(seed)
  model = transformers.BertModel(config).eval()
  with torch.no_grad():
    for name, value in model.named_parameters():
      value.copy_(torch.randn_like(value) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
  return model


def state_numpy(model):
  return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def write_hf_dir(model, directory: pathlib.Path) -> pathlib.Path:
  """config.json + model.safetensors as save_pretrained writes them, through safetensors."""
  directory.mkdir(parents=True, exist_ok=True)
  model.config.to_json_file(directory / "config.json")
  safetensors.numpy.save_file(state_numpy(model), directory / "model.safetensors")
  return directory


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


def write_sentence_transformers_dir(directory: pathlib.Path, mode="mean", normalize=True,
                                    max_seq_length=16, seed=0) -> pathlib.Path:
  """A tiny random sentence-transformers model using all-MiniLM-L6-v2's tokenizer."""
  minilm = assets.path("minilm")
  write_hf_dir(tiny_torch_bert(vocab_size=30522, seed=seed), directory)
  for name in TOKENIZER_FILES:
    shutil.copy(minilm / name, directory / name)
  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  (directory / "modules.json").write_text(json.dumps(modules))
  (directory / "sentence_bert_config.json").write_text(
      json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
  (directory / "1_Pooling").mkdir()
  keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
          "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
  pooling = {"word_embedding_dimension": 32, **{key: m == mode for m, key in keys.items()}}
  (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  return directory


def encode_ours(model: bert.SentenceEncoder, texts, length=None):
  token_ids = model.tokenize(texts)
  ids, mask = padded(token_ids, length or max(len(t) for t in token_ids))
  apply = jax.jit(bert.apply, static_argnums=(3, 4))
  return np.asarray(apply(model.params, ids, mask, model.config, model.pooling)), token_ids


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
