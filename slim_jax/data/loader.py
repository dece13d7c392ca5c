"""The one data loader: grain pipelines that feed every trainer in the project.

Every pipeline is a grain ``MapDataset`` over *example indices*: shuffled under a seed (anew each
epoch), batched, and turned into arrays by one vectorised numpy function per batch, so the loader
costs microseconds per batch and never stalls a jitted step. Each JAX process builds the same
global batch of indices and materialises only its own rows; `parallel.global_batch` then
assembles the global ``jax.Array`` sharded over the mesh's batch axes. Iterator state is a small
dict (grain's), saved with the model so a resumed run sees the same next batch. grain is imported
when a training pipeline is built, not with this module, which every trainer and so every config
section beside one imports.

Item sequences are LEFT-padded with 0: the most recent item is always the last column. Every
next-item batch also says where its rows are: "users" and "positions", the position of the last
column's target in its user's sequence (what SLIM's causal schedule reads rationales by).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from slim_jax import parallel

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Item sequences.


def gather_left_padded(items: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                       length: int) -> np.ndarray:
  """Rows of `items[start:end]`, the last `length` of them, left-padded with 0."""
  positions = ends[:, None] - length + np.arange(length)
  visible = positions >= starts[:, None]
  return np.where(visible, items[np.clip(positions, 0, len(items) - 1)], 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Flat item ids with per-row [start, end) bounds: users' sequences or split histories."""
  items: np.ndarray  # int32 [N]
  starts: np.ndarray  # int64 [R]
  ends: np.ndarray  # int64 [R]

  @classmethod
  def from_offsets(cls, items: np.ndarray, offsets: np.ndarray) -> "Sequences":
    return cls(np.asarray(items), np.asarray(offsets[:-1]), np.asarray(offsets[1:]))


def padded_sequences(prepared) -> np.ndarray:
  """int32[U, N]: every user's whole sequence, oldest first, right-padded with 0."""
  lengths = np.diff(prepared.seq_offsets)
  positions = np.arange(lengths.max())
  inside = positions < lengths[:, None]
  index = np.minimum(prepared.seq_offsets[:-1, None] + positions, len(prepared.seq_items) - 1)
  return np.where(inside, prepared.seq_items[index], 0).astype(np.int32)


def training_part(prepared) -> Sequences:
  """Each user's sequence less its last two items (the valid and test targets); row = user."""
  whole = Sequences.from_offsets(prepared.seq_items, prepared.seq_offsets)
  return dataclasses.replace(whole, ends=whole.ends - 2)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
  """[0..c0), [0..c1), ... concatenated."""
  return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def last_position_examples(train: Sequences) -> tuple[np.ndarray, np.ndarray]:
  """(row, target position) for every prefix of every training sequence, as RecBole trains."""
  counts = np.maximum(train.ends - train.starts - 1, 0)
  rows = np.repeat(np.arange(len(counts)), counts)
  return rows, train.starts[rows] + 1 + _ragged_arange(counts)


def per_position_examples(train: Sequences, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, window end) of windows ending every `stride` items back from each sequence's end.

  With a `stride` below the window length consecutive windows overlap, and `per_position_batch`
  puts the loss on each window's last `stride` targets only: every item after the first is a
  target exactly once, yet each sees up to a whole window of context (stride = window length
  tiles the sequence, SASRec-style).
  """
  rows, ends = [], []
  for row, (start, end) in enumerate(zip(train.starts, train.ends)):
    window_ends = np.arange(end, start + 1, -stride)
    rows.append(np.full(len(window_ends), row))
    ends.append(window_ends)
  return np.concatenate(rows), np.concatenate(ends)


def last_position_batch(train: Sequences, rows: np.ndarray, targets: np.ndarray,
                        max_len: int) -> Batch:
  return {"inputs": gather_left_padded(train.items, train.starts[rows], targets, max_len),
          "targets": train.items[targets].astype(np.int32), "users": rows.astype(np.int32),
          "positions": (targets - train.starts[rows]).astype(np.int32)}


def per_position_batch(train: Sequences, rows: np.ndarray, ends: np.ndarray, max_len: int,
                       stride: int | None = None) -> Batch:
  """Windows of `max_len` inputs and their next items; targets before the last `stride` columns
  are 0 (no loss): an overlapping later window owns them."""
  starts = train.starts[rows]
  targets = gather_left_padded(train.items, starts + 1, ends, max_len)
  owned = np.arange(max_len) >= max_len - (stride or max_len)
  return {"inputs": gather_left_padded(train.items, starts, ends - 1, max_len),
          "targets": np.where(owned, targets, 0).astype(np.int32),
          "users": rows.astype(np.int32), "positions": (ends - 1 - starts).astype(np.int32)}


def eval_batch(history: Sequences, targets: np.ndarray, users: np.ndarray, rows: np.ndarray,
               max_len: int) -> Batch:
  """Visible history (its last `max_len` items) and target; rows < 0 are padding rows."""
  valid = rows >= 0
  safe = np.where(valid, rows, 0)
  inputs = gather_left_padded(history.items, history.starts[safe], history.ends[safe], max_len)
  return {"inputs": np.where(valid[:, None], inputs, 0),
          "targets": np.where(valid, targets[safe], 0).astype(np.int32),
          "users": np.where(valid, users[safe], -1).astype(np.int32),
          "positions": np.where(valid, history.ends[safe] - history.starts[safe], 0)
          .astype(np.int32), "valid": valid}


# ---------------------------------------------------------------------------------------------
# Language-model and text batches.


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` (so each bucket compiles once)."""
  for bucket in sorted(buckets):
    if length <= bucket:
      return bucket
  raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def lm_batch(prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray],
             buckets: Sequence[int], pad_id: int) -> Batch:
  """Prompt + target token rows, right-padded to a bucket; the loss is on target tokens only.

  `loss_mask[b, t]` is 1 where `tokens[b, t]` is a target token, i.e. a token to predict from
  `tokens[b, :t]`. `segment_ids` is 1 on real tokens and 0 on padding.
  """
  rows = [np.concatenate([p, t]) for p, t in zip(prompts, targets)]
  length = bucket_length(max(len(r) for r in rows), buckets)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  loss_mask = np.zeros((len(rows), length), np.float32)
  segment_ids = np.zeros((len(rows), length), np.int32)
  for b, (prompt, row) in enumerate(zip(prompts, rows)):
    tokens[b, :len(row)] = row
    loss_mask[b, len(prompt):len(row)] = 1
    segment_ids[b, :len(row)] = 1
  positions = np.maximum(np.cumsum(segment_ids > 0, axis=1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids,
          "positions": positions}


def pack_examples(lengths: Sequence[int], row_length: int) -> list[list[int]]:
  """Greedy first-fit packing of example indices into rows of `row_length` tokens."""
  rows, free = [], []
  for index in np.argsort(-np.asarray(lengths), kind="stable"):
    length = int(lengths[index])
    if length > row_length:
      raise ValueError(f"example {index} has {length} tokens, more than the row length {row_length}")
    for r, space in enumerate(free):
      if space >= length:
        rows[r].append(int(index))
        free[r] -= length
        break
    else:
      rows.append([int(index)])
      free.append(row_length - length)
  return rows


def packed_lm_batch(prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                    packs: Sequence[Sequence[int]], row_length: int, pad_id: int) -> Batch:
  """Several examples per row; `segment_ids` 1, 2, ... keep attention inside each example."""
  batch = {"tokens": np.full((len(packs), row_length), pad_id, np.int32),
           "loss_mask": np.zeros((len(packs), row_length), np.float32),
           "segment_ids": np.zeros((len(packs), row_length), np.int32),
           "positions": np.zeros((len(packs), row_length), np.int32)}
  for b, pack in enumerate(packs):
    offset = 0
    for segment, index in enumerate(pack, start=1):
      prompt, target = prompts[index], targets[index]
      end = offset + len(prompt) + len(target)
      batch["tokens"][b, offset:end] = np.concatenate([prompt, target])
      batch["loss_mask"][b, offset + len(prompt):end] = 1
      batch["segment_ids"][b, offset:end] = segment
      batch["positions"][b, offset:end] = np.arange(end - offset)
      offset = end
  return batch


def text_batch(token_ids: Sequence[np.ndarray], rows: np.ndarray, buckets: Sequence[int],
               pad_id: int) -> Batch:
  """Token rows right-padded to a bucket with an attention mask; rows < 0 are padding rows."""
  valid = rows >= 0
  chosen = [token_ids[r] if r >= 0 else np.zeros(0, np.int32) for r in rows]
  length = bucket_length(max(1, max(len(t) for t in chosen)), buckets)
  input_ids = np.full((len(rows), length), pad_id, np.int32)
  attention_mask = np.zeros((len(rows), length), np.int32)
  for b, ids in enumerate(chosen):
    input_ids[b, :len(ids)] = ids
    attention_mask[b, :len(ids)] = 1
  return {"input_ids": input_ids, "attention_mask": attention_mask,
          "index": np.where(valid, rows, -1).astype(np.int32), "valid": valid}


# ---------------------------------------------------------------------------------------------
# Pipelines: index datasets -> batches of global arrays.


class BatchIterator(Iterator[dict[str, jax.Array]]):
  """Global, mesh-sharded batches from a grain iterator; its state saves and restores."""

  def __init__(self, dataset: Iterable[Batch], mesh: jax.sharding.Mesh | None):
    self._iterator = iter(dataset)
    self._mesh = mesh

  def __next__(self):
    batch = next(self._iterator)
    return batch if self._mesh is None else parallel.global_batch(batch, self._mesh)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: Mapping) -> None:
    self._iterator.set_state(dict(state))


def _process_rows(indices: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch of indices."""
  share = len(indices) // jax.process_count()
  return indices[jax.process_index() * share:(jax.process_index() + 1) * share]


def _check_batch_size(batch_size: int, mesh: jax.sharding.Mesh | None) -> None:
  """Each process feeds its own rows of a global batch (`_process_rows`), so the batch splits
  evenly over the processes and the mesh gives each process batch shards of its own."""
  if batch_size % jax.process_count():
    raise ValueError(f"global batch size {batch_size} is not a multiple of "
                     f"{jax.process_count()}, the number of processes")
  if mesh is None:
    return
  if batch_size % parallel.batch_size_multiple(mesh):
    raise ValueError(f"batch size {batch_size} is not a multiple of "
                     f"{parallel.batch_size_multiple(mesh)}, the devices on the batch axes")
  batch_dims = [mesh.axis_names.index(axis) for axis in parallel.batch_axes(mesh)]
  owners = {}
  for index, device in np.ndenumerate(mesh.devices):
    owners.setdefault(tuple(index[d] for d in batch_dims), set()).add(device.process_index)
  if any(len(processes) > 1 for processes in owners.values()):
    raise ValueError(f"mesh {dict(mesh.shape)}: its batch axes {parallel.batch_axes(mesh)} do "
                     f"not span the {jax.process_count()} processes (a batch shard lies on "
                     "devices of several processes, which would feed it different rows); "
                     "give the batch axes (data, fsdp) at least one device per process")


def training_batches(num_examples: int, make_batch: Callable[[np.ndarray], Batch], *,
                     batch_size: int, seed: int, mesh: jax.sharding.Mesh | None,
                     num_epochs: int | None = None, prefetch: int = 2) -> BatchIterator:
  """Shuffled (anew each epoch), fixed-size batches of `make_batch(example indices)`.

  Batches run across epoch boundaries, so no example is dropped or repeated within an epoch
  except at the very end of the last one.
  """
  import grain
  _check_batch_size(batch_size, mesh)
  dataset = (grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(num_epochs)
             .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
             .map(lambda indices: make_batch(_process_rows(indices))))
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return BatchIterator(dataset.to_iter_dataset(options), mesh)


def ordered_batches(num_rows: int, make_batch: Callable[[np.ndarray], Batch], *,
                    batch_size: int, mesh: jax.sharding.Mesh | None) -> Iterator[dict]:
  """Every row once, in order, for evaluation and encoding; the last batch is padded with rows
  of index -1 so all batches share one shape (one compilation)."""
  _check_batch_size(batch_size, mesh)
  for begin in range(0, num_rows, batch_size):
    indices = np.arange(begin, begin + batch_size)
    batch = make_batch(_process_rows(np.where(indices < num_rows, indices, -1)))
    yield batch if mesh is None else parallel.global_batch(batch, mesh)


def next_item_training(prepared, *, max_len: int, batch_size: int, seed: int,
                       mesh: jax.sharding.Mesh | None, per_position: bool,
                       stride: int | None = None,
                       num_epochs: int | None = None) -> tuple[BatchIterator, int]:
  """Recommender training batches and the number of batches per epoch; per-position windows
  end every `stride` items (default `max_len`: no overlap)."""
  train = training_part(prepared)
  if per_position:
    stride = stride or max_len
    rows, ends = per_position_examples(train, stride)
    make = lambda i: per_position_batch(train, rows[i], ends[i], max_len, stride)
  else:
    rows, ends = last_position_examples(train)
    make = lambda i: last_position_batch(train, rows[i], ends[i], max_len)
  iterator = training_batches(len(rows), make, batch_size=batch_size, seed=seed, mesh=mesh,
                              num_epochs=num_epochs)
  return iterator, len(rows) // batch_size


def lm_training(prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
                batch_size: int, buckets: Sequence[int], pad_id: int, seed: int,
                mesh: jax.sharding.Mesh | None, pack: bool = False,
                num_epochs: int | None = None) -> tuple[BatchIterator, int]:
  """Distillation batches (prompt -> rationale) and the number of batches per epoch.

  With `pack`, examples are first packed into rows of the largest bucket.
  """
  if pack:
    row_length = max(buckets)
    packs = pack_examples([len(p) + len(t) for p, t in zip(prompts, targets)], row_length)
    make = lambda i: packed_lm_batch(prompts, targets, [packs[j] for j in i], row_length, pad_id)
    num_rows = len(packs)
  else:
    make = lambda i: lm_batch([prompts[j] for j in i], [targets[j] for j in i], buckets, pad_id)
    num_rows = len(prompts)
  iterator = training_batches(num_rows, make, batch_size=batch_size, seed=seed, mesh=mesh,
                              num_epochs=num_epochs)
  return iterator, num_rows // batch_size


def lm_eval_batches(prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
                    batch_size: int, buckets: Sequence[int], pad_id: int,
                    mesh: jax.sharding.Mesh | None) -> Iterator[dict]:
  """Every (prompt, target) example once, in order, for held-out losses; padding rows are
  empty, so they carry no loss."""
  empty = np.zeros(0, np.int32)
  pick = lambda rows_of, rows: [rows_of[r] if r >= 0 else empty for r in rows]
  return ordered_batches(
      len(prompts),
      lambda rows: lm_batch(pick(prompts, rows), pick(targets, rows), buckets, pad_id),
      batch_size=batch_size, mesh=mesh)


def text_batches(token_ids: Sequence[np.ndarray], *, batch_size: int, buckets: Sequence[int],
                 pad_id: int, mesh: jax.sharding.Mesh | None) -> Iterator[dict]:
  """Encoder batches over every text once, in order ("index" says which text a row holds)."""
  return ordered_batches(len(token_ids),
                         lambda rows: text_batch(token_ids, rows, buckets, pad_id),
                         batch_size=batch_size, mesh=mesh)


def next_item_eval(prepared, split: str, *, max_len: int, batch_size: int,
                   mesh: jax.sharding.Mesh | None) -> Iterator[dict]:
  """Evaluation batches for `split` ("valid" or "test"): one row per user, in user order."""
  data = prepared.split(split)
  history = Sequences.from_offsets(data.history_items, data.history_offsets)
  return ordered_batches(
      len(data.targets),
      lambda rows: eval_batch(history, data.targets, data.users, rows, max_len),
      batch_size=batch_size, mesh=mesh)
