"""The text encoder: texts (rationales, item texts) -> [N, D] float32 vectors, cached, resumable.

Texts are encoded chunk by chunk. Within a chunk they are sorted by token length so each batch
pads to a tight length bucket (one compilation per bucket), fed by the one loader
(`loader.text_batches`, sharded over the mesh's batch axes) through a jitted pure embed function
with explicit shardings. Each finished chunk is saved atomically next to a manifest naming the
texts and the encoder, so an interrupted run resumes at the first missing chunk, and a finished
encoding (embeddings.npy) is loaded without even loading the model. The encode stage
(`encode.py`) is its one caller in the pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from slim_jax import assets, checkpoints, checks, multihost, parallel, progress
from slim_jax.data import loader
from slim_jax.models import bert, llama

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
# minilm_aligned: MiniLM aligned on the student's rationales by the encode stage (train/align.py)
# before it encodes; none: no text vectors, the modes that need none
KINDS = ("minilm", "minilm_aligned", "llm_pooled", "none")
# How the encode stage treats the vectors it hands to the recommenders (encode.postprocessed).
POSTPROCESS = ("none", "center", "whiten")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Which rationale / item-text encoder to use; `kind` is the encoder ablation."""
  kind: str = "minilm"  # one of KINDS
  # HF directory (or .gguf for llm_pooled); "" = the embedded MiniLM, or for llm_pooled the
  # embedded (undistilled) student as the convert stage writes it (Config.resolved)
  checkpoint: str = ""
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
  """The configured checkpoint; "" = the embedded MiniLM. An llm_pooled encoder's default, the
  student as the convert stage writes it, lives in the work directory: `Config.resolved` fills
  it in."""
  if cfg.checkpoint:
    return pathlib.Path(cfg.checkpoint)
  if cfg.kind == "llm_pooled":
    raise ValueError("encoder.kind=llm_pooled with no encoder.checkpoint: resolve the config "
                     "first (Config.resolved)")
  return assets.path("minilm")


def make_embedder(cfg: EncoderConfig) -> Embedder:
  """The Embedder of `cfg.kind`: a BERT-family sentence encoder, or a LLaMA student pooled."""
  if cfg.kind == "minilm":
    return minilm_embedder(cfg)
  if cfg.kind == "llm_pooled":
    return llm_pooled_embedder(cfg)
  raise ValueError(f"encoder kind {cfg.kind!r} has no embedder (kinds that encode: minilm, "
                   "llm_pooled; minilm_aligned is a minilm the encode stage aligns first; 'none' "
                   "means no rationale vectors)")


def minilm_embedder(cfg: EncoderConfig) -> Embedder:
  return sentence_embedder(bert.load(checkpoint_dir(cfg), cfg.max_len))


def sentence_embedder(model: bert.SentenceEncoder) -> Embedder:
  """The Embedder of a loaded BERT-family sentence encoder."""
  return Embedder(model.tokenize, bert_embed(model.config, model.pooling), model.params,
                  bert.PARTITION_RULES, model.pad_id, model.max_len)


def items_with_text(item_text: Sequence[str]) -> np.ndarray:
  """bool [I+1]: the items (row 0, padding, never) whose text is not blank: the ones encoded."""
  has_text = np.array([bool(text.strip()) for text in item_text])
  has_text[0] = False
  return has_text


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
           embedder: Callable[[], Embedder] | None = None) -> np.ndarray:
  """[len(texts), D] float32 vectors of `texts`, cached in `cache_dir` (see the module doc).

  `embedder` makes the Embedder that `cfg` describes (it names the cache; default
  `make_embedder(cfg)`), called only when something is left to encode: a caller encoding several
  text sets passes one cached maker, so the model loads once.
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
    embedder = (embedder or functools.partial(make_embedder, cfg))()
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
