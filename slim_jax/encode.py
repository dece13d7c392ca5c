"""The encoding stage: texts (rationales, item texts) -> [N, D] float32 vectors, cached, resumable.

Texts are encoded chunk by chunk. Within a chunk they are sorted by token length so each batch
pads to a tight length bucket (one compilation per bucket), fed by the one loader
(`loader.text_batches`, sharded over the mesh's batch axes) through a jitted pure embed function
with explicit shardings. Each finished chunk is saved atomically next to a manifest naming the
texts and the encoder, so an interrupted run resumes at the first missing chunk, and a finished
encoding (embeddings.npy) is loaded without even loading the model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from slim_jax import assets, checkpoints, checks, layout, multihost, parallel, progress
from slim_jax import rationales as rationale_files
from slim_jax.data import loader
from slim_jax.models import bert, llama

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
KINDS = ("minilm", "llm_pooled", "none")  # none: no text vectors, the modes that need none


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Which rationale / item-text encoder to use; `kind` is the encoder ablation."""
  kind: str = "minilm"  # one of KINDS
  checkpoint: str = ""  # HF directory (or .gguf for llm_pooled); "" = the embedded asset
  max_len: int = 0  # tokens per text; 0 = the checkpoint's (sentence-transformers max_seq_length)
  batch_size: int = 64  # a multiple of the devices on the mesh's batch axes
  # Padded lengths (max_len is added): ~1.5x apart, so padding wastes at most a third.
  buckets: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
  # none | center | whiten the frozen vectors the recommenders read (`postprocessed`): sentence
  # vectors of similar texts are nearly parallel, so their shared direction drowns each user's
  # own signal. A fine-tuned encoder's in-step rationale vectors are never postprocessed.
  postprocess: str = "none"

  def checked(self) -> EncoderConfig:
    checks.one_of("encoder.kind", self.kind, KINDS)
    checks.one_of("encoder.postprocess", self.postprocess, POSTPROCESS)
    checks.within(self, "encoder", "[0, inf)", "max_len")
    checks.within(self, "encoder", "[1, inf)", "batch_size", "buckets")
    return self


@dataclasses.dataclass(frozen=True)
class Embedder:
  """What encoding needs from a model, whichever model it is."""
  tokenize: Callable[[Sequence[str]], list[np.ndarray]]  # texts -> int32 ids, truncated
  embed: Callable  # pure (params, input_ids [B, T], attention_mask [B, T]) -> [B, D] float32
  params: Any
  rules: parallel.Rules
  pad_id: int
  max_len: int


def checkpoint_dir(cfg: EncoderConfig) -> pathlib.Path:
  """The configured checkpoint; "" = the embedded MiniLM, or the embedded (undistilled) student."""
  if cfg.checkpoint:
    return pathlib.Path(cfg.checkpoint)
  return assets.path("smollm2" if cfg.kind == "llm_pooled" else "minilm")


def make_embedder(cfg: EncoderConfig) -> Embedder:
  """The Embedder of `cfg.kind`: a BERT-family sentence encoder, or a LLaMA student pooled."""
  if cfg.kind == "minilm":
    return minilm_embedder(cfg)
  if cfg.kind == "llm_pooled":
    return llm_pooled_embedder(cfg)
  raise ValueError(f"encoder kind {cfg.kind!r} has no embedder (kinds that encode: minilm, "
                   "llm_pooled; 'none' means no rationale vectors)")


def minilm_embedder(cfg: EncoderConfig) -> Embedder:
  model = bert.load(checkpoint_dir(cfg), cfg.max_len)
  return Embedder(model.tokenize, bert_embed(model.config, model.pooling), model.params,
                  bert.PARTITION_RULES, model.pad_id, model.max_len)


@functools.cache
def bert_embed(config: bert.BertConfig, pooling: bert.Pooling) -> Callable:
  """One function object per architecture, so every encoding with it shares jit's compilations."""
  return functools.partial(bert.apply, config=config, pooling=pooling)


def llm_pooled(params, input_ids, attention_mask, config: llama.LlamaConfig):
  """The mean over real tokens of the student's final (normed) hidden states, L2-normalised.

  The logits Llama also computes are unused, so jit removes them. Rows are right-padded, which a
  causal model ignores: no real token attends to the padding after it.
  """
  _, state = llama.Llama(config).apply(
      {"params": params}, input_ids, attention_mask, mutable=["intermediates"],
      capture_intermediates=lambda module, method: module.name == "norm")
  hidden = state["intermediates"]["norm"]["__call__"][0]
  return bert.pool(hidden, attention_mask, bert.Pooling("mean", normalize=True))


def llm_pooled_embedder(cfg: EncoderConfig) -> Embedder:
  """The student (a HF LLaMA directory or a .gguf file) as an encoder; max_len 0 = 512 tokens."""
  config, params, tokenizer = checkpoints.load(checkpoint_dir(cfg))
  max_len = cfg.max_len or min(512, config.max_position_embeddings)

  def tokenize(texts):
    ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    return [np.asarray(row, np.int32) for row in ids]

  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return Embedder(tokenize, llm_embed(config), params, llama.partition_rules(config), pad_id,
                  max_len)


@functools.cache
def llm_embed(config: llama.LlamaConfig) -> Callable:
  return functools.partial(llm_pooled, config=config)


def bucket_lengths(buckets: Sequence[int], max_len: int) -> tuple[int, ...]:
  """The buckets below `max_len`, and `max_len` itself, so every truncated text fits."""
  return tuple(sorted({b for b in buckets if b < max_len} | {max_len}))


def embed_step(embedder: Embedder, mesh: jax.sharding.Mesh):
  """(jitted embed with explicit shardings, params placed by the embedder's rules)."""
  shardings = parallel.param_shardings(embedder.params, embedder.rules, mesh)
  rows = parallel.batch_sharding(mesh, 2)
  step = jax.jit(embedder.embed, in_shardings=(shardings, rows, rows), out_shardings=rows)
  return step, jax.device_put(embedder.params, shardings)


def embed_texts(texts: Sequence[str], embedder: Embedder, step, params, *, batch_size: int,
                buckets: Sequence[int], mesh: jax.sharding.Mesh,
                on_batch: Callable[[int], Any] = lambda n: None) -> np.ndarray:
  """[len(texts), D] float32 in input order; batches hold texts of similar length. `on_batch(1)`
  follows every batch (a progress bar's update)."""
  token_ids = embedder.tokenize(texts)
  order = np.argsort([len(t) for t in token_ids], kind="stable")
  rows, vectors = [], []
  for batch in loader.text_batches([token_ids[i] for i in order], batch_size=batch_size,
                                   buckets=bucket_lengths(buckets, embedder.max_len),
                                   pad_id=embedder.pad_id, mesh=mesh):
    out = parallel.to_host(step(params, batch["input_ids"], batch["attention_mask"]))
    valid = parallel.to_host(batch["valid"])
    rows.append(parallel.to_host(batch["index"])[valid])
    vectors.append(out[valid])
    on_batch(1)
  result = np.empty((len(texts), vectors[0].shape[1]), np.float32)
  result[order[np.concatenate(rows)]] = np.concatenate(vectors)
  return result


def texts_digest(texts: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for text in texts:
    encoded = text.encode("utf-8")
    digest.update(len(encoded).to_bytes(8, "little") + encoded)
  return digest.hexdigest()


def manifest_for(texts: Sequence[str], cfg: EncoderConfig, chunk_size: int) -> dict:
  """What the cached vectors are: texts, encoder and chunking (batching does not change them)."""
  encoder = {"kind": cfg.kind, "checkpoint": str(checkpoint_dir(cfg).resolve()),
             "max_len": cfg.max_len}
  return {"num_texts": len(texts), "texts_sha256": texts_digest(texts), "encoder": encoder,
          "chunk_size": chunk_size}


def _start_over(cache_dir: pathlib.Path, manifest: dict) -> None:
  """Removes our own files only: `cache_dir` may be a stage directory holding others."""
  cache_dir.mkdir(parents=True, exist_ok=True)
  for stale in [cache_dir / EMBEDDINGS, *cache_dir.glob("chunk_*.npy")]:
    stale.unlink(missing_ok=True)
  multihost.write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=2))


def chunk_path(cache_dir: pathlib.Path, start: int) -> pathlib.Path:
  return cache_dir / f"chunk_{start:010d}.npy"


def encode(texts: Sequence[str], cfg: EncoderConfig, cache_dir: str | pathlib.Path, *,
           mesh: jax.sharding.Mesh | None = None, chunk_size: int = 4096,
           embedder: Embedder | None = None) -> np.ndarray:
  """[len(texts), D] float32 vectors of `texts`, cached in `cache_dir` (see the module doc).

  `embedder` (the one `cfg` describes; it names the cache) defaults to `make_embedder(cfg)`,
  built only when something is left to encode.
  Process 0 alone plans the resume (which chunks are done) and writes files; every process
  follows its plan, so all of them make the same collective calls, and returns the vectors.
  """
  if not texts:
    raise ValueError("encode: no texts")
  cache_dir = pathlib.Path(cache_dir)
  mesh = mesh or parallel.make_mesh()
  starts = range(0, len(texts), chunk_size)
  manifest = manifest_for(texts, cfg, chunk_size)
  plan = multihost.writer_decides_mask(  # [complete, then whether each chunk is done]
      _resume_plan(cache_dir, manifest, starts) if multihost.is_writer()
      else np.zeros(1 + len(starts), bool))
  if plan[0]:
    logging.info("encode: %s is complete, loaded", cache_dir)
    return np.load(cache_dir / EMBEDDINGS)
  todo = [s for s, done in zip(starts, plan[1:]) if not done]
  if len(todo) < len(starts):
    logging.info("encode: resuming %s, %d of %d chunks done", cache_dir,
                 len(starts) - len(todo), len(starts))
  done = {s: np.load(chunk_path(cache_dir, s)) for s in starts if s not in todo}
  if todo:
    embedder = embedder or make_embedder(cfg)
    step, params = embed_step(embedder, mesh)
    batches = sum(-(-min(chunk_size, len(texts) - s) // cfg.batch_size) for s in todo)
    with progress.bar(batches, f"encode {cache_dir.name}", "batch") as bar:
      for start in todo:
        done[start] = embed_texts(texts[start:start + chunk_size], embedder, step, params,
                                  batch_size=cfg.batch_size, buckets=cfg.buckets, mesh=mesh,
                                  on_batch=bar.update)
        multihost.write(chunk_path(cache_dir, start), lambda staged: np.save(staged, done[start]))
  vectors = np.concatenate([done[s] for s in starts])
  multihost.write(cache_dir / EMBEDDINGS, lambda staged: np.save(staged, vectors))
  if multihost.is_writer():
    for start in starts:
      chunk_path(cache_dir, start).unlink()
  return vectors


def _resume_plan(cache_dir: pathlib.Path, manifest: dict, starts: range) -> np.ndarray:
  """Process 0's plan: bool [complete, then whether each chunk is done], with the cache started
  over when it holds other texts or another encoder."""
  manifest_file = cache_dir / MANIFEST
  if manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest:
    if (cache_dir / EMBEDDINGS).is_file():
      return np.array([True] + [True] * len(starts))
  else:
    if manifest_file.is_file():
      logging.warning("encode: %s holds other texts or another encoder; starting over", cache_dir)
    _start_over(cache_dir, manifest)
  return np.array([False] + [chunk_path(cache_dir, s).is_file() for s in starts])


def rationale_vectors(rows: Sequence[Mapping], vectors: np.ndarray, num_users: int,
                      split: str) -> tuple[np.ndarray, np.ndarray]:
  """[U, D] vectors of each user's `split` rationale and a [U] mask of users that have one."""
  table = np.zeros((num_users, vectors.shape[1]), np.float32)
  present = np.zeros(num_users, bool)
  for row, vector in zip(rows, vectors):
    if row["split"] == split:
      table[row["user"]], present[row["user"]] = vector, True
  return table, present


def rationale_tokens(rows: Sequence[Mapping], token_ids: Sequence[np.ndarray], num_users: int,
                     split: str, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Each user's `split` rationale as right-padded token ids [U, max_len] and lengths [U]."""
  ids = np.full((num_users, max_len), pad_id, np.int32)
  lengths = np.zeros(num_users, np.int32)
  for row, tokens in zip(rows, token_ids):
    if row["split"] == split:
      ids[row["user"], :len(tokens)] = tokens
      lengths[row["user"]] = len(tokens)
  return ids, lengths


# split -> ([U, D] vectors, [U] has one); split -> (int32 [U, T] right-padded token ids, int32
# [U] lengths), the latter for BERT-family encoders only (fine-tuning inside the step).
Rationales = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Encoded:
  """What the encode stage wrote: the SLIM recommenders' inputs."""
  item_vectors: np.ndarray  # [I+1, D]; zeros for padding (row 0) and items without text
  rationales: Rationales  # the student's
  tokens: Rationales = dataclasses.field(default_factory=dict)
  # The teacher's rationales by the same encoder (mode teacher_rationales), from `encode_teacher`.
  teacher: Rationales = dataclasses.field(default_factory=dict)
  teacher_tokens: Rationales = dataclasses.field(default_factory=dict)


def encode_rationales(cfg: EncoderConfig, rows: Sequence[Mapping], num_users: int,
                      cache_dir: pathlib.Path,
                      mesh: jax.sharding.Mesh | None = None) -> tuple[Rationales, Rationales]:
  """(vectors, tokens) per split of rationale `rows` (a rationales.jsonl's), cached in
  `cache_dir`; tokens only for a MiniLM encoder."""
  vectors = encode([row["text"] for row in rows], cfg, cache_dir, mesh=mesh)
  splits = sorted({row["split"] for row in rows})
  rationales = {split: rationale_vectors(rows, vectors, num_users, split) for split in splits}
  if cfg.kind != "minilm":
    return rationales, {}
  minilm = bert.load(checkpoint_dir(cfg), cfg.max_len)
  token_ids = minilm.tokenize([row["text"] for row in rows])
  return rationales, {split: rationale_tokens(rows, token_ids, num_users, split, minilm.max_len,
                                              minilm.pad_id) for split in splits}


def encode_teacher(cfg: EncoderConfig, prepared, teacher_path: pathlib.Path,
                   cache_dir: pathlib.Path,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[Rationales, Rationales]:
  """The teacher's rationales encoded by the encoder that encoded the student's (for
  `load_encoded`); a clear error when the teacher stage has not written them."""
  teacher_path = pathlib.Path(teacher_path)
  rows = rationale_files.read_rationales(teacher_path) if teacher_path.is_file() else []
  if not rows:
    raise FileNotFoundError(f"mode teacher_rationales reads {teacher_path}, which is missing or "
                            "empty: run --stages=teacher")
  return encode_rationales(cfg, rows, prepared.num_users, cache_dir, mesh)


# The rationales postprocessing statistics come from: written from seq[:-2], the part of each
# sequence that training sees (slim.RATIONALE_OF_SPLIT: training rows read them).
TRAINING_RATIONALES = "valid"
POSTPROCESS = ("none", "center", "whiten")
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


def postprocessed(encoded: Encoded, kind: str) -> Encoded:
  """`encoded` with item vectors `kind`-processed by statistics of the items that have text, and
  every rationale (the teacher's too) by those of the training rationales: never of what only
  validation or test read."""
  checks.one_of("encoder.postprocess", kind, POSTPROCESS)
  if kind == "none":
    return encoded
  has_text = np.any(encoded.item_vectors != 0, axis=1)
  items = transformed(encoded.item_vectors, has_text,
                      postprocess_stats(encoded.item_vectors[has_text], kind))
  if TRAINING_RATIONALES not in encoded.rationales:
    return dataclasses.replace(encoded, item_vectors=items)
  vectors, present = encoded.rationales[TRAINING_RATIONALES]
  stats = postprocess_stats(vectors[present], kind)
  apply = lambda table: {split: (transformed(v, p, stats), p) for split, (v, p) in table.items()}
  return dataclasses.replace(encoded, item_vectors=items, rationales=apply(encoded.rationales),
                             teacher=apply(encoded.teacher))


def load_encoded(out: pathlib.Path, postprocess: str = "none",
                 teacher: tuple[Rationales, Rationales] = ({}, {})) -> Encoded:
  """The vectors (and token ids) that `encode_stage` wrote to `out`, with the `teacher`'s
  (`encode_teacher`), postprocessed by encoder.postprocess."""
  out = pathlib.Path(out)
  if not (out / layout.ITEM_VECTORS).is_file():
    raise FileNotFoundError(f"{out / layout.ITEM_VECTORS} is missing: run --stages=encode with "
                            "an encoder.kind that encodes (minilm, llm_pooled)")
  split_of = lambda path, prefix: path.stem.removeprefix(prefix)
  rationales = {split_of(path, "rationale_vectors_"):
                (np.load(path), np.load(out / path.name.replace("vectors", "mask")))
                for path in sorted(out.glob("rationale_vectors_*.npy"))}
  tokens = {split_of(path, "rationale_tokens_"): tuple(np.load(path)[k] for k in ("ids", "lengths"))
            for path in sorted(out.glob("rationale_tokens_*.npz"))}
  encoded = Encoded(np.load(out / layout.ITEM_VECTORS), rationales, tokens, *teacher)
  return postprocessed(encoded, postprocess)


def item_vectors(cfg: EncoderConfig, item_text: Sequence[str], cache_dir: pathlib.Path,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, int]:
  """([I+1, D] vectors of `item_text`, how many items have none): padding and items without
  text get a zero vector, which no encoder would write for them (it encodes an empty string
  like any other), so that a recommender reads "no text" and not a shared pseudo-text."""
  has_text = np.array([bool(text.strip()) for text in item_text])
  has_text[0] = False
  vectors = encode([item_text[i] for i in np.flatnonzero(has_text)], cfg, cache_dir, mesh=mesh)
  table = np.zeros((len(item_text), vectors.shape[1]), np.float32)
  table[has_text] = vectors
  return table, int(len(item_text) - 1 - has_text.sum())


def encode_stage(cfg: EncoderConfig, prepared, rationales_path: pathlib.Path,
                 out: pathlib.Path, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Encodes every item text and every student rationale into out/*.npy.

  item_vectors.npy is [I+1, D] with zero rows for padding and items without text;
  rationale_vectors_<split>.npy is [U, D] with rationale_mask_<split>.npy marking the users whose
  rationale exists. A MiniLM encoder also writes rationale_tokens_<split>.npz (ids, lengths), so
  that a recommender can fine-tune it (`slim.finetune_encoder`). Without student rationales only
  the item vectors are written (enough for the plain and item_text modes).
  """
  if cfg.kind == "none":
    return {"kind": "none"}
  items, without_text = item_vectors(cfg, prepared.item_text, out / "items", mesh)
  multihost.write(out / layout.ITEM_VECTORS, lambda staged: np.save(staged, items))
  if without_text:
    logging.warning("encode: %d items have no text; their text vector is zero", without_text)
  path = pathlib.Path(rationales_path)
  rows = rationale_files.read_rationales(path) if path.is_file() else []
  summary = {"kind": cfg.kind, "items": len(items) - 1, "items_without_text": without_text,
             "dim": int(items.shape[1]), "rationales": len(rows)}
  if not rows:
    logging.warning("encode: no student rationales in %s; modes that read them need "
                    "--stages=generate first", rationales_path)
    return summary
  rationales, tokens = encode_rationales(cfg, rows, prepared.num_users, out / "rationales", mesh)
  for split, (table, present) in rationales.items():
    multihost.write(out / f"rationale_vectors_{split}.npy", lambda staged: np.save(staged, table))
    multihost.write(out / f"rationale_mask_{split}.npy", lambda staged: np.save(staged, present))
    summary[f"users_with_rationale_{split}"] = int(present.sum())
  for split, (ids, lengths) in tokens.items():
    multihost.write(out / f"rationale_tokens_{split}.npz",
                    lambda staged: np.savez(staged, ids=ids, lengths=lengths))
  return summary
