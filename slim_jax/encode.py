"""The encode stage: every text a later stage reads, encoded once, keyed by raw user id.

It writes under workdir/encode/:
- item_vectors.npy: [I+1, D], zero rows for padding and items without text;
- rationales_<writer>.npz, for the student and the teacher (when it wrote any): a row per
  accepted rationale, keyed by raw user id and split (`user_ids`, `splits`), its vector
  (`vectors`) and, for a MiniLM encoder, its token ids (`token_ids`, `lengths`), so that a
  recommender can fine-tune the encoder (`slim.finetune_encoder`);
- aligned_minilm/ for encoder.kind=minilm_aligned: MiniLM aligned on the student's cut-off
  rationales first (`train/align.py`), the encoder of everything above.
The train stage, the report and the ablation runner only load these: `load_encoded` joins the
rows onto the prepared users by raw id (never by a row index, which shifts whenever the data is
prepared with another filter) and postprocesses them (`encoder.postprocess`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from slim_jax import checks, embed, layout, multihost, prompts, rationales
from slim_jax.embed import EncoderConfig
from slim_jax.train import align

# Who wrote a rationales.jsonl, and the stage directory that holds it.
WRITERS = {"student": layout.GENERATE, "teacher": layout.TEACHER}


def rationales_file(out: pathlib.Path, writer: str) -> pathlib.Path:
  return pathlib.Path(out) / f"rationales_{writer}.npz"


def item_vectors(cfg: EncoderConfig, item_text: Sequence[str], cache_dir: pathlib.Path,
                 mesh: jax.sharding.Mesh | None = None,
                 embedder: Callable[[], embed.Embedder] | None = None) -> tuple[np.ndarray, int]:
  """([I+1, D] vectors of `item_text`, how many items have none): padding and items without
  text get a zero vector, which no encoder would write for them (it encodes an empty string
  like any other), so that a recommender reads "no text" and not a shared pseudo-text."""
  has_text = embed.items_with_text(item_text)
  vectors = embed.encode([item_text[i] for i in np.flatnonzero(has_text)], cfg, cache_dir,
                         mesh=mesh, embedder=embedder)
  table = np.zeros((len(item_text), vectors.shape[1]), np.float32)
  table[has_text] = vectors
  return table, int(len(item_text) - 1 - has_text.sum())


def encode_rationales(cfg: EncoderConfig, rows: Sequence[Mapping], cache_dir: pathlib.Path,
                      mesh: jax.sharding.Mesh | None = None,
                      embedder: Callable[[], embed.Embedder] | None = None
                      ) -> dict[str, np.ndarray]:
  """The arrays of a rationales_<writer>.npz for rationale `rows` (a rationales.jsonl's)."""
  texts = [row["text"] for row in rows]
  stored = {"user_ids": np.array([str(row["user_id"]) for row in rows], dtype=str),
            "splits": np.array([row["split"] for row in rows], dtype=str),
            "vectors": embed.encode(texts, cfg, cache_dir, mesh=mesh, embedder=embedder)}
  if cfg.kind != "minilm":
    return stored
  minilm = (embedder or functools.partial(embed.make_embedder, cfg))()
  token_ids = minilm.tokenize(texts)
  ids = np.full((len(rows), minilm.max_len), minilm.pad_id, np.int32)
  for row, tokens in enumerate(token_ids):
    ids[row, :len(tokens)] = tokens
  return {**stored, "token_ids": ids,
          "lengths": np.array([len(tokens) for tokens in token_ids], np.int32)}


def encode_stage(cfg: EncoderConfig, prepared, rationale_paths: Mapping[str, pathlib.Path],
                 out: pathlib.Path, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Encodes every item text and every rationale of `rationale_paths` ({writer: its
  rationales.jsonl}) into `out` (see the module doc), loading the encoder once. Without student
  rationales only the item vectors are written (enough for the plain and item_text modes)."""
  if cfg.kind == "none":
    return {"kind": "none"}
  out, kind = pathlib.Path(out), cfg.kind
  written = {writer: rationales.read_rationales(pathlib.Path(path))
             if pathlib.Path(path).is_file() else [] for writer, path in rationale_paths.items()}
  aligned = None
  if kind == "minilm_aligned":
    aligned = align.align(cfg, prepared, written.get("student", []), out, mesh)
    cfg = dataclasses.replace(cfg, kind="minilm", checkpoint=str(out / align.ALIGNED))
  embedder = functools.cache(functools.partial(embed.make_embedder, cfg))
  items, without_text = item_vectors(cfg, prepared.item_text, out / "items", mesh, embedder)
  multihost.write(out / layout.ITEM_VECTORS, lambda staged: np.save(staged, items))
  if without_text:
    logging.warning("encode: %d items have no text; their text vector is zero", without_text)
  summary = {"kind": kind, "items": len(items) - 1, "items_without_text": without_text,
             "dim": int(items.shape[1])}
  if aligned is not None:
    summary |= {f"aligned_{k}": aligned[k] for k in (
        "train_pairs", "steps", "chosen_step", "valid_ndcg@10_unaligned", "valid_ndcg@10")}
  for writer, rows in written.items():
    summary[f"{writer}_rationales"] = len(rows)
    if not rows:
      logging.warning("encode: no %s rationales in %s; the modes that read them need the stage "
                      "that writes them first", writer, rationale_paths[writer])
      continue
    stored = encode_rationales(cfg, rows, out / writer, mesh, embedder)
    multihost.write(rationales_file(out, writer), lambda staged: np.savez(staged, **stored))
    for split in sorted(set(stored["splits"])):
      summary[f"{writer}_users_with_rationale_{split}"] = int((stored["splits"] == split).sum())
  return summary


def load_rationales(out: pathlib.Path, writer: str) -> dict[str, np.ndarray] | None:
  """A writer's rationales_<writer>.npz as the encode stage wrote it, None when it wrote none."""
  path = rationales_file(out, writer)
  if not path.is_file():
    return None
  with np.load(path) as stored:
    return dict(stored)


# split -> ([U, D] vectors, [U] has one); split -> (int32 [U, T] right-padded token ids, int32
# [U] lengths), the latter for BERT-family encoders only (fine-tuning inside the step).
Rationales = dict[str, tuple[np.ndarray, np.ndarray]]


def user_tables(stored: Mapping[str, np.ndarray], prepared) -> tuple[Rationales, Rationales]:
  """(vectors, tokens) per split of stored rationale rows, on the rows of `prepared`'s users,
  joined by raw user id; rationales of users this preparation does not hold are left out."""
  users = prepared.rows_of(stored["user_ids"])
  vectors, tokens = {}, {}
  for split in sorted(set(stored["splits"])):
    rows = (stored["splits"] == split) & (users >= 0)
    table = np.zeros((prepared.num_users, stored["vectors"].shape[1]), np.float32)
    present = np.zeros(prepared.num_users, bool)
    table[users[rows]], present[users[rows]] = stored["vectors"][rows], True
    vectors[split] = table, present
    if "token_ids" in stored:
      ids = np.zeros((prepared.num_users, stored["token_ids"].shape[1]), np.int32)
      lengths = np.zeros(prepared.num_users, np.int32)
      ids[users[rows]], lengths[users[rows]] = stored["token_ids"][rows], stored["lengths"][rows]
      tokens[split] = ids, lengths
  return vectors, tokens


@dataclasses.dataclass(frozen=True)
class Encoded:
  """What the encode stage wrote, on the prepared users' rows: the SLIM recommenders' inputs."""
  item_vectors: np.ndarray  # [I+1, D]; zeros for padding (row 0) and items without text
  rationales: Rationales  # the student's
  tokens: Rationales = dataclasses.field(default_factory=dict)
  # The teacher's rationales by the same encoder (mode teacher_rationales).
  teacher: Rationales = dataclasses.field(default_factory=dict)
  teacher_tokens: Rationales = dataclasses.field(default_factory=dict)


def load_encoded(out: pathlib.Path, prepared, postprocess: str = "none") -> Encoded:
  """The vectors (and token ids) that `encode_stage` wrote to `out`, on `prepared`'s users,
  postprocessed by encoder.postprocess."""
  out = pathlib.Path(out)
  if not (out / layout.ITEM_VECTORS).is_file():
    raise FileNotFoundError(f"{out / layout.ITEM_VECTORS} is missing: run --stages=encode with "
                            "an encoder.kind that encodes (minilm, minilm_aligned, llm_pooled)")
  tables = {writer: user_tables(stored, prepared) if stored is not None else ({}, {})
            for writer in WRITERS for stored in [load_rationales(out, writer)]}
  encoded = Encoded(np.load(out / layout.ITEM_VECTORS), *tables["student"], *tables["teacher"])
  return postprocessed(encoded, postprocess)


WHITEN_SHRINK = 1e-3  # of the mean variance, added to each: near-empty directions stay finite


def postprocess_stats(fit: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], matrix [D, D]) of `kind` (center | whiten) fitted on the rows `fit` [N, D]:
  x -> (x - mean) @ matrix.

  whiten is ZCA whitening, which keeps the vectors' axes (and so the nearest to the raw ones).
  """
  fit = np.asarray(fit, np.float64)
  mean = fit.mean(0)
  if kind == "center":
    return mean, np.eye(fit.shape[1])
  variances, axes = np.linalg.eigh(np.cov(fit, rowvar=False))
  variances = np.maximum(variances, 0.0) + WHITEN_SHRINK * variances.mean()
  return mean, (axes / np.sqrt(variances)) @ axes.T


def transformed(vectors: np.ndarray, present: np.ndarray,
                stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """float32 (vectors - mean) @ matrix where `present`; absent rows stay zero (no text)."""
  mean, matrix = stats
  return np.where(present[:, None], (vectors - mean) @ matrix, 0.0).astype(np.float32)


def fit_splits(rationales: Rationales) -> list[str]:
  """The rationales training rows read: the cut-off ones (causal schedule) when written, else
  the one from seq[:-2] (the paper's)."""
  cutoffs = [split for split in rationales if split.startswith(prompts.CUTOFF)]
  return cutoffs or [s for s in (prompts.TRAINING_RATIONALES,) if s in rationales]


def postprocessed(encoded: Encoded, kind: str) -> Encoded:
  """`encoded` with item vectors `kind`-processed by statistics of the items that have text, and
  every rationale (the teacher's too) by those of the rationales training rows read (`fit_splits`):
  never of what only validation or test read."""
  checks.one_of("encoder.postprocess", kind, embed.POSTPROCESS)
  if kind == "none":
    return encoded
  has_text = np.any(encoded.item_vectors != 0, axis=1)
  items = transformed(encoded.item_vectors, has_text,
                      postprocess_stats(encoded.item_vectors[has_text], kind))
  fit = fit_splits(encoded.rationales)
  if not fit:
    return dataclasses.replace(encoded, item_vectors=items)
  stats = postprocess_stats(np.concatenate([encoded.rationales[s][0][encoded.rationales[s][1]]
                                            for s in fit]), kind)
  apply = lambda table: {split: (transformed(v, p, stats), p) for split, (v, p) in table.items()}
  return dataclasses.replace(encoded, item_vectors=items, rationales=apply(encoded.rationales),
                             teacher=apply(encoded.teacher))
