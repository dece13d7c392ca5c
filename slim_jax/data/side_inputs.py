"""SLIM's side inputs (`models/slim.py`) per mode and split, from what the encode stage wrote.

Host-side numpy: each user's rationale slots and their cut-offs under `slim.rationale_schedule`
(causal: every rationale the student wrote, each read from its own cut-off on; paper: the one
written from seq[:-2], read by every training row), the controls' substitutions (shuffled,
constant_rationale, item_text_permuted, the teacher's rationales), history_text's summaries under
the paper's schedule, and the item table's padding. The messages name the stage and the setting
that write what is missing; the Flax module itself only ever sees arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slim_jax import prompts
from slim_jax.data import loader
from slim_jax.encode import Encoded
from slim_jax.models.slim import NEVER, SlimConfig, history_summary

SPLITS = ("train", "valid", "test")


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


def derangement_seed(cfg: SlimConfig, rec_seed: int) -> int:
  """The derangements' seed: one per (slim.seed, rec.seed), so each recommender seed of a sweep
  draws its own shuffle instead of all of them repeating one."""
  return int(np.random.SeedSequence([cfg.seed, rec_seed]).generate_state(1)[0])


def permuted_items(item_text: np.ndarray, seed: int) -> np.ndarray:
  """item_text_permuted: each item (rows 1..I) reads another item's text; padding stays."""
  permuted = item_text.copy()
  permuted[1:] = item_text[1:][derangement(len(item_text) - 1, seed)]
  return permuted


def causal_splits(encoded: Encoded) -> list[str]:
  """Every rationale split the student wrote, ascending by cut-off; an error naming the stage
  and the setting when the causal schedule's cut-off or test rationales are missing."""
  splits = sorted(encoded.rationales, key=prompts.slot_order)
  if "test" not in splits or not any(s.startswith(prompts.CUTOFF) for s in splits):
    raise ValueError(
        "slim.rationale_schedule=causal reads rationales written at cut-offs of each training "
        f"sequence and from seq[:-1]; the encoded student rationales cover {splits}: run "
        "--stages=generate,encode with prompt.history=causal, or set "
        "slim.rationale_schedule=paper")
  return splits


def paper_split(encoded: Encoded, split: str) -> str:
  """The one rationale the rows of `split` read under the paper's schedule."""
  source = next((s for s in prompts.RATIONALE_OF_SPLIT[split] if s in encoded.rationales), None)
  if source is None:
    raise ValueError(f"no rationale vectors for split {split!r}: have {sorted(encoded.rationales)}")
  return source


def rationale_slots(encoded: Encoded, splits: list[str], lengths: np.ndarray | None,
                    tokens: bool) -> dict[str, np.ndarray]:
  """The side's rationale keys for the slots `splits` (ascending): cut-offs from each user's
  sequence `lengths` (causal), or 0 (None: read by every row), NEVER where a user has none."""
  present = np.stack([encoded.rationales[s][1] for s in splits], 1)
  ends = (0 if lengths is None else
          np.stack([[prompts.history_end(s, n) for n in lengths] for s in splits], 1))
  side = {"rationale": np.stack([encoded.rationales[s][0] for s in splits], 1).astype(np.float32),
          "rationale_cutoff": np.where(present, ends, NEVER).astype(np.int32)}
  if tokens:
    missing = [s for s in splits if s not in encoded.tokens]
    if missing:
      raise ValueError("slim.finetune_encoder needs rationale token ids: encode with "
                       "encoder.kind=minilm")
    side["rationale_ids"] = np.stack([encoded.tokens[s][0] for s in splits], 1)
    side["rationale_lengths"] = np.stack([encoded.tokens[s][1] for s in splits], 1)
  return side


def shuffled(side: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
  """Each slot's rationales (and token ids) moved to other users who have that slot."""
  out = dict(side)
  present = side["rationale_cutoff"] != NEVER
  for name in ("rationale", "rationale_ids", "rationale_lengths"):
    if name in side:
      out[name] = np.stack([side[name][shuffled_sources(present[:, s], seed), s]
                            for s in range(present.shape[1])], 1)
  return out


def constant(side: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every rationale replaced by the mean of all of them; who reads one, and when, unchanged."""
  if "rationale_ids" in side:
    raise ValueError("constant_rationale reads the mean rationale vector, which has no tokens "
                     "to fine-tune the encoder on: drop slim.finetune_encoder")
  present = side["rationale_cutoff"] != NEVER
  mean = side["rationale"][present].mean(0)
  return {**side, "rationale": np.broadcast_to(mean, side["rationale"].shape).copy()}


def history_summaries(item_vectors: np.ndarray, prepared, split: str, items: int) -> dict:
  """history_text under the paper's schedule: per user, the summary the step computes under the
  causal one (`slim.history_summary`) of the last `items` items of `split`'s history, as one
  slot that every row reads."""
  data = prepared.split(split)
  history = loader.Sequences.from_offsets(data.history_items, data.history_offsets)
  inputs = loader.gather_left_padded(history.items, history.starts, history.ends, items)
  vectors, has = history_summary(inputs, item_vectors, prepared.num_items, items)
  return {"rationale": np.asarray(vectors[:, -1:], np.float32),
          "rationale_cutoff": np.where(np.asarray(has[:, -1:]), 0, NEVER).astype(np.int32)}


def side_inputs(encoded: Encoded | None, prepared, rows: int, cfg: SlimConfig, mode: str,
                rec_seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """What `mode` reads, per split, from the encode stage's vectors (None for plain and
  popularity) and `prepared` (sequence lengths, training popularity).

  Item-text rows [I+1, D] are zero-padded to the item table's `rows`. With
  `cfg.finetune_encoder` the rationale modes also read each slot's token ids and lengths.
  """
  per_split = lambda side: {split: side for split in SPLITS}
  if mode == "plain":
    return per_split({})
  if mode == "popularity":
    return per_split({"popularity": padded_rows(prepared.item_popularity(), rows)})
  if encoded is None:
    raise ValueError(f"mode {mode!r} needs item-text vectors: run --stages=encode")
  seed = derangement_seed(cfg, rec_seed)
  item_vectors = (permuted_items(encoded.item_vectors, seed) if mode == "item_text_permuted"
                  else encoded.item_vectors)
  item_text = {"item_text": padded_rows(item_vectors, rows)}
  if mode in ("item_text", "item_text_permuted"):
    return per_split(item_text)
  causal = cfg.rationale_schedule == "causal"
  if mode == "history_text":
    if causal:  # computed per row inside the step from its own inputs
      return per_split(item_text)
    summary = lambda split: {**history_summaries(item_vectors, prepared, split,
                                                 cfg.history_text_items), **item_text}
    return {"train": summary("valid"), "valid": summary("valid"), "test": summary("test")}
  if mode == "teacher_rationales":
    encoded = teacher_substituted(encoded)
  if not encoded.rationales:
    raise ValueError(f"mode {mode!r} needs the student's rationales and none were encoded: run "
                     "--stages=generate,encode")
  if causal:
    tables = dict.fromkeys(SPLITS, causal_splits(encoded))
    lengths = np.diff(prepared.seq_offsets)
  else:
    tables = {split: [paper_split(encoded, split)] for split in SPLITS}
    lengths = None
  sides = {}
  for split, splits in tables.items():
    side = rationale_slots(encoded, splits, lengths, cfg.finetune_encoder)
    if mode == "shuffled":
      side = shuffled(side, seed)
    if mode == "constant_rationale":
      side = constant(side)
    sides[split] = {**side, **item_text}
  return sides
