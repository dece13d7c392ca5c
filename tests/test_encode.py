"""The encoding stage: ml-100k item texts against sentence-transformers on every mesh, the cache
(skip when complete, resume from saved chunks, start over when texts or encoder change), and the
student-LLM encoder against transformers' LlamaModel."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import dataclasses
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl.testing import absltest, parameterized
from sentence_transformers import SentenceTransformer

from slim_jax import assets, embed, encode, parallel
from slim_jax.config import DataConfig
from slim_jax.data import formats, preprocess
from slim_jax.checkpoints import hf
from slim_jax.models import bert, llama
from tests.fixtures import (cosine_distance, encode_ours, prepared_from_sequences,
                            write_sentence_transformers_dir)

MESHES = {
    "unsharded": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "1x8_data": ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
    "2x4_tensor": ({"data": 2, "fsdp": 1, "tensor": 4}, 8),
    "2x4_fsdp": ({"data": 2, "fsdp": 4, "tensor": 1}, 8),
}


def ml100k_item_texts() -> list[str]:
  raw = formats.read_dataset("recbole", assets.path("ml-100k"))
  return list(preprocess.prepare(raw, DataConfig()).item_text[1:])


class ItemTextTest(parameterized.TestCase):
  """A slice of ml-100k item texts, batches of mixed lengths with a padded last batch."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    texts = ml100k_item_texts()
    longest = max(texts, key=len)
    cls.texts = texts[:12] + [longest]  # 13 texts: two batches of 8, three padding rows
    cls.cfg = embed.EncoderConfig(max_len=24, batch_size=8, buckets=(16,))  # buckets 16, 24
    cls.embedder = embed.make_embedder(cls.cfg)
    reference = SentenceTransformer(str(assets.path("minilm")), device="cpu")
    reference.max_seq_length = 24
    cls.expected = reference.encode(cls.texts, convert_to_numpy=True)

  def test_texts_mix_buckets_and_truncate(self):
    lengths = [len(t) for t in self.embedder.tokenize(self.texts)]
    self.assertEqual(max(lengths), 24)  # the longest title is truncated
    self.assertLess(min(lengths), 16)
    self.assertEqual(embed.bucket_lengths(self.cfg.buckets, 24), (16, 24))

  @parameterized.named_parameters(
      (name, axes, devices) for name, (axes, devices) in MESHES.items())
  def test_matches_sentence_transformers_on_mesh(self, axes, devices):
    mesh = parallel.make_mesh(axes, jax.devices()[:devices])
    directory = self.create_tempdir().full_path
    vectors = embed.encode(self.texts, self.cfg, directory, mesh=mesh,
                           embedder=lambda: self.embedder)
    self.assertEqual((vectors.shape, vectors.dtype), ((13, 384), np.float32))
    self.assertLess(cosine_distance(vectors, self.expected).max(), 1e-5)


class CacheTest(absltest.TestCase):
  """A tiny random sentence-transformers model keeps these fast."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    model_dir = write_sentence_transformers_dir(
        pathlib.Path(cls.enterClassContext(tempfile.TemporaryDirectory())))
    cls.cfg = embed.EncoderConfig(checkpoint=str(model_dir), batch_size=8)
    cls.texts = [f"item {i} " + "word " * (i % 7) for i in range(20)]
    cls.expected, _ = encode_ours(bert.load(model_dir), cls.texts)

  def encode(self, directory, texts=None, cfg=None):
    return embed.encode(self.texts if texts is None else texts, cfg or self.cfg, directory,
                        chunk_size=8)

  def test_chunks_assemble_in_input_order_and_are_cleaned_up(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    np.testing.assert_allclose(self.encode(directory), self.expected, atol=1e-6)
    self.assertEqual(sorted(p.name for p in directory.iterdir()),
                     [embed.EMBEDDINGS, embed.MANIFEST])

  def test_resumes_from_saved_chunks(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    directory.joinpath(embed.MANIFEST).write_text(
        json.dumps(embed.manifest_for(self.texts, self.cfg, 8)))
    sentinel = np.full((8, 32), 7.0, np.float32)  # chunk 1 of 3, as left by a killed run
    np.save(embed.chunk_path(directory, 8), sentinel)
    vectors = self.encode(directory)
    np.testing.assert_array_equal(vectors[8:16], sentinel)
    np.testing.assert_allclose(vectors[:8], self.expected[:8], atol=1e-6)
    np.testing.assert_allclose(vectors[16:], self.expected[16:], atol=1e-6)

  def test_complete_is_skipped_and_changes_start_over(self):
    directory = pathlib.Path(self.create_tempdir().full_path) / "cache"
    with self.assertNoLogs("absl", "WARNING"):  # nothing was there to start over from
      self.encode(directory)
    marker = np.zeros((20, 32), np.float32)
    np.save(directory / embed.EMBEDDINGS, marker)  # what a rerun must load, not recompute
    np.testing.assert_array_equal(self.encode(directory), marker)
    changed = self.texts[:-1] + ["another text"]
    with self.assertLogs("absl", "WARNING") as logged:
      vectors = self.encode(directory, texts=changed)
    self.assertIn("holds other texts", logged.output[0])
    np.testing.assert_allclose(vectors[:19], self.expected[:19], atol=1e-6)
    shorter = self.encode(directory, texts=changed, cfg=embed.EncoderConfig(
        checkpoint=self.cfg.checkpoint, batch_size=8, max_len=4))
    self.assertGreater(np.abs(shorter - vectors).max(), 1e-3)


  def test_items_without_text_get_a_zero_vector_and_a_count(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    item_text = ["", "item one", "  ", "item three", ""]  # row 0 is padding
    table, without_text = encode.item_vectors(self.cfg, item_text, directory)
    self.assertEqual(without_text, 2)
    np.testing.assert_array_equal(table[[0, 2, 4]], 0.0)
    expected, _ = encode_ours(bert.load(self.cfg.checkpoint), ["item one", "item three"])
    np.testing.assert_allclose(table[[1, 3]], expected, atol=1e-6)

  def test_the_stage_keys_rationales_by_user_id_and_loads_them_on_any_preparation(self):
    """Rows are joined on raw user ids, so data prepared again with other users (their rows
    shifted) reads every rationale on its own user's row."""
    directory = pathlib.Path(self.create_tempdir().full_path)
    prepared = prepared_from_sequences([np.arange(1, 5)] * 4, num_items=4)  # users u0..u3
    written = {"student": [("u1", "valid", "one likes a"), ("u3", "valid", "three likes b"),
                           ("u3", "test", "three now likes c")],
               "teacher": [("u2", "valid", "the teacher on two")]}
    paths = {}
    for writer, rows in written.items():
      paths[writer] = directory / f"{writer}.jsonl"
      paths[writer].write_text("".join(json.dumps({"user_id": u, "split": s, "text": t}) + "\n"
                                       for u, s, t in rows))
    summary = encode.encode_stage(self.cfg, prepared, paths, directory / "encode")
    self.assertEqual((summary["student_rationales"], summary["teacher_rationales"]), (3, 1))
    expected = dict(zip(["one likes a", "three likes b", "three now likes c"], encode_ours(
        bert.load(self.cfg.checkpoint), ["one likes a", "three likes b", "three now likes c"])[0]))

    again = dataclasses.replace(prepared_from_sequences([np.arange(1, 5)] * 3, num_items=4),
                                user_ids=np.array(["u3", "u0", "u1"]))  # u2 filtered out
    encoded = encode.load_encoded(directory / "encode", again)
    vectors, present = encoded.rationales["valid"]
    np.testing.assert_array_equal(present, [True, False, True])
    np.testing.assert_allclose(vectors[[0, 2]], [expected["three likes b"],
                                                 expected["one likes a"]], atol=1e-6)
    np.testing.assert_array_equal(vectors[1], 0.0)
    np.testing.assert_array_equal(encoded.rationales["test"][1], [True, False, False])
    np.testing.assert_allclose(encoded.rationales["test"][0][0], expected["three now likes c"],
                               atol=1e-6)
    ids, lengths = encoded.tokens["valid"]
    tokens = bert.load(self.cfg.checkpoint).tokenize(["three likes b"])[0]
    np.testing.assert_array_equal(ids[0, :lengths[0]], tokens)
    self.assertEqual(lengths[1], 0)
    np.testing.assert_array_equal(encoded.teacher["valid"][1], False)  # u2 is not prepared


def _encoded_for_postprocess(seed: int = 0) -> encode.Encoded:
  """Items and rationales around a shared direction, as sentence vectors are; user 3 has no
  training rationale, item 2 no text."""
  rng = np.random.default_rng(seed)
  shared = 3.0 * np.ones(6)
  items = shared + rng.normal(size=(8, 6)) * np.linspace(0.2, 2.0, 6)
  items[[0, 2]] = 0.0
  train = shared + rng.normal(size=(5, 6)) * np.linspace(2.0, 0.2, 6)
  has_train = np.array([True, True, True, False, True])
  train[~has_train] = 0.0
  test = shared + rng.normal(size=(5, 6))
  return encode.Encoded(items.astype(np.float32),
                        {"valid": (train.astype(np.float32), has_train),
                         "test": (test.astype(np.float32), np.ones(5, bool))},
                        teacher={"valid": (test.astype(np.float32), np.ones(5, bool))})


class PostprocessTest(parameterized.TestCase):

  @parameterized.parameters("center", "whiten")
  def test_statistics_come_from_training_rationales_and_items_only(self, kind):
    encoded = _encoded_for_postprocess()
    processed = encode.postprocessed(encoded, kind)
    # What only the test reads (and the teacher's rationales) changes: the statistics do not.
    test_vectors, present = encoded.rationales["test"]
    moved = dataclasses.replace(encoded, rationales={**encoded.rationales, "test": (
        test_vectors + 100.0, present)}, teacher={"valid": (test_vectors - 50.0, present)})
    again = encode.postprocessed(moved, kind)
    np.testing.assert_array_equal(again.rationales["valid"][0], processed.rationales["valid"][0])
    np.testing.assert_array_equal(again.item_vectors, processed.item_vectors)
    # A user without a training rationale adds nothing either; a training rationale does.
    train, has_train = encoded.rationales["valid"]
    absent = dataclasses.replace(encoded, rationales={**encoded.rationales, "valid": (
        train + 7.0 * ~has_train[:, None], has_train)})
    np.testing.assert_array_equal(encode.postprocessed(absent, kind).rationales["test"][0],
                                  processed.rationales["test"][0])
    shifted = dataclasses.replace(encoded, rationales={**encoded.rationales, "valid": (
        train + 1.0, has_train)})
    self.assertFalse(np.allclose(encode.postprocessed(shifted, kind).rationales["test"][0],
                                 processed.rationales["test"][0]))

  @parameterized.parameters("center", "whiten")
  def test_training_rationales_are_centred_and_absent_rows_stay_zero(self, kind):
    processed = encode.postprocessed(_encoded_for_postprocess(), kind)
    vectors, present = processed.rationales["valid"]
    np.testing.assert_allclose(vectors[present].mean(0), 0.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[~present], 0.0)
    np.testing.assert_array_equal(processed.item_vectors[[0, 2]], 0.0)
    has_text = np.ones(8, bool)
    has_text[[0, 2]] = False
    np.testing.assert_allclose(processed.item_vectors[has_text].mean(0), 0.0, atol=1e-5)
    self.assertFalse(np.allclose(processed.teacher["valid"][0],
                                 _encoded_for_postprocess().teacher["valid"][0]))

  def test_whitened_items_have_unit_covariance(self):
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    items = (rng.normal(size=(400, 6)) * np.linspace(1.0, 3.0, 6)) @ rotation + 2.0
    encoded = encode.Encoded(np.concatenate([np.zeros((1, 6)), items]).astype(np.float32), {})
    whitened = encode.postprocessed(encoded, "whiten").item_vectors[1:]
    # Off by the shrinkage alone: 1e-3 of the mean variance against the smallest, ~1/5 of it.
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(6), atol=1e-2)

  def test_none_is_the_identity_and_unknown_kinds_fail(self):
    encoded = _encoded_for_postprocess()
    self.assertIs(encode.postprocessed(encoded, "none"), encoded)
    with self.assertRaisesRegex(ValueError, "encoder.postprocess='pca'"):
      encode.postprocessed(encoded, "pca")


class LlmPooledTest(absltest.TestCase):

  def test_matches_transformers_llama_mean_pooled(self):
    """The "student's pooled hidden states" encoder is LlamaModel's last_hidden_state, averaged
    over real (right-padded) tokens and L2-normalised."""
    config = llama.PRESETS["tiny"]
    shapes = jax.eval_shape(lambda: llama.Llama(config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
    model = transformers.LlamaModel(transformers.LlamaConfig(**hf.config_to_hf(config))).eval()
    model.load_state_dict({name.removeprefix("model."): torch.tensor(value) for name, value in
                           hf.params_to_hf(params, config).items() if name.startswith("model.")})
    ids = rng.integers(1, config.vocab_size, (3, 9)).astype(np.int32)
    mask = (np.arange(9)[None] < np.array([[9], [4], [1]])).astype(np.int32)
    with torch.no_grad():
      hidden = model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    expected = np.sum(hidden * mask[..., None], 1) / mask.sum(1, keepdims=True)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    ours = jax.jit(embed.llm_embed(config))(params, ids, mask)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
