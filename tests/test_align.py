"""MiniLM aligned before it encodes (encoder.kind=minilm_aligned): pairs without a leak, selection
on validation, a Hugging Face directory that transformers reads, and reuse."""

import dataclasses
import json
import pathlib
import tempfile

import jax
import numpy as np
import torch
import transformers
from absl.testing import absltest

from slim_jax import embed, encode, prompts
from slim_jax.models import bert
from slim_jax.train import align
from tests.fixtures import encode_ours, prepared_from_sequences, write_sentence_transformers_dir

CUTOFFS = (0.5, 0.75)


def rationale_rows(prepared, splits=(*map(prompts.cutoff_split, CUTOFFS), "valid", "test")):
  """A rationale per user and split that names the item its history was followed by, so that
  aligning has something to learn."""
  lengths = np.diff(prepared.seq_offsets)
  rows = []
  for user, user_id in enumerate(prepared.user_ids):
    for split in splits:
      end = prompts.history_end(split, int(lengths[user]))
      following = prepared.seq_items[prepared.seq_offsets[user] + end]
      rows.append({"user_id": str(user_id), "split": split,
                   "text": f"next they will like {prepared.item_text[following]}"})
  return rows


def sequences(users: int, items: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.arange(1, items + 1))[:length] for _ in range(users)]


class HuggingFaceDirectoryTest(absltest.TestCase):

  def test_saved_params_are_read_back_by_us_and_by_transformers(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    source = write_sentence_transformers_dir(root / "source")
    model = bert.load(source)
    changed = jax.tree.map(lambda x: np.asarray(x) * 1.1, model.params)
    bert.save(root / "saved", changed, source)
    self.assertEqual(sorted(p.name for p in (root / "saved").rglob("*")),
                     sorted(p.name for p in source.rglob("*")))
    reloaded = bert.load(root / "saved")
    jax.tree.map(np.testing.assert_array_equal, reloaded.params, changed)
    self.assertEqual(reloaded.pooling, model.pooling)

    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], np.int32)
    mask = np.ones_like(ids)
    ours = bert.Bert(reloaded.config).apply({"params": reloaded.params}, ids, mask)
    with torch.no_grad():
      theirs = transformers.BertModel.from_pretrained(root / "saved").eval()(
          torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


class PairsTest(absltest.TestCase):

  def test_training_pairs_are_cutoff_rationales_and_their_training_targets(self):
    prepared = prepared_from_sequences(sequences(6, 20, 12), num_items=20)
    pairs = align.split_pairs(rationale_rows(prepared), prepared)
    lengths = np.diff(prepared.seq_offsets)
    expected_train, expected_valid = [], []
    for user in range(6):
      seq = prepared.sequence(user)
      expected_train += [seq[prompts.history_end(prompts.cutoff_split(c), lengths[user])]
                         for c in CUTOFFS]
      expected_valid.append(seq[-2])
      for c in CUTOFFS:  # a training target: before the validation and test items
        self.assertLess(prompts.history_end(prompts.cutoff_split(c), lengths[user]),
                        lengths[user] - 2)
    np.testing.assert_array_equal(pairs["train"].items, expected_train)
    np.testing.assert_array_equal(pairs["valid"].items, expected_valid)  # no test pair

  def test_items_without_text_and_unknown_users_make_no_pair(self):
    prepared = prepared_from_sequences(sequences(4, 20, 12), num_items=20)
    rows = rationale_rows(prepared) + [{"user_id": "nobody", "split": "valid", "text": "x"}]
    first = prepared.sequence(0)[prompts.history_end("valid", 12)]
    texts = list(prepared.item_text)
    texts[first] = ""
    pairs = align.split_pairs(rows, dataclasses.replace(prepared, item_text=tuple(texts)))
    self.assertLen(pairs["valid"].items, 3)
    self.assertNotIn(first, pairs["valid"].items)

  def test_without_cutoff_rationales_the_error_names_the_setting(self):
    prepared = prepared_from_sequences(sequences(4, 20, 12), num_items=20)
    with self.assertRaisesRegex(ValueError, "prompt.history=causal"):
      align.split_pairs(rationale_rows(prepared, ("valid", "test")), prepared)


class AlignTest(absltest.TestCase):
  """A tiny random sentence-transformers model on synthetic rationales naming the next item."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = pathlib.Path(cls.enterClassContext(tempfile.TemporaryDirectory()))
    cls.source = write_sentence_transformers_dir(root / "source", max_seq_length=24)
    cls.cfg = embed.EncoderConfig(kind="minilm_aligned", checkpoint=str(cls.source),
                                  batch_size=16)
    cls.prepared = prepared_from_sequences(sequences(16, 24, 10), num_items=24)
    cls.rows = rationale_rows(cls.prepared)
    cls.align_cfg = align.AlignConfig(epochs=2, batch=8, lr=1e-3)

  def test_trains_selects_on_validation_and_reuses_what_it_wrote(self):
    out = pathlib.Path(self.create_tempdir().full_path)
    record = align.align(self.cfg, self.prepared, self.rows, out, cfg=self.align_cfg)
    per_epoch = len(align.split_pairs(self.rows, self.prepared)["train"].items) // 8
    self.assertEqual(record["steps"], 2 * per_epoch)
    self.assertEqual([row["step"] for row in record["history"]], [per_epoch, 2 * per_epoch])
    best = max(row[align.VALID_METRIC] for row in record["history"])
    self.assertEqual(record["valid_ndcg@10"], max(best, record["valid_ndcg@10_unaligned"]))
    directory = out / align.ALIGNED
    self.assertFalse((out / "align").exists())  # training checkpoints go once it is written
    saved, source = bert.load(directory).params, bert.load(self.source).params
    unchanged = all(jax.tree.leaves(jax.tree.map(np.array_equal, saved, source)))
    self.assertEqual(unchanged, record["chosen_step"] == 0)
    self.assertEqual(json.loads((directory / align.RECORD).read_text()), record)

    stamp = (directory / bert.WEIGHTS).stat().st_mtime_ns
    self.assertEqual(align.align(self.cfg, self.prepared, self.rows, out, cfg=self.align_cfg),
                     record)
    self.assertEqual((directory / bert.WEIGHTS).stat().st_mtime_ns, stamp)
    other = align.align(self.cfg, self.prepared, self.rows, out,
                        cfg=dataclasses.replace(self.align_cfg, epochs=1))
    self.assertEqual(other["steps"], per_epoch)

  def test_the_encode_stage_encodes_with_the_aligned_directory(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    rationales = root / "rationales.jsonl"
    rationales.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
    summary = encode.encode_stage(self.cfg, self.prepared, {"student": rationales},
                                  root / "encode")
    self.assertEqual(summary["kind"], "minilm_aligned")
    self.assertIn("aligned_valid_ndcg@10", summary)
    aligned = bert.load(root / "encode" / align.ALIGNED)
    expected, _ = encode_ours(aligned, list(self.prepared.item_text[1:]))
    items = np.load(root / "encode" / "item_vectors.npy")
    np.testing.assert_allclose(items[1:], expected, atol=1e-5)
    stored = encode.load_rationales(root / "encode", "student")
    expected, _ = encode_ours(aligned, [row["text"] for row in self.rows])
    np.testing.assert_allclose(stored["vectors"], expected, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
