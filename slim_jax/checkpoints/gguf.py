"""GGUF (llama.cpp) LLaMA files: metadata -> config and tokenizer; tensors -> HF-layout float32.

The `gguf` package reads and dequantizes (Q4_0/Q4_1/Q8_0/F16/F32, ...) with numpy alone.
llama.cpp's converter permutes the rows of the Q and K projections (interleaved RoPE pairs);
we undo it so every tensor is exactly the Hugging Face checkpoint's.
"""

from __future__ import annotations

import pathlib
import re

import gguf
import numpy as np

from slim_jax.models.llama import LlamaConfig, RopeScaling

_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_metadata(path) -> dict:
  """Every metadata key -> its Python value (strings, numbers, lists)."""
  reader = gguf.GGUFReader(path)
  return {key: field.contents() for key, field in reader.fields.items()}


def config_from_metadata(meta, tensor_names, source: str, **overrides) -> LlamaConfig:
  if meta.get("general.architecture") != "llama":
    raise ValueError(f"{source}: general.architecture={meta.get('general.architecture')!r}, "
                     "expected 'llama'")
  get = lambda key, default=None: meta.get(f"llama.{key}", default)
  heads, hidden = get("attention.head_count"), get("embedding_length")
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise ValueError(f"{source}: llama.rope.scaling.type={scaling!r} is not supported")
  return LlamaConfig(
      vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
      hidden_size=hidden, intermediate_size=get("feed_forward_length"),
      num_layers=get("block_count"), num_heads=heads,
      num_kv_heads=get("attention.head_count_kv", heads),
      head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
      rms_norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon", 1e-5)))),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rope_scaling=(RopeScaling("linear", float(get("rope.scaling.factor")))
                    if scaling == "linear" else None),
      max_position_embeddings=get("context_length", 2048),
      tie_word_embeddings="output.weight" not in tensor_names, **overrides)


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's permute(): rows (head, pair, 2) back to HF's (head, 2, half)."""
  rows = weight.shape[0]
  return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
      weight.shape)


def hf_tensor_name(name: str, source: str) -> str:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
  if match and match.group(2) in _NAMES:
    return f"model.layers.{match.group(1)}.{_NAMES[match.group(2)]}.weight"
  base = name.removesuffix(".weight")
  if base in _GLOBAL:
    return _GLOBAL[base] + ".weight"
  raise ValueError(f"{source}: unexpected tensor {name!r}")


def read_gguf(path, **overrides):
  """(LlamaConfig, {HF name: float32 [out, in] array}, metadata) of a GGUF LLaMA file."""
  path = pathlib.Path(path)
  reader = gguf.GGUFReader(path)
  meta = {key: field.contents() for key, field in reader.fields.items()}
  config = config_from_metadata(meta, {t.name for t in reader.tensors}, str(path), **overrides)
  tensors = {}
  for tensor in reader.tensors:
    name = hf_tensor_name(tensor.name, str(path))
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if name.endswith("q_proj.weight"):
      weight = _unpermute(weight, config.num_heads)
    elif name.endswith("k_proj.weight"):
      weight = _unpermute(weight, config.num_kv_heads)
    tensors[name] = weight
  return config, tensors, meta
