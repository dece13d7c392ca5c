"""Rationale-encoder throughput: ml-100k's item texts through all-MiniLM-L6-v2, texts/s as JSON.

  python -m experiments.bench.encoder [--batch_size=64] [--mesh=data:-1]

The first pass includes one compilation per length bucket; the second is steady state. When
sentence-transformers (torch) is importable, it encodes the same texts side by side and the
largest cosine distance between the two embeddings is reported.
"""

import json
import os
import time

from absl import app, flags

from slim_jax import assets, embed, parallel
from slim_jax.data import formats, preprocess

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Texts per batch.")
_MESH = flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1", "Mesh axes as name:size,...")


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _sentence_transformers(texts, batch_size):
  """(embeddings, seconds) of sentence-transformers on the same directory, or None."""
  os.environ["HF_HUB_OFFLINE"] = "1"
  try:
    import torch
    from sentence_transformers import SentenceTransformer
  except ImportError:
    return None
  model = SentenceTransformer(str(assets.path("minilm")), device="cpu")
  model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
  embeddings, seconds = _timed(lambda: model.encode(texts, batch_size=batch_size))
  return embeddings, seconds, torch.get_num_threads()


def main(argv):
  del argv
  import jax
  import numpy as np

  prepared = preprocess.prepare(formats.read_dataset("recbole", assets.path("ml-100k")),
                                preprocess.DataConfig())
  texts = list(prepared.item_text[1:])
  mesh = parallel.make_mesh({name: int(size) for name, size in
                             (axis.split(":") for axis in _MESH.value.split(","))})
  cfg = embed.EncoderConfig(batch_size=_BATCH_SIZE.value)
  embedder, load_seconds = _timed(lambda: embed.make_embedder(cfg))
  step, params = embed.embed_step(embedder, mesh)
  run = lambda: embed.embed_texts(texts, embedder, step, params, batch_size=cfg.batch_size,
                                   buckets=cfg.buckets, mesh=mesh)
  _, cold = _timed(run)
  ours, warm = _timed(run)
  lengths = [len(t) for t in embedder.tokenize(texts)]
  results = {"texts": len(texts), "mean_tokens": round(float(np.mean(lengths)), 1),
             "max_tokens": max(lengths), "batch_size": cfg.batch_size,
             "mesh": dict(mesh.shape), "backend": jax.default_backend(),
             "cpu_count": os.cpu_count(), "load_s": round(load_seconds, 2),
             "first_pass_s_with_compile": round(cold, 2), "jax_s": round(warm, 2),
             "jax_texts_per_s": round(len(texts) / warm, 1)}
  reference = _sentence_transformers(texts, cfg.batch_size)
  if reference is not None:
    theirs, seconds, threads = reference
    cosine = np.sum(ours * theirs, -1) / (np.linalg.norm(ours, axis=-1)
                                          * np.linalg.norm(theirs, axis=-1))
    results.update({"torch_s": round(seconds, 2),
                    "torch_texts_per_s": round(len(texts) / seconds, 1),
                    "torch_threads": threads,
                    "max_cosine_distance_vs_torch": float(np.max(1 - cosine))})
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
