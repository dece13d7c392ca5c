"""The LLaMA decoder (LLaMA-2/3, SmolLM2) in Flax linen, EasyLM style: one file, one rules table.

Parameter names mirror Hugging Face's LlamaForCausalLM (embed_tokens, layers_3/self_attn/q_proj,
mlp/gate_proj, ...; kernels [in, out]) so checkpoint conversion and PEFT key names are mechanical.
Positions come from the attention mask (cumsum - 1), so a left-padded row gives exactly the
logits of the unpadded sequence; in a packed row (several examples told apart by segment ids)
each example gets the logits it has alone. Softmax and logits are computed in fp32 whatever the
compute dtype. The optional KV cache is explicit data: `init_cache` makes it, `__call__` returns
it updated. `LlamaConfig.attention` picks the attention kernel (`attend` dispatches): the query
chunks written here, XLA's, cuDNN's fused kernel on GPU or a Pallas flash kernel on TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention
from jax.sharding import PartitionSpec as P

from slim_jax import checks
from slim_jax.models.lora import LoraConfig, kaiming_uniform, lora_delta
from slim_jax.parallel import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Hugging Face rope_scaling: "linear" (positions / factor) or "llama3" (LLaMA-3.1 wavelengths)."""
  kind: str = "linear"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture (Hugging Face field meanings) plus how to run it: dtypes, scan, remat and the
  attention kernel."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"
  scan_layers: bool = False  # one compiled layer body under nn.scan (params stacked on axis 0)
  remat_policy: str = ""  # "" = no remat; else a name in jax.checkpoint_policies
  attention_chunk: int = 128  # queries per causal attention chunk (see query_chunks); 0 = one
  attention: str = "auto"  # chunked, xla, cudnn, pallas; auto = per backend (attention_kind)

  def __post_init__(self):
    checks.one_of("LlamaConfig.attention", self.attention, ATTENTION_KINDS)


ATTENTION_KINDS = ("auto", "chunked", "xla", "cudnn", "pallas")
# auto's choice per jax.default_backend(): the fused kernel each accelerator has; on CPU the
# chunks, which skip the masked half of causal attention as no library kernel there does
_BACKEND_ATTENTION = {"cpu": "chunked", "gpu": "cudnn", "tpu": "pallas"}

_TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
PRESETS: dict[str, LlamaConfig] = {
    "llama2_7b": LlamaConfig(),
    "llama2_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40),
    "llama2_70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8),
    "llama3_8b": LlamaConfig(vocab_size=128256, intermediate_size=14336, num_kv_heads=8,
                             rope_theta=500000.0, max_position_embeddings=8192),
    "llama3_1_8b": LlamaConfig(vocab_size=128256, intermediate_size=14336, num_kv_heads=8,
                               rope_theta=500000.0, max_position_embeddings=131072,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    "smollm2_135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    "tiny": _TINY,  # GQA, untied
    "tiny_mha": dataclasses.replace(_TINY, num_kv_heads=4),
    "tiny_tied": dataclasses.replace(_TINY, tie_word_embeddings=True, rope_theta=100000.0),
}


def partition_rules(config: LlamaConfig):
  """Ordered (regex over the param path, PartitionSpec) rules for slim_jax.parallel (first match).

  Megatron layout on "tensor" (column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel
  embeddings), ZeRO-3 style on "fsdp" for the other dim. LoRA factors follow their base kernel on
  the input side (A) or the output side (B); rank dims are never sharded. With scan_layers the
  stacked layer axis comes first and is not sharded.
  """
  layer = (None,) if config.scan_layers else ()
  column, row = ("fsdp", "tensor"), ("tensor", "fsdp")
  return (
      (r"embed_tokens/embedding$", P("tensor", "fsdp")),
      (r"lm_head/kernel$", P("fsdp", "tensor")),
      (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P(*layer, *column)),
      (r"(o_proj|down_proj)/kernel$", P(*layer, *row)),
      (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_a$", P(*layer, "fsdp", None)),
      (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$", P(*layer, None, "tensor")),
      (r"(o_proj|down_proj)/lora_a$", P(*layer, "tensor", None)),
      (r"(o_proj|down_proj)/lora_b$", P(*layer, None, "fsdp")),
      (r"norm/scale$", P()),
  )


def _batch_axes(rows: int) -> tuple[str, ...]:
  """The batch axes of the mesh in use (jax.set_mesh) when they split `rows` evenly, else ()."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
  if not axes or rows % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def _constrain_batch(x):
  """Keeps activations batch-sharded when running under a mesh (jax.set_mesh); no-op otherwise."""
  axes = _batch_axes(x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies [head_dim / 2] in fp32, with Hugging Face's scaling variants."""
  dim = config.head_dim
  # fp32 exponents as in HF, the power correctly rounded to fp32 as torch's is: numpy's fp32
  # power is 1 ulp off for some exponents, which shifts the angle at position p by p such ulps
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  power = (np.float64(config.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
  inv = np.float32(1.0) / power
  scaling = config.rope_scaling
  if scaling is None:
    return inv
  if scaling.kind == "linear":
    return (inv / scaling.factor).astype(np.float32)
  if scaling.kind == "llama3":
    old = scaling.original_max_position_embeddings
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / scaling.low_freq_factor, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"rope_scaling kind {scaling.kind!r} is not supported (linear, llama3)")


def rope_tables(positions, config: LlamaConfig):
  """(sin, cos) [B, T, head_dim] in fp32 for integer positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies(config)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x, sin, cos):
  """Rotates x [B, T, heads, D] by the half-split convention of Hugging Face checkpoints."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def query_chunks(length: int, slots: int, index, chunk: int) -> list[tuple[int, int, int]]:
  """(query start, query stop, keys scored) per chunk of causal attention.

  When the write index is static (training, evaluation, prefill), queries go in chunks of
  `chunk` that score only the slots up to their own last position, so causal attention computes
  about half the score matrix: that halves attention's time on CPU, as torch's flash kernel does
  by skipping masked blocks. A traced index (decoding) or chunk 0 scores all slots at once.
  """
  if not chunk or not isinstance(index, int):
    return [(0, length, slots)]
  bounds = [(start, min(start + chunk, length)) for start in range(0, length, chunk)]
  return [(start, stop, min(index + stop, slots)) for start, stop in bounds]


def segment_positions(segment_ids):
  """Each token's index within its run of equal segment ids [B, T]: positions restart at 0 where
  a packed example starts, so RoPE sees every example as if it were alone in its row."""
  steps = jnp.arange(segment_ids.shape[-1])
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return steps - jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)


def write_slots(cache, new, index, axis: int):
  """`cache` with `new` written from slot `index` on along `axis`: one index for every row, or
  one per row ([B] int32: a serving engine's rows sit at different positions)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis)
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis - 1))(
      cache, new, index)


@jax.custom_vjp
def softmax(scores):
  """Softmax over the last axis, whose backward pass reads only the probabilities."""
  return jax.nn.softmax(scores, axis=-1)


def _softmax_forward(scores):
  probs = softmax(scores)
  return probs, probs


def _softmax_backward(probs, grad):
  return (probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_forward, _softmax_backward)


class AttentionMask(NamedTuple):
  """Which slots S each of the T queries attends, in the two forms the kernels take.

  `allowed` [B, T, S] is the whole rule (causality, padding, segments): the chunks and jax.nn's
  kernels read it. Pallas' flash kernel takes only causality and segment ids, `q_segments` [B, T]
  and `kv_segments` [B, S], with padding as segment 0. The two agree on every real query; a
  padding query, whose output nothing reads, attends other padding there instead of nothing.
  """
  allowed: jax.Array
  q_segments: jax.Array
  kv_segments: jax.Array


def attention_kind(config: LlamaConfig) -> str:
  """The attention kernel `config.attention` names, "auto" resolved by jax.default_backend():
  chunked on CPU, cudnn on GPU, pallas on TPU, and xla, which runs anywhere, on any other."""
  if config.attention != "auto":
    return config.attention
  return _BACKEND_ATTENTION.get(jax.default_backend(), "xla")


def expressible_kind(kind: str, dtype: str, length: int, index) -> str:
  """`kind`, or "xla" (which takes any call) where the fused kernel cannot express the call:

  - cudnn and pallas, a write index other than a static 0: decoding, one query at a traced slot
    of the cache. Both kernels align causality with the top-left corner of the score matrix
    (query i sees slots up to i), and a single query has nothing to tile: a decode step is
    bound by reading the cache.
  - cudnn, compute in float32: cuDNN's fused attention takes fp16 and bf16 operands only.
  - pallas, a query length (hence key length, see `attend`) that is not a multiple of 128: the
    kernel's key blocks are 128 slots, the TPU lane width, and must tile the keys exactly.
  """
  if kind in ("chunked", "xla"):
    return kind
  if not (isinstance(index, int) and index == 0):
    return "xla"
  if kind == "cudnn" and dtype not in ("bfloat16", "float16"):
    return "xla"
  if kind == "pallas" and length % flash_attention.MIN_BLOCK_SIZE:
    return "xla"
  return kind


def chunked_attention(q, k, v, allowed, index, chunk: int):
  """Causal attention over the cache's own layouts in query chunks (`query_chunks`): queries
  q [B, T, heads, D], keys k [B, kv_heads, D, S], values v [B, kv_heads, S, D], `allowed`
  [B, T, S] -> [B, T, heads, D].

  Queries go head-major too, [B, kv_heads, groups * T, D], so both attention matmuls are plain
  batched matmuls over the cache in its layout. A [B, S, kv_heads, D] cache made XLA transpose
  all of it in every layer and decode step, and an einsum straight to [B, T, heads, D] became a
  slow transposed-operand dot: together a quarter of a batch-16 decode step on CPU.
  """
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[1]
  groups = heads // kv_heads
  outs = []
  for start, stop, keys in query_chunks(length, k.shape[-1], index, chunk):
    size = stop - start
    qc = q[:, start:stop].reshape(batch, size, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkqd,bkds->bkqs", qc.reshape(batch, kv_heads, groups * size, dim),
                        k[..., :keys].astype(q.dtype), preferred_element_type=jnp.float32)
    # additive, so that the backward pass has no select: 0 where allowed, fp32 min elsewhere
    bias = jnp.where(allowed[:, None, None, start:stop, :keys], 0.0, jnp.finfo(jnp.float32).min)
    scores = scores.reshape(batch, kv_heads, groups, size, keys) * np.float32(dim ** -0.5) + bias
    probs = softmax(scores).astype(q.dtype).reshape(batch, kv_heads, groups * size, keys)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v[:, :, :keys].astype(q.dtype))
    outs.append(out.reshape(batch, kv_heads, groups, size, dim).transpose(0, 3, 1, 2, 4))
  return jnp.concatenate(outs, axis=1).reshape(batch, length, heads, dim)


def _interpreted(fn):
  """`fn` with its Pallas calls in TPU interpret mode, its VJP's too: JAX traces a VJP after the
  forward pass, outside any `with` block around the call."""
  def interpret(f, *args):
    with pltpu.force_tpu_interpret_mode():
      return f(*args)

  @jax.custom_vjp
  def run(*args):
    return interpret(fn, *args)

  run.defvjp(lambda *args: interpret(functools.partial(jax.vjp, fn), *args),
             lambda vjp, cotangent: interpret(vjp, cotangent))
  return run


def pallas_attention(q, k, v, q_segments, kv_segments):
  """Pallas' TPU flash kernel, causal within segments: q [B, T, heads, D], k and v [B, kv_heads,
  S, D], segment ids [B, T] and [B, S] -> [B, T, heads, D].

  The kernel wants as many key heads as query heads, so each kv head is repeated for its group.
  Under a mesh it runs per shard (shard_map over the batch axes, and over "tensor" for heads):
  XLA cannot partition a Pallas call, and would gather whole operands onto every device. Off TPU
  it runs in TPU interpret mode, a slow but faithful simulation of the kernel, for tests.
  """
  groups = q.shape[2] // k.shape[1]
  q = q.transpose(0, 2, 1, 3)
  k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)

  def flash(q, k, v, q_segments, kv_segments):
    return flash_attention.flash_attention(
        q, k, v, segment_ids=flash_attention.SegmentIds(q_segments, kv_segments), causal=True,
        sm_scale=q.shape[-1] ** -0.5)

  if jax.default_backend() != "tpu":
    flash = _interpreted(flash)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    rows = _batch_axes(q.shape[0]) or None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[1] % tensor == 0 else None
    flash = jax.shard_map(flash, in_specs=(P(rows, heads),) * 3 + (P(rows),) * 2,
                          out_specs=P(rows, heads), check_vma=False)
  return flash(q, k, v, q_segments, kv_segments).transpose(0, 2, 1, 3)


def attend(q, k, v, mask: AttentionMask, index, config: LlamaConfig):
  """Causal attention of queries q [B, T, heads, D] over keys k [B, kv_heads, D, S] and values
  v [B, kv_heads, S, D] (the cache's layouts) -> [B, T, heads, D], by the kernel that
  `attention_kind` names, or xla where `expressible_kind` says that kernel cannot.

  The one place that dispatches on the kind. Library kernels get transposed views in their own
  layouts (GQA: jax.nn groups heads itself, Pallas repeats kv heads); the cache keeps its own.
  With a static write index they see only the first index + T slots, all that causal queries
  can attend. Scores and softmax are fp32 in every kind, whatever the compute dtype.
  """
  length = q.shape[1]
  kind = expressible_kind(attention_kind(config), config.dtype, length, index)
  if kind == "chunked":
    return chunked_attention(q, k, v, mask.allowed, index, config.attention_chunk)
  slots = index + length if isinstance(index, int) else k.shape[-1]
  k = k[..., :slots].astype(q.dtype).swapaxes(2, 3)  # [B, kv_heads, S, D]
  v = v[:, :, :slots].astype(q.dtype)
  if kind == "pallas":
    return pallas_attention(q, k, v, mask.q_segments, mask.kv_segments[:, :slots])
  # A boolean mask, not the chunks' additive fp32 bias: jax.nn turns it into the large negative
  # bias cuDNN handles in bf16 (-2**41), where fp32's min would round to -inf and a fully masked
  # padding row turn NaN.
  # is_causal lets cuDNN skip the blocks above the diagonal, which it must otherwise score and
  # mask; xla needs the mask alone (expressible_kind keeps cudnn to a static index of 0)
  return jax.nn.dot_product_attention(
      q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask.allowed[:, None, :, :slots],
      is_causal=kind == "cudnn", implementation=kind)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    # HF's x * rsqrt(mean(x^2) + eps). torch's rsqrt is a correctly rounded 1 / sqrt, XLA's CPU
    # rsqrt up to ~1.3 ulp off, and XLA rewrites 1 / sqrt and x / sqrt into it all the same
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class Linear(nn.Module):
  """A bias-free projection with an optional LoRA adapter read from the "lora" collection."""
  features: int
  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                        cfg.param_dtype)
    y = x @ kernel.astype(cfg.dtype)
    adapted = self.lora is not None and self.name in self.lora.targets
    if adapted and (self.is_initializing() or self.has_variable("lora", "lora_a")):
      rank = self.lora.rank
      a = self.variable("lora", "lora_a", lambda: kaiming_uniform(
          self.make_rng("params"), (x.shape[-1], rank), cfg.param_dtype)).value
      b = self.variable("lora", "lora_b", lambda: jnp.zeros(
          (rank, self.features), cfg.param_dtype)).value
      key = self.make_rng("dropout") if self.has_rng("dropout") else None
      y = y + lora_delta(x, a, b, self.lora, key)
    return y


class Attention(nn.Module):
  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, cache, sin, cos, mask, index):
    cfg = self.config
    batch, length, _ = x.shape
    heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda features, name: Linear(features, cfg, self.lora, name=name)
    q = dense(heads * dim, "q_proj")(x).reshape(batch, length, heads, dim)
    k = dense(kv_heads * dim, "k_proj")(x).reshape(batch, length, kv_heads, dim)
    v = dense(kv_heads * dim, "v_proj")(x).reshape(batch, length, kv_heads, dim)
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    # head-major, keys [B, kv_heads, D, S] and values [B, kv_heads, S, D], as the cache stores
    # them (init_cache, chunked_attention)
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    if cache is not None:
      k = write_slots(cache["k"], k.astype(cache["k"].dtype), index, 3)
      v = write_slots(cache["v"], v.astype(cache["v"].dtype), index, 2)
      cache = {"k": k, "v": v}
    out = attend(q, k, v, mask, index, cfg)
    return dense(cfg.hidden_size, "o_proj")(out.reshape(batch, length, heads * dim)), cache


class MLP(nn.Module):
  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, name: Linear(features, cfg, self.lora, name=name)
    gate = dense(cfg.intermediate_size, "gate_proj")(x)
    silu = gate / (1 + jnp.exp(-gate))  # closer to torch's silu than XLA's CPU logistic
    hidden = silu * dense(cfg.intermediate_size, "up_proj")(x)
    return dense(cfg.hidden_size, "down_proj")(hidden)


class Block(nn.Module):
  """One decoder layer; signature (carry, scanned, *broadcast) so nn.scan can stack it."""
  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, cache, sin, cos, mask, index):
    cfg = self.config
    x = _constrain_batch(x)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)
    h, cache = Attention(cfg, self.lora, name="self_attn")(
        norm("input_layernorm")(x), cache, sin, cos, mask, index)
    x = x + h
    x = x + MLP(cfg, self.lora, name="mlp")(norm("post_attention_layernorm")(x))
    return x, cache


class Head(nn.Module):
  """The untied output projection, accumulated and returned in fp32."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", nn.initializers.normal(0.02),
                        (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)
    return jnp.matmul(x, kernel.astype(cfg.dtype), preferred_element_type=jnp.float32)


def _block_class(config: LlamaConfig):
  if not config.remat_policy:
    return Block
  policy = getattr(jax.checkpoint_policies, config.remat_policy, None)
  if policy is None:
    raise ValueError(f"remat_policy {config.remat_policy!r} is not in jax.checkpoint_policies")
  return nn.remat(Block, policy=policy, prevent_cse=not config.scan_layers)


def init_cache(config: LlamaConfig, batch: int, length: int):
  """A zeroed KV cache for `length` slots S: one {"k": [B, kv_heads, D, S], "v": [B, kv_heads, S,
  D]} per layer, stacked on a leading axis when scanned. Keys are stored transposed so that both
  attention matmuls read the cache in place as plain matmul operands (q @ k, probs @ v)."""
  k = (batch, config.num_kv_heads, config.head_dim, length)
  v = (batch, config.num_kv_heads, length, config.head_dim)
  if config.scan_layers:
    layers = (config.num_layers,)
    return {"k": jnp.zeros(layers + k, config.dtype), "v": jnp.zeros(layers + v, config.dtype)}
  return tuple({"k": jnp.zeros(k, config.dtype), "v": jnp.zeros(v, config.dtype)}
               for _ in range(config.num_layers))


def _batch_axis(cache) -> int:
  return 1 if isinstance(cache, dict) else 0  # a scanned cache stacks its layers first


def tile_cache(cache, rows: int):
  """A one-row cache repeated to `rows` rows: a prompt prefix every new row starts from."""
  axis = _batch_axis(cache)
  return jax.tree.map(lambda c: jnp.repeat(c, rows, axis=axis), cache)


def set_cache_rows(cache, rows, new):
  """`cache` with its rows `rows` [k] replaced by the k rows of `new` (out-of-range rows are
  dropped: a padded batch of new rows)."""
  index = (slice(None),) * _batch_axis(cache) + (rows,)
  return jax.tree.map(lambda full, part: full.at[index].set(part, mode="drop"), cache, new)


class Llama(nn.Module):
  """LlamaForCausalLM. Apply with {"params": base} or {"params": base, "lora": adapters}.

  __call__(tokens [B, T], mask, cache, index) -> (fp32 logits [B, T, V], cache).
  Without a cache, `mask` [B, T] marks real tokens (default all). With a cache of S slots, the T
  tokens are written at slots index..index+T-1 (`index` an int, or [B] int32, a slot per row) and
  `mask` [B, S] marks every real slot written so far or now. `last_only` returns logits for the last position only (generation). LoRA dropout
  is active exactly when a "dropout" rng is passed.

  Packed rows (training, no cache) pass `segment_ids` [B, T] instead of `mask`: 1, 2, ... per
  example and 0 on padding. A token then attends causally within its own segment only, and its
  RoPE position is `positions` [B, T] (default: its index within the segment).
  """
  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, tokens, mask=None, cache=None, index=0, last_only=False, segment_ids=None,
               positions=None):
    cfg = self.config
    batch, length = tokens.shape
    slots = length if cache is None else jax.tree.leaves(cache)[0].shape[-1]  # k: [..., D, S]
    if segment_ids is None:
      if positions is not None:
        raise ValueError("positions are for packed rows: pass them with segment_ids")
      mask = jnp.ones((batch, slots), bool) if mask is None else mask.astype(bool)
      positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
      keys = mask[:, None, :]  # [B, 1, S]
      segments = mask.astype(jnp.int32)
    else:
      if cache is not None or mask is not None:
        raise ValueError("segment_ids replace mask, and packed rows take no KV cache")
      positions = segment_positions(segment_ids) if positions is None else positions
      keys = (segment_ids[:, None, :] == segment_ids[:, :, None]) & (segment_ids[:, None, :] > 0)
      segments = segment_ids.astype(jnp.int32)
    # [B or 1, T]: the slot of every token, from one index for all rows or one per row
    written = jnp.reshape(index, (-1, 1)) + jnp.arange(length)
    at_written = lambda x: jnp.take_along_axis(x, written, axis=1, mode="clip")
    sin, cos = rope_tables(at_written(positions), cfg)
    causal = jnp.arange(slots) <= written[..., None]
    attention_mask = AttentionMask(causal & keys, at_written(segments), segments)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.02),
                     name="embed_tokens")
    x = embed(tokens)
    block = _block_class(cfg)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0, "lora": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                       length=cfg.num_layers)
      x, cache = layers(cfg, self.lora, name="layers")(x, cache, sin, cos, attention_mask, index)
    else:
      new_cache = []
      for i in range(cfg.num_layers):
        x, layer_cache = block(cfg, self.lora, name=f"layers_{i}")(
            x, None if cache is None else cache[i], sin, cos, attention_mask, index)
        new_cache.append(layer_cache)
      cache = None if cache is None else tuple(new_cache)
    x = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x)
    if last_only:
      x = x[:, -1:]
    if cfg.tie_word_embeddings:
      logits = jnp.matmul(x, embed.embedding.T.astype(cfg.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = Head(cfg, name="lm_head")(x)
    return _constrain_batch(logits), cache


_PASSES = {"forward": 1, "lora": 2, "full": 3}  # forward passes' worth of FLOPs per step


def flops_per_token(config: LlamaConfig, seq_len: int, step: str = "forward") -> float:
  """Model FLOPs per token of causal sequences of `seq_len` tokens: the numerator of MFU.

  The standard convention (PaLM's appendix B, 6N + 12*L*H*Q*T per trained token; MaxText's
  calculate_tflops_training_per_device): 2 FLOPs per weight of every matmul, lm_head included
  and the embedding lookup not, plus the attention matmuls QK^T and PV, 4 * heads * head_dim
  FLOPs per layer and per key, over seq_len / 2 keys: the causal half of PaLM's T, as MaxText
  halves it. Norms, softmax and activations are not counted. `step` is "forward" (prefill),
  "full" fine-tuning (3x forward: input and weight gradients) or "lora" (2x forward: input
  gradients through the frozen weights and no weight gradients; the rank-r adapters' own FLOPs
  are neglected).
  """
  if step not in _PASSES:
    raise ValueError(f"step {step!r} is not one of {', '.join(_PASSES)}")
  c = config
  per_layer = c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim + (
      3 * c.hidden_size * c.intermediate_size)
  weights = c.num_layers * per_layer + c.hidden_size * c.vocab_size
  attention = 4 * c.num_layers * c.num_heads * c.head_dim * (seq_len / 2)
  return _PASSES[step] * (2 * weights + attention)
