"""LLaMA checkpoints in and out: Hugging Face directories, GGUF files, tokenizers, PEFT adapters.

Every later stage loads a standard Hugging Face directory; `convert_gguf_to_hf` turns the
embedded GGUF model into one, once. Tokenizers come from transformers, which is heavy to import,
so `checkpoints.tokenizer` is imported when a checkpoint is read, not with this package.
"""

from __future__ import annotations

import pathlib

from slim_jax.checkpoints import gguf, hf


def convert_gguf_to_hf(gguf_path, out_dir) -> pathlib.Path:
  """Writes the HF directory (fp32 weights, tokenizer, chat template) of a GGUF LLaMA file.

  Idempotent: a complete `out_dir` is left as it is.
  """
  from slim_jax.checkpoints.tokenizer import tokenizer_from_gguf  # transformers
  out_dir = pathlib.Path(out_dir)
  if hf.is_complete(out_dir):
    return out_dir
  config, tensors, meta = gguf.read_gguf(gguf_path)
  return hf.write_hf(out_dir, config, tensors, tokenizer_from_gguf(meta, str(gguf_path)))


def load(path, mesh=None, **overrides):
  """(LlamaConfig, params, tokenizer) from a HF directory or a .gguf file.

  `overrides` replace LlamaConfig fields (dtype, param_dtype, scan_layers, remat_policy); with a
  mesh, parameters are placed by llama.partition_rules as they are read.
  """
  from slim_jax.checkpoints.tokenizer import load_tokenizer, tokenizer_from_gguf  # transformers
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    config, tensors, meta = gguf.read_gguf(path, **overrides)
    params = hf.params_from_reader(lambda name, index: tensors[name][index], config, mesh)
    tokenizer = tokenizer_from_gguf(meta, str(path))
  else:
    config = hf.load_config(path, **overrides)
    params, tokenizer = hf.load_params(path, config, mesh), load_tokenizer(path)
  check_vocabulary(tokenizer, config.vocab_size, path)
  return config, params, tokenizer


def check_vocabulary(tokenizer, vocab_size: int, path) -> None:
  """A token id past the embedding table would read NaN embeddings (JAX fills out-of-range
  gathers), so a tokenizer larger than the model is refused when the checkpoint loads."""
  if len(tokenizer) > vocab_size:
    raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                     f"vocab_size is {vocab_size}; ids past it have no embedding")
