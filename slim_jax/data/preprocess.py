"""From raw interactions to chronological user sequences with a leave-one-out split.

Steps: optional rating threshold; user/item k-core iterated to a fixed point; users with fewer
than three interactions dropped (leave-one-out needs a training, a validation and a test item);
contiguous ids in order of first appearance in the file (RecBole's remapping order), with item 0
reserved for padding; a stable chronological order per user; item texts from the metadata.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from slim_jax import checks, multihost
from slim_jax.data import formats
from slim_jax.data.formats import ItemMeta, RawDataset

MIN_SEQ_LEN = 3  # train, valid and test targets
TIME_ORDERS = ("recbole", "exact")
_HIDDEN_AFTER_TARGET = {"train": 2, "valid": 1, "test": 0}  # items after a split's target


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which dataset to read and how to turn it into leave-one-out sequences."""
  name: str = "ml-100k"
  format: str = "recbole"  # one of formats.FORMATS
  path: str = ""  # "" = the embedded ml-100k asset
  on_error: str = "raise"  # raise | skip (malformed lines)
  min_rating: float | None = None
  user_core: int = 0
  item_core: int = 0
  # Chronological order: recbole by (float32 scaled time, file position), exact by (time,
  # position); see time_key.
  time_order: str = "recbole"
  item_text_max_chars: int = 256

  def checked(self) -> DataConfig:
    checks.one_of("data.format", self.format, formats.FORMATS)
    checks.one_of("data.on_error", self.on_error, formats.ON_ERROR)
    checks.one_of("data.time_order", self.time_order, TIME_ORDERS)
    checks.within(self, "data", "[0, inf)", "user_core", "item_core")
    checks.within(self, "data", "[1, inf)", "item_text_max_chars")
    return self


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One leave-one-out split: a target per user and exactly the history visible before it."""
  users: np.ndarray  # int32 [U]
  targets: np.ndarray  # int32 [U]
  history_items: np.ndarray  # int32, every row's history concatenated (untruncated)
  history_offsets: np.ndarray  # int64 [U+1]

  def history(self, row: int) -> np.ndarray:
    return self.history_items[self.history_offsets[row]:self.history_offsets[row + 1]]


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
  """Chronological item sequences of contiguous users; item 0 is padding."""
  user_ids: np.ndarray  # str [U] raw id of user u
  item_ids: np.ndarray  # str [I+1] raw id of item i; item_ids[0] == ""
  item_text: tuple[str, ...]  # [I+1]; item_text[0] == ""
  item_meta: tuple[ItemMeta, ...]  # [I+1]
  seq_items: np.ndarray  # int32 [N] all sequences concatenated
  seq_offsets: np.ndarray  # int64 [U+1]
  stats: Mapping[str, float | int]

  @property
  def num_users(self) -> int:
    return len(self.user_ids)

  @property
  def num_items(self) -> int:
    return len(self.item_ids) - 1

  def sequence(self, u: int) -> np.ndarray:
    return self.seq_items[self.seq_offsets[u]:self.seq_offsets[u + 1]]

  def rows_of(self, user_ids: Sequence[str]) -> np.ndarray:
    """int64 row index of each raw user id, -1 for one this preparation does not hold: artifacts
    join on raw ids, since rows shift whenever another filter re-prepares the data."""
    row = {str(user_id): index for index, user_id in enumerate(self.user_ids)}
    return np.array([row.get(str(user_id), -1) for user_id in user_ids], np.int64)

  def _before_last(self, k: int) -> np.ndarray:
    """Mask over seq_items: the positions before each user's last k items."""
    lengths = np.diff(self.seq_offsets)
    position = np.arange(len(self.seq_items)) - np.repeat(self.seq_offsets[:-1], lengths)
    return position < np.repeat(lengths - k, lengths)

  def split(self, name: str) -> Split:
    """Leave-one-out: the target of "train" is seq[-3] (the loader makes every training prefix of
    seq[:-2] from it), of "valid" seq[-2], of "test" seq[-1]; the history is all before it."""
    if name not in _HIDDEN_AFTER_TARGET:
      raise ValueError(f"unknown split {name!r}; expected one of {tuple(_HIDDEN_AFTER_TARGET)}")
    after = _HIDDEN_AFTER_TARGET[name]
    history_lengths = np.diff(self.seq_offsets) - after - 1
    return Split(
        users=np.arange(self.num_users, dtype=np.int32),
        targets=self.seq_items[self.seq_offsets[1:] - after - 1],
        history_items=self.seq_items[self._before_last(after + 1)],
        history_offsets=np.concatenate([[0], np.cumsum(history_lengths)]).astype(np.int64))

  def item_popularity(self) -> np.ndarray:
    """Interaction counts per item in the training part (seq[:-2]) only, so that no evaluation
    target leaks into popularity-based analyses."""
    train = self.seq_items[self._before_last(2)]
    return np.bincount(train, minlength=self.num_items + 1).astype(np.int64)


def k_core(users: np.ndarray, items: np.ndarray, user_core: int, item_core: int,
           keep: np.ndarray | None = None) -> np.ndarray:
  """Mask of the interactions kept when every user needs >= user_core and every item >= item_core
  interactions. Iterated to a fixed point: dropping a user can push an item below its threshold
  and vice versa. `users`/`items` are non-negative integer codes; `keep` an initial mask."""
  keep = np.ones(len(users), bool) if keep is None else keep
  while True:
    user_counts = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
    item_counts = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
    new_keep = keep & (user_counts[users] >= user_core) & (item_counts[items] >= item_core)
    if new_keep.sum() == keep.sum():
      return keep
    keep = new_keep


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(codes, uniques) with codes numbered in order of first appearance, like pandas.factorize
  (which RecBole uses to remap ids)."""
  uniques, first, inverse = np.unique(values, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return rank[inverse.reshape(-1)], uniques[order]


def time_key(timestamps: np.ndarray, time_order: str) -> np.ndarray:
  """Sort key for chronological order; ties are broken by file position by the caller.

  "recbole" reproduces RecBole: timestamps min-max scaled to [0, 1] and stored as float32, so
  interactions less than about a second apart tie. "exact" sorts on the timestamps themselves.
  """
  if time_order == "exact":
    return timestamps
  if time_order != "recbole":
    raise ValueError(f"time_order={time_order!r}; expected one of {TIME_ORDERS}")
  low, high = timestamps.min(), timestamps.max()
  if high == low:
    return np.zeros(len(timestamps), np.float32)
  return ((timestamps - low) / (high - low)).astype(np.float32)


def item_text(meta: ItemMeta, raw_id: str, max_chars: int, category_label: str = "Categories"
              ) -> str:
  """'Toy Story (1995) | Genres: Animation, Comedy | Brand: ...', cut to max_chars. An item
  without metadata is named by its id so that no item text is ever empty."""
  head = f"{meta.title} ({meta.year})" if meta.year else meta.title
  parts = [head.strip(),
           f"{category_label}: {', '.join(meta.categories)}" if meta.categories else "",
           f"Brand: {meta.brand}" if meta.brand else ""]
  text = " | ".join(p for p in parts if p) or f"item {raw_id}"
  return text[:max_chars].rstrip()


def _category_label(dataset_name: str) -> str:
  """MovieLens categories are genres; everything else (Amazon, ...) has categories."""
  return "Genres" if re.match(r"(ml-\d|movielens)", dataset_name, re.IGNORECASE) else "Categories"


def prepare(raw: RawDataset, cfg: DataConfig) -> Prepared:
  """Filters, orders and indexes `raw` into user sequences (see the module docstring)."""
  if cfg.min_rating is not None and np.isnan(raw.ratings).all():
    raise ValueError(f"min_rating={cfg.min_rating} but dataset {raw.name} has no ratings")
  position = np.arange(len(raw.users))
  if cfg.min_rating is not None:
    position = position[raw.ratings >= cfg.min_rating]
  users, _ = factorize(raw.users[position])
  items, _ = factorize(raw.items[position])
  keep = k_core(users, items, cfg.user_core, cfg.item_core)
  users_after_core = len(np.unique(users[keep]))
  keep = k_core(users, items, max(cfg.user_core, MIN_SEQ_LEN), cfg.item_core, keep)
  position = position[keep]
  if not len(position):
    raise ValueError(f"dataset {raw.name}: no interactions left after filtering")

  users, user_ids = factorize(raw.users[position])
  items, item_ids = factorize(raw.items[position])
  order = np.lexsort((position, time_key(raw.timestamps[position], cfg.time_order), users))
  seq_offsets = np.concatenate([[0], np.cumsum(np.bincount(users))]).astype(np.int64)

  item_ids = np.concatenate([np.asarray([""], dtype=str), item_ids])
  metas = (ItemMeta(),) + tuple(raw.item_meta.get(i, ItemMeta()) for i in item_ids[1:])
  label = _category_label(raw.name)
  texts = ("",) + tuple(item_text(m, i, cfg.item_text_max_chars, label)
                        for m, i in zip(metas[1:], item_ids[1:]))
  prepared = Prepared(
      user_ids=user_ids, item_ids=item_ids, item_text=texts, item_meta=metas,
      seq_items=(items[order] + 1).astype(np.int32), seq_offsets=seq_offsets, stats={})
  stats = statistics(prepared)
  stats.update({
      "items_without_meta": sum(1 for i in item_ids[1:] if i not in raw.item_meta),
      "users_dropped_short": users_after_core - prepared.num_users,
      "raw_interactions": len(raw.users),
      "raw_users": len(np.unique(raw.users)),
      "raw_items": len(np.unique(raw.items)),
      **{f"raw_{key}": int(value) for key, value in raw.report.items()}})
  return dataclasses.replace(prepared, stats=stats)


def statistics(prepared: Prepared) -> dict[str, float | int]:
  """Dataset size and sequence-length statistics, plus the number of training prefixes (every
  prefix of seq[:-2] predicting its next item, RecBole's training examples)."""
  lengths = np.diff(prepared.seq_offsets)
  users, items, interactions = prepared.num_users, prepared.num_items, int(lengths.sum())
  return {
      "users": users, "items": items, "interactions": interactions,
      "density": interactions / (users * items),
      "mean_seq_len": float(lengths.mean()), "median_seq_len": float(np.median(lengths)),
      "longest_seq_len": int(lengths.max()),
      "train_prefixes": int((lengths - 3).sum())}


# ---------------------------------------------------------------------------------------------
# Artifacts: arrays in an npz, item texts/metadata as JSON lines, statistics as JSON. No pickle.


def save(prepared: Prepared, directory: str | pathlib.Path) -> None:
  """Writes the prepared dataset; stats.json is written last, so it marks a complete save."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  multihost.write(directory / "arrays.npz", lambda staged: np.savez(
      staged, user_ids=np.asarray(prepared.user_ids, dtype=str),
      item_ids=np.asarray(prepared.item_ids, dtype=str),
      seq_items=prepared.seq_items, seq_offsets=prepared.seq_offsets))
  multihost.write_text(directory / "items.jsonl", "".join(
      json.dumps({"text": text, **dataclasses.asdict(meta)}, ensure_ascii=False) + "\n"
      for text, meta in zip(prepared.item_text, prepared.item_meta)))
  multihost.write_text(directory / "stats.json", json.dumps(dict(prepared.stats), indent=1))


def load(directory: str | pathlib.Path) -> Prepared:
  """Reads what `save` wrote, without touching the raw files."""
  directory = pathlib.Path(directory)
  with np.load(directory / "arrays.npz", allow_pickle=False) as arrays:
    arrays = dict(arrays)
  with open(directory / "items.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return Prepared(
      user_ids=arrays["user_ids"], item_ids=arrays["item_ids"],
      item_text=tuple(row.pop("text") for row in rows),
      item_meta=tuple(ItemMeta(**{**row, "categories": tuple(row["categories"])}) for row in rows),
      seq_items=arrays["seq_items"], seq_offsets=arrays["seq_offsets"],
      stats=json.loads((directory / "stats.json").read_text()))
