"""Hugging Face LLaMA checkpoint directories: config.json + (sharded) safetensors, read and written.

Tensors are read lazily, slice by slice, straight into each parameter's target sharding, so
loading a 7B model never holds a full copy per device on the host. The writer produces a
directory that transformers' LlamaForCausalLM and AutoTokenizer load as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from slim_jax import parallel
from slim_jax.models.llama import Llama, LlamaConfig, RopeScaling, partition_rules

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
HF_FILES = (CONFIG, "tokenizer.json", "tokenizer_config.json", GENERATION_CONFIG)

# (HF tensor name, tuple of slices into it) -> that slice as a numpy array
Reader = Callable[[str, tuple], np.ndarray]


def config_from_hf(raw: Mapping, source: str = CONFIG, **overrides) -> LlamaConfig:
  """Our LlamaConfig from a config.json dict (legacy rope_scaling or v5 rope_parameters)."""
  if raw.get("model_type") != "llama":
    raise ValueError(f"{source}: model_type={raw.get('model_type')!r}, expected 'llama'")
  for field, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if raw.get(field, expected) != expected:
      raise ValueError(f"{source}: {field}={raw[field]!r} is not supported (only {expected!r})")
  rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
  theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    scaling = None
  elif kind in ("linear", "llama3"):
    names = [f.name for f in dataclasses.fields(RopeScaling) if f.name != "kind"]
    scaling = RopeScaling(kind, **{name: rope[name] for name in names if name in rope})
  else:
    raise ValueError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")
  heads = raw["num_attention_heads"]
  return LlamaConfig(
      vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
      intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
      num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
      head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
      rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
      max_position_embeddings=raw.get("max_position_embeddings", 2048),
      tie_word_embeddings=raw.get("tie_word_embeddings", False), **overrides)


def config_to_hf(config: LlamaConfig, dtype: str = "float32", **token_ids) -> dict:
  """config.json contents (legacy rope keys, which every transformers version reads)."""
  scaling = config.rope_scaling
  rope = None if scaling is None else {"rope_type": scaling.kind, **{
      k: v for k, v in dataclasses.asdict(scaling).items() if k != "kind"}}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta, "rope_scaling": rope,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False,
      "mlp_bias": False, "torch_dtype": dtype, **token_ids,
  }


def load_config(directory, **overrides) -> LlamaConfig:
  path = pathlib.Path(directory) / CONFIG
  return config_from_hf(json.loads(path.read_text()), str(path), **overrides)


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """(HF tensor name, whether our kernel is its transpose) for an unstacked param path."""
  *modules, leaf = path
  name = ".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules) + ".weight"
  return (name if modules == ["lm_head"] else "model." + name), leaf == "kernel"


def param_shapes(config: LlamaConfig):
  """The "params" tree as ShapeDtypeStructs (nothing allocated)."""
  init = lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return jax.eval_shape(init)


def _reader_slice(read: Reader, path: tuple[str, ...], index: tuple, shape) -> np.ndarray:
  """Our param's `index` slice, read from the HF tensor(s); stacked params read layer by layer."""
  if path[0] == "layers":
    return np.stack([_reader_slice(read, (f"layers_{i}", *path[1:]), index[1:], shape[1:])
                     for i in range(*index[0].indices(shape[0]))])
  name, transposed = hf_name(path)
  return read(name, index[::-1]).T if transposed else read(name, index)


def params_from_reader(read: Reader, config: LlamaConfig, mesh=None):
  """Builds the "params" tree; on a mesh each device reads only its shard (partition_rules)."""
  shapes = param_shapes(config)
  shardings = (None if mesh is None else
               parallel.param_shardings(shapes, partition_rules(config), mesh))
  flat_shapes = traverse_util.flatten_dict(shapes)
  flat_shardings = {} if shardings is None else traverse_util.flatten_dict(shardings)
  out = {}
  for path, struct in flat_shapes.items():
    fetch = lambda index, path=path, struct=struct: _reader_slice(
        read, path, index, struct.shape).astype(struct.dtype)
    if mesh is None:
      out[path] = jnp.asarray(fetch(tuple(slice(0, n) for n in struct.shape)))
    else:
      out[path] = jax.make_array_from_callback(struct.shape, flat_shardings[path], fetch)
  return traverse_util.unflatten_dict(out)


@contextlib.contextmanager
def safetensors_reader(directory):
  """A Reader over model.safetensors or the shards listed in model.safetensors.index.json."""
  directory = pathlib.Path(directory)
  if (directory / INDEX).is_file():
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
  elif (directory / WEIGHTS).is_file():
    with safetensors.safe_open(directory / WEIGHTS, "numpy") as f:
      weight_map = {name: WEIGHTS for name in f.keys()}
  else:
    raise FileNotFoundError(f"{directory}: neither {WEIGHTS} nor {INDEX}")
  with contextlib.ExitStack() as stack:
    files = {file: stack.enter_context(safetensors.safe_open(directory / file, "numpy"))
             for file in sorted(set(weight_map.values()))}

    def read(name: str, index: tuple) -> np.ndarray:
      if name not in weight_map:
        raise KeyError(f"{directory}: tensor {name!r} missing from the checkpoint")
      return files[weight_map[name]].get_slice(name)[index]

    yield read


def load_params(directory, config: LlamaConfig | None = None, mesh=None):
  """The "params" tree of a Hugging Face LLaMA directory (config from config.json by default)."""
  config = config or load_config(directory)
  with safetensors_reader(directory) as read:
    return params_from_reader(read, config, mesh)


def params_to_hf(params, config: LlamaConfig, dtype=None) -> dict[str, np.ndarray]:
  """HF-named host arrays ([out, in] weights) from our params (stacked or per layer)."""
  tensors = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(jax.device_get(value))
    if dtype is not None:
      value = value.astype(dtype)
    per_layer = ([((f"layers_{i}", *path[1:]), value[i]) for i in range(config.num_layers)]
                 if path[0] == "layers" else [(path, value)])
    for layer_path, array in per_layer:
      name, transposed = hf_name(layer_path)
      tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  return tensors


def _write_weights(directory: pathlib.Path, tensors: Mapping[str, np.ndarray], shard_bytes: int):
  """model.safetensors, or model-0000i-of-0000n.safetensors + index when over shard_bytes."""
  shards, size = [[]], 0
  for name in tensors:
    if shards[-1] and size + tensors[name].nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += tensors[name].nbytes
  if len(shards) == 1:
    safetensors.numpy.save_file(dict(tensors), directory / WEIGHTS, metadata={"format": "pt"})
    return
  weight_map = {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in names}, directory / file,
                                metadata={"format": "pt"})
    weight_map.update({name: file for name in names})
  total = sum(t.nbytes for t in tensors.values())
  (directory / INDEX).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def is_complete(directory) -> bool:
  """Whether `directory` holds every file write_hf writes (so conversion can be skipped)."""
  directory = pathlib.Path(directory)
  has_weights = (directory / WEIGHTS).is_file() or (directory / INDEX).is_file()
  return has_weights and all((directory / f).is_file() for f in HF_FILES)


def write_hf(directory, config: LlamaConfig, tensors: Mapping[str, np.ndarray], tokenizer,
             shard_bytes: int = 5 << 30) -> pathlib.Path:
  """Writes a complete HF directory; files are staged and moved in with config.json last, so a
  directory holding config.json (see is_complete) was fully written."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  dtype = str(next(iter(tensors.values())).dtype)
  ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}
  with tempfile.TemporaryDirectory(dir=directory, prefix=".staging-") as staging:
    staging = pathlib.Path(staging)
    _write_weights(staging, tensors, shard_bytes)
    tokenizer.save_pretrained(staging, save_jinja_files=False)  # template in tokenizer_config
    (staging / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2))
    (staging / CONFIG).write_text(json.dumps(config_to_hf(config, dtype, **ids), indent=2))
    for file in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG):
      os.replace(file, directory / file.name)
  return directory


def save_hf(directory, config: LlamaConfig, params, tokenizer, dtype=None) -> pathlib.Path:
  """Our params (e.g. with LoRA merged) as a Hugging Face LLaMA directory."""
  return write_hf(directory, config, params_to_hf(params, config, dtype), tokenizer)
