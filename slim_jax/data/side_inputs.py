"""SLIM's side inputs (`models/slim.py`) per mode, from what the encode stage wrote.

Host-side numpy: which rationale each split's rows read (prompts.RATIONALE_OF_SPLIT), the
shuffled control's derangement, the teacher's rationales in place of the student's, and the item
table's padding. The messages name the stage that writes what is missing; the Flax module itself
only ever sees arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slim_jax import prompts
from slim_jax.encode import Encoded
from slim_jax.models.slim import SlimConfig


def derangement(count: int, seed: int) -> np.ndarray:
  """A permutation with no fixed point (for count >= 2): a random cycle through all indices."""
  order = np.random.default_rng(seed).permutation(count)
  permutation = np.empty(count, np.int64)
  permutation[order] = np.roll(order, -1)
  return permutation


def shuffled_sources(present: np.ndarray, seed: int) -> np.ndarray:
  """Whose rationale each user reads in the shuffled control: every user who has one gets a
  different such user's; the others keep their (absent) own."""
  owners = np.flatnonzero(present)
  source = np.arange(len(present))
  source[owners] = owners[derangement(len(owners), seed)]
  return source


def teacher_substituted(encoded: Encoded) -> Encoded:
  """`encoded` whose rationale vectors and token ids are the teacher's wherever the teacher
  wrote one for that user and split, the student's elsewhere."""
  if not encoded.teacher:
    raise ValueError("mode teacher_rationales needs the teacher's rationales encoded with the "
                     "same encoder: run --stages=teacher,encode")
  rationales, tokens = dict(encoded.rationales), dict(encoded.tokens)
  for split, (vectors, present) in encoded.teacher.items():
    if split not in rationales:  # the split reads another split's rationale; keep that one
      continue
    student, has_student = rationales[split]
    rationales[split] = (np.where(present[:, None], vectors, student), has_student | present)
    if split in tokens:
      (ids, lengths), (teacher_ids, teacher_lengths) = tokens[split], encoded.teacher_tokens[split]
      tokens[split] = (np.where(present[:, None], teacher_ids, ids),
                       np.where(present, teacher_lengths, lengths))
  return dataclasses.replace(encoded, rationales=rationales, tokens=tokens)


def teacher_users(encoded: Encoded) -> dict[str, int]:
  """Per split the student has, how many users read the teacher's rationale instead."""
  return {split: int(present.sum()) for split, (_, present) in encoded.teacher.items()
          if split in encoded.rationales}


def padded_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """float32 `array` zero-padded along its first axis to the item table's `rows`."""
  padded = np.zeros((rows, *array.shape[1:]), np.float32)
  padded[:len(array)] = array
  return padded


def side_inputs(encoded: Encoded | None, rows: int, cfg: SlimConfig, mode: str,
                popularity: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
  """What `mode` reads, per split, from the encode stage's vectors (None for plain and
  popularity) or the training `popularity` [I+1] (popularity only).

  Item-text rows [I+1, D] are zero-padded to the item table's `rows`. With
  `cfg.finetune_encoder` the rationale modes also read each user's rationale token ids and their
  lengths.
  """
  per_split = lambda side: {split: side for split in prompts.RATIONALE_OF_SPLIT}
  if mode == "plain":
    return per_split({})
  if mode == "popularity":
    return per_split({"popularity": padded_rows(popularity, rows)})
  if encoded is None:
    raise ValueError(f"mode {mode!r} needs item-text vectors: run --stages=encode")
  item_text = padded_rows(encoded.item_vectors, rows)
  if mode == "item_text":
    return per_split({"item_text": item_text})
  if mode == "teacher_rationales":
    encoded = teacher_substituted(encoded)
  if not encoded.rationales:
    raise ValueError(f"mode {mode!r} needs the student's rationales and none were encoded: run "
                     "--stages=generate,encode")
  sides = {}
  for split, candidates in prompts.RATIONALE_OF_SPLIT.items():
    source = next((s for s in candidates if s in encoded.rationales), None)
    if source is None:
      raise ValueError(f"no rationale vectors for split {split!r}: have "
                       f"{sorted(encoded.rationales)}")
    vectors, present = encoded.rationales[source]
    users = shuffled_sources(present, cfg.seed) if mode == "shuffled" else np.arange(len(present))
    sides[split] = {"rationale": np.asarray(vectors[users], np.float32),
                    "has_rationale": np.asarray(present[users], bool), "item_text": item_text}
    if cfg.finetune_encoder:
      if source not in encoded.tokens:
        raise ValueError("slim.finetune_encoder needs rationale token ids: encode with "
                         "encoder.kind=minilm")
      ids, lengths = encoded.tokens[source]
      sides[split].update(rationale_ids=ids[users], rationale_lengths=lengths[users])
  return sides
