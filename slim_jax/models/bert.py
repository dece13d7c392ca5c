"""The BERT sentence encoder (all-MiniLM-L6-v2, bert-base-style checkpoints) in Flax linen.

`apply(params, input_ids, attention_mask, config, pooling)` is a pure function from a plain
params pytree to pooled, L2-normalised sentence embeddings, so the encoder can be frozen (encode
once) or fine-tuned inside a jitted recommender step alike. `load(directory)` reads a Hugging Face
directory (config.json + model.safetensors, or shards listed in model.safetensors.index.json)
with the safetensors numpy API, plus the sentence-transformers files that define the embedding:
pooling (1_Pooling/config.json), normalisation (modules.json) and max length
(sentence_bert_config.json). The tokenizer is the `tokenizers` library over tokenizer.json,
imported when a directory is loaded: SLIM's model (models/slim.py) and config import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec as P

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
               "relu": nn.relu}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: str = "float32"  # activations and matmuls; softmax, norms and pooling stay fp32


@dataclasses.dataclass(frozen=True)
class Pooling:
  """How token states become one vector, as sentence-transformers' Pooling + Normalize do."""
  mode: str = "mean"  # mean | cls | max | mean_sqrt_len
  normalize: bool = True


POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
LEGACY_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                       "pooling_mode_max_tokens": "max",
                       "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


# Ordered (regex over the param path, PartitionSpec) rules for slim_jax.parallel: Megatron layout
# on "tensor" (column-parallel q/k/v/intermediate, row-parallel attention and FFN outputs), ZeRO-3
# on "fsdp". Word embeddings split their hidden dim: BERT vocabularies (30522) rarely divide an axis.
PARTITION_RULES = (
    (r"word_embeddings/embedding$", P(None, "tensor")),
    (r"(position|token_type)_embeddings/embedding$", P()),
    (r"(query|key|value|intermediate)/kernel$", P("fsdp", "tensor")),
    (r"(query|key|value|intermediate)/bias$", P("tensor")),
    (r"(attention_out|output)/kernel$", P("tensor", "fsdp")),
    (r"(attention_out|output)/bias$", P()),
    (r"_norm/(scale|bias)$", P()),
)


class Layer(nn.Module):
  """One post-LayerNorm transformer block, as BertLayer."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, key_bias):
    cfg = self.config
    batch, length, hidden = x.shape
    heads = cfg.num_heads
    dense = lambda features, name: nn.Dense(features, dtype=cfg.dtype, name=name)
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, name=name)
    split = lambda y: y.reshape(batch, length, heads, hidden // heads)
    q, k, v = (split(dense(hidden, name)(x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(scores / np.sqrt(hidden // heads) + key_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(cfg.dtype), v).reshape(x.shape)
    x = norm("attention_norm")(x + dense(hidden, "attention_out")(context)).astype(cfg.dtype)
    ffn = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x))
    return norm("output_norm")(x + dense(hidden, "output")(ffn)).astype(cfg.dtype)


class Bert(nn.Module):
  """Token ids [B, T] and a 0/1 attention mask [B, T] -> last hidden states [B, T, H]."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    cfg = self.config
    embed = lambda size, name: nn.Embed(size, cfg.hidden_size, dtype=cfg.dtype, name=name)
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
         + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids)))
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, name="embeddings_norm")(x)
    x = x.astype(cfg.dtype)
    # Padded keys get the most negative float added, as Hugging Face's extended attention mask.
    key_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(cfg.num_layers):
      x = Layer(cfg, name=f"layer_{i}")(x, key_bias)
    return x


def pool(hidden, attention_mask, pooling: Pooling):
  """[B, T, H] token states -> [B, H] fp32 sentence vectors, masked as sentence-transformers."""
  hidden = hidden.astype(jnp.float32)
  mask = attention_mask[..., None].astype(jnp.float32)
  if pooling.mode == "cls":
    pooled = hidden[:, 0]
  elif pooling.mode == "max":
    pooled = jnp.max(jnp.where(mask > 0, hidden, -1e9), axis=1)
  elif pooling.mode in ("mean", "mean_sqrt_len"):
    count = jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    pooled = jnp.sum(hidden * mask, axis=1) / (count if pooling.mode == "mean" else jnp.sqrt(count))
  else:
    raise ValueError(f"pooling mode {pooling.mode!r} is not one of {', '.join(POOLING_MODES)}")
  if pooling.normalize:  # torch.nn.functional.normalize(p=2, eps=1e-12)
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


def apply(params, input_ids, attention_mask, config: BertConfig, pooling: Pooling = Pooling()):
  """Sentence embeddings [B, H] fp32; pure, so it jits and differentiates w.r.t. `params`."""
  hidden = Bert(config).apply({"params": params}, input_ids, attention_mask)
  return pool(hidden, attention_mask, pooling)


@functools.partial(jax.jit, static_argnums=0)
def init(config: BertConfig, rng) -> dict:
  """Random params, for tests and shapes: real encoders are loaded, not trained from scratch."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  return Bert(config).init(rng, dummy, dummy)["params"]


# ---------------------------------------------------------------------------------------------
# Hugging Face directories.


def config_from_hf(raw: Mapping, source: str = "config.json", **overrides) -> BertConfig:
  """Our BertConfig from a BERT-family config.json (bert, MiniLM; absolute positions only)."""
  if raw.get("model_type") != "bert":
    raise ValueError(f"{source}: model_type={raw.get('model_type')!r}, expected 'bert'")
  if raw.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{source}: position_embedding_type={raw['position_embedding_type']!r} "
                     "is not supported (only 'absolute')")
  if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act={raw['hidden_act']!r} is not one of "
                     f"{sorted(ACTIVATIONS)}")
  return BertConfig(
      vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
      num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
      intermediate_size=raw["intermediate_size"],
      max_position_embeddings=raw.get("max_position_embeddings", 512),
      type_vocab_size=raw.get("type_vocab_size", 2),
      layer_norm_eps=raw.get("layer_norm_eps", 1e-12), hidden_act=raw.get("hidden_act", "gelu"),
      **overrides)


# Our module name -> BertModel's (layer modules are relative to encoder.layer.<i>).
HF_MODULES = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings_norm": "embeddings.LayerNorm",
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense",
    "output_norm": "output.LayerNorm",
}


def hf_names(path: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
  """(candidate HF tensor names, whether our kernel is its transpose) for a param path.

  Candidates cover BertModel names, with the "bert." prefix of BertFor* heads, and the old
  LayerNorm gamma/beta spelling of the original Google conversions.
  """
  *modules, leaf = path
  layer = [f"encoder.layer.{m.removeprefix('layer_')}" for m in modules if m.startswith("layer_")]
  module = ".".join(layer + [HF_MODULES[modules[-1]]])
  leaves = {"kernel": ("weight",), "embedding": ("weight",), "scale": ("weight", "gamma"),
            "bias": ("bias", "beta") if modules[-1].endswith("_norm") else ("bias",)}[leaf]
  names = tuple(f"{prefix}{module}.{name}" for prefix in ("", "bert.") for name in leaves)
  return names, leaf == "kernel"


def read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors or of the shards in model.safetensors.index.json."""
  if (directory / INDEX).is_file():
    files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
  elif (directory / WEIGHTS).is_file():
    files = [WEIGHTS]
  else:
    raise FileNotFoundError(f"{directory}: neither {WEIGHTS} nor {INDEX}")
  tensors = {}
  for file in files:
    with safetensors.safe_open(directory / file, "numpy") as f:
      tensors.update({name: f.get_tensor(name) for name in f.keys()})
  return tensors


def params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig,
                   source: str = WEIGHTS) -> dict:
  """The params tree (numpy fp32) from HF tensors; heads and pooler weights are ignored."""
  shapes = traverse_util.flatten_dict(jax.eval_shape(lambda: init(config, jax.random.key(0))))
  params = {}
  for path, struct in shapes.items():
    names, transposed = hf_names(path)
    name = next((n for n in names if n in tensors), None)
    if name is None:
      raise KeyError(f"{source}: none of {list(names)} found (needed for {'/'.join(path)})")
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transposed else value
    if value.shape != struct.shape:
      raise ValueError(f"{source}: {name} has shape {value.shape}, config.json implies "
                       f"{struct.shape} for {'/'.join(path)}")
    params[path] = value
  return traverse_util.unflatten_dict(params)


def params_to_hf(params) -> dict[str, np.ndarray]:
  """BertModel's tensors (fp32, no "bert." prefix, weight/bias spelling) of a params tree: the
  inverse of `params_from_hf`."""
  tensors = {}
  for path, value in traverse_util.flatten_dict(params).items():
    names, transposed = hf_names(path)
    value = np.asarray(value, np.float32)
    tensors[names[0]] = np.ascontiguousarray(value.T if transposed else value)
  return tensors


WEIGHT_FILES = (WEIGHTS, INDEX, "model-*.safetensors", "pytorch_model*.bin", "*.h5", "*.onnx",
                "*.msgpack")


def save(directory: pathlib.Path, params, source: pathlib.Path) -> None:
  """A Hugging Face (sentence-transformers) directory of `params` into the new `directory`:
  every file of the directory `source` it was loaded from (config, tokenizer, pooling), less its
  weights, and model.safetensors of `params`."""
  import shutil

  import safetensors.numpy
  source = pathlib.Path(source)
  ignore = shutil.ignore_patterns(*WEIGHT_FILES)
  shutil.copytree(source, directory, ignore=lambda d, names: ignore(d, names) if
                  pathlib.Path(d) == source else set())
  safetensors.numpy.save_file(params_to_hf(params), str(pathlib.Path(directory) / WEIGHTS),
                              metadata={"format": "pt"})


def pooling_from_dir(directory: pathlib.Path) -> Pooling:
  """The Pooling and Normalize modules listed in modules.json; a plain HF directory (no
  modules.json) gets sentence-transformers' default for it: mean pooling, and we normalise."""
  modules_file = directory / "modules.json"
  if not modules_file.is_file():
    return Pooling()
  modules = json.loads(modules_file.read_text())
  by_type = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
  if "Pooling" not in by_type:
    raise ValueError(f"{modules_file}: no sentence_transformers Pooling module")
  config_file = directory / by_type["Pooling"]["path"] / "config.json"
  raw = json.loads(config_file.read_text())
  if "pooling_mode" in raw:  # sentence-transformers >= 6: "mean", "cls", ... or a list of them
    named = raw["pooling_mode"]
    modes = [named] if isinstance(named, str) else list(named)
  else:
    modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if raw.get(key)]
  modes = [mode.removesuffix("_tokens") for mode in modes]
  if len(modes) != 1 or modes[0] not in POOLING_MODES:
    raise ValueError(f"{config_file}: pooling {modes or 'none'} is not supported (exactly one "
                     f"of {', '.join(POOLING_MODES)})")
  return Pooling(modes[0], normalize="Normalize" in by_type)


def max_seq_length(directory: pathlib.Path, config: BertConfig) -> int:
  """sentence-transformers' max_seq_length, else min(positions, tokenizer model_max_length)."""
  st_file = directory / "sentence_bert_config.json"
  if st_file.is_file() and json.loads(st_file.read_text()).get("max_seq_length"):
    return int(json.loads(st_file.read_text())["max_seq_length"])
  tok_file = directory / "tokenizer_config.json"
  tok_max = json.loads(tok_file.read_text()).get("model_max_length") if tok_file.is_file() else None
  return min(config.max_position_embeddings, int(tok_max or config.max_position_embeddings))


def lowercases(directory: pathlib.Path) -> bool:
  """sentence-transformers' do_lower_case (lowercasing before the tokenizer's own normaliser)."""
  st_file = directory / "sentence_bert_config.json"
  return st_file.is_file() and bool(json.loads(st_file.read_text()).get("do_lower_case"))


def load_tokenizer(directory: pathlib.Path, max_len: int):
  """tokenizers.Tokenizer of tokenizer.json, truncating to `max_len` tokens (specials included),
  unpadded."""
  import tokenizers
  path = directory / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: no tokenizer.json")
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_len)
  return tokenizer


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
  """A loaded directory: architecture, pooling, tokenizer and weights (numpy)."""
  config: BertConfig
  pooling: Pooling
  max_len: int
  lowercase: bool
  tokenizer: Any = dataclasses.field(compare=False, repr=False)  # a tokenizers.Tokenizer
  params: dict = dataclasses.field(compare=False, repr=False)

  @property
  def pad_id(self) -> int:
    padding = self.tokenizer.token_to_id("[PAD]")
    return 0 if padding is None else padding

  def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
    """int32 token ids per text, stripped (and lowercased) as sentence-transformers does."""
    texts = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
    return [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(texts)]


def load_weights(directory, dtype: str = "float32") -> tuple[BertConfig, dict]:
  """(config, numpy params) of a Hugging Face BERT-family directory."""
  directory = pathlib.Path(directory)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory}: no config.json")
  config = config_from_hf(json.loads(config_file.read_text()), str(config_file), dtype=dtype)
  return config, params_from_hf(read_safetensors(directory), config, str(directory))


def load(directory, max_len: int = 0, dtype: str = "float32") -> SentenceEncoder:
  """A sentence-transformers (or plain BERT) directory as a SentenceEncoder; max_len 0 = the
  directory's own."""
  directory = pathlib.Path(directory)
  config, params = load_weights(directory, dtype)
  max_len = max_len or max_seq_length(directory, config)
  if max_len > config.max_position_embeddings:
    raise ValueError(f"max_len {max_len} exceeds {directory / 'config.json'}'s "
                     f"max_position_embeddings {config.max_position_embeddings}")
  return SentenceEncoder(config, pooling_from_dir(directory), max_len, lowercases(directory),
                         load_tokenizer(directory, max_len), params)
