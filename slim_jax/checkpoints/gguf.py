"""GGUF (llama.cpp) LLaMA files, read and written: metadata <-> config; tensors <-> HF layout.

The `gguf` package reads and dequantizes (Q4_0/Q4_1/Q8_0/F16/F32, ...) with numpy alone.
llama.cpp's converter permutes the rows of the Q and K projections (interleaved RoPE pairs);
we undo it so every tensor is exactly the Hugging Face checkpoint's, and redo it when writing.
The writer takes the tensors one at a time (the header is written from their shapes first), so a
file is written without ever holding the model; the tokenizer's metadata comes from
`checkpoints.tokenizer.gguf_fields`.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping

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
_ARCHITECTURE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama", the one written and read


def read_metadata(path) -> dict:
  """Every metadata key -> its Python value (strings, numbers, lists)."""
  reader = gguf.GGUFReader(path)
  return {key: field.contents() for key, field in reader.fields.items()}


def config_from_metadata(meta, tensor_names, source: str, **overrides) -> LlamaConfig:
  if meta.get("general.architecture") != _ARCHITECTURE:
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


# ---------------------------------------------------------------------------------------------
# Writing.

_TYPES = gguf.GGMLQuantizationType
# export.dtype -> (the type of the 2-D weights, general.file_type); the 1-D norm scales stay F32,
# as llama.cpp's converter keeps them
FILE_TYPES = {"f32": (_TYPES.F32, gguf.LlamaFileType.ALL_F32),
              "f16": (_TYPES.F16, gguf.LlamaFileType.MOSTLY_F16),
              "q8_0": (_TYPES.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
_GGUF_NAMES = {hf: name for name, hf in _NAMES.items()}
_GGUF_GLOBAL = {hf: name for name, hf in _GLOBAL.items()}


def gguf_tensor_name(name: str) -> str:
  """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (hf_tensor_name's
  inverse)."""
  match = re.fullmatch(r"model\.layers\.(\d+)\.([\w.]+)\.weight", name)
  if match and match.group(2) in _GGUF_NAMES:
    return f"blk.{match.group(1)}.{_GGUF_NAMES[match.group(2)]}.weight"
  base = name.removesuffix(".weight")
  if base in _GGUF_GLOBAL:
    return _GGUF_GLOBAL[base] + ".weight"
  raise ValueError(f"the tensor {name!r} has no GGUF name (a LLaMA tensor is expected)")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's permute(): HF's rows (head, 2, half) to GGUF's (head, pair, 2); _unpermute's
  inverse."""
  rows = weight.shape[0]
  return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
      weight.shape)


def gguf_layout(name: str, weight: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """An HF tensor [out, in] as GGUF holds it: Q and K rows permuted, the rest as they are."""
  if name.endswith("q_proj.weight"):
    return _permute(weight, config.num_heads)
  if name.endswith("k_proj.weight"):
    return _permute(weight, config.num_kv_heads)
  return weight


def tensor_type(shape, dtype: str) -> gguf.GGMLQuantizationType:
  """The type a tensor of this HF `shape` is written in for `export.dtype`: norms F32; a Q8_0
  weight whose rows are not whole blocks of 32 F16, as llama.cpp's converter falls back."""
  kind = FILE_TYPES[dtype][0] if len(shape) > 1 else _TYPES.F32
  block = gguf.GGML_QUANT_SIZES[kind][0]  # 1 for F32 and F16
  return _TYPES.F16 if shape[-1] % block else kind


def encode(weight: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
  """The bytes (as gguf's writer takes them) of a float tensor in GGML type `kind`."""
  if kind == _TYPES.F32:
    return np.ascontiguousarray(weight, np.float32)
  if kind == _TYPES.F16:
    return np.ascontiguousarray(weight, np.float16)
  return gguf.quants.quantize(np.asarray(weight, np.float32), kind)


def llama_metadata(config: LlamaConfig, name: str, dtype: str) -> dict:
  """The general.* and llama.* keys llama.cpp (and config_from_metadata) read for `config`.

  Only linear RoPE scaling has keys; LLaMA-3.1's scaling would need llama.cpp's rope_freqs
  tensor, which neither this writer nor the reader handles, so it is refused here, before a
  file is begun."""
  scaling = config.rope_scaling
  if scaling is not None and scaling.kind != "linear":
    raise ValueError(f"rope_scaling {scaling.kind!r} cannot be written to GGUF (only linear)")
  key = lambda template: template.format(arch=_ARCHITECTURE)
  keys = gguf.Keys
  meta = {
      keys.General.TYPE: "model", keys.General.NAME: name,
      keys.General.FILE_TYPE: int(FILE_TYPES[dtype][1]),
      keys.General.QUANTIZATION_VERSION: gguf.GGML_QUANT_VERSION,
      key(keys.LLM.VOCAB_SIZE): config.vocab_size,
      key(keys.LLM.CONTEXT_LENGTH): config.max_position_embeddings,
      key(keys.LLM.EMBEDDING_LENGTH): config.hidden_size,
      key(keys.LLM.BLOCK_COUNT): config.num_layers,
      key(keys.LLM.FEED_FORWARD_LENGTH): config.intermediate_size,
      key(keys.Attention.HEAD_COUNT): config.num_heads,
      key(keys.Attention.HEAD_COUNT_KV): config.num_kv_heads,
      key(keys.Attention.LAYERNORM_RMS_EPS): float(config.rms_norm_eps),
      key(keys.Rope.DIMENSION_COUNT): config.head_dim,
      key(keys.Rope.FREQ_BASE): float(config.rope_theta),
  }
  if config.head_dim != config.hidden_size // config.num_heads:  # else llama.cpp derives it
    meta[key(keys.Attention.KEY_LENGTH)] = meta[key(keys.Attention.VALUE_LENGTH)] = config.head_dim
  if scaling is not None:
    meta[key(keys.Rope.SCALING_TYPE)] = gguf.RopeScalingType.LINEAR.value
    meta[key(keys.Rope.SCALING_FACTOR)] = float(scaling.factor)
  return meta


def _add_field(writer: gguf.GGUFWriter, key: str, value) -> None:
  """One metadata key in the type llama.cpp reads it as: counts and ids uint32, reals float32,
  lists typed by their items (token types int32)."""
  if isinstance(value, bool):
    writer.add_bool(key, value)
  elif isinstance(value, int):
    writer.add_uint32(key, value)
  elif isinstance(value, float):
    writer.add_float32(key, value)
  elif isinstance(value, str):
    writer.add_string(key, value)
  elif isinstance(value, (list, tuple)):
    writer.add_array(key, list(value))
  else:
    raise TypeError(f"GGUF metadata {key}: cannot write a {type(value).__name__}")


def write_gguf(path, config: LlamaConfig, metadata: Mapping[str, object],
               shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], np.ndarray],
               dtype: str) -> None:
  """Writes the GGUF LLaMA file `path` (as named: a caller stages it, see multihost.write):
  `metadata`, then every HF tensor of `shapes` ([out, in]) as `read(name)` gives it in float32,
  in `dtype`'s types. Each tensor's type and size follow from its shape, so the header is
  written first and the tensors are read, converted and written one at a time."""
  writer = gguf.GGUFWriter(path, _ARCHITECTURE)  # general.architecture
  try:
    for key, value in metadata.items():
      _add_field(writer, key, value)
    kinds = {name: tensor_type(shape, dtype) for name, shape in shapes.items()}
    for name, shape in shapes.items():
      byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kinds[name])
      writer.add_tensor_info(gguf_tensor_name(name), byte_shape, np.dtype(np.uint8),
                             int(np.prod(byte_shape)), raw_dtype=kinds[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in shapes.items():
      weight = read(name)
      if weight.shape != tuple(shape):
        raise ValueError(f"{name}: shape {weight.shape}, expected {tuple(shape)}")
      writer.write_tensor_data(encode(gguf_layout(name, weight, config), kinds[name]))
  finally:
    writer.close()
