"""Batched sampling from the LLaMA student with a preallocated KV cache.

Prompts are left-padded to a bucket (a power of two or three quarters of one), so one compiled program (prefill, then a
lax.while_loop of single-token decode steps) serves every prompt length in the bucket. The loop
stops when every row has emitted a stop token or max_new_tokens is reached. Works with LoRA
(pass {"params", "lora"}, or merged params) and on a sharded mesh (under jax.set_mesh).

  python -m slim_jax.generate --checkpoint=<HF directory or .gguf> \
      --prompt="Suggest three sci-fi movies for someone who loved Alien."
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax.models.llama import Llama, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = no top-k filter
  top_p: float = 1.0  # 1 = no nucleus filter


def sample(logits, key, sampling: SamplingConfig):
  """Next tokens [B] from fp32 logits [B, V]: greedy, or temperature with top-k / top-p."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "stop_ids", "pad_id"))
def generate_tokens(model: Llama, variables, tokens, mask, key, *, sampling: SamplingConfig,
                    stop_ids: tuple[int, ...], pad_id: int):
  """New tokens [B, max_new_tokens] after left-padded prompts `tokens`/`mask` [B, P].

  Each row ends with its first stop token, followed by pad_id.
  """
  batch, prompt_len = tokens.shape
  steps = sampling.max_new_tokens
  cache = init_cache(model.config, batch, prompt_len + steps)
  mask = jnp.concatenate([mask.astype(bool), jnp.zeros((batch, steps), bool)], axis=1)
  logits, cache = model.apply(variables, tokens, mask, cache, 0, last_only=True)
  stops = jnp.asarray(stop_ids, jnp.int32)

  def emit(state, logits):
    step, cache, mask, out, done, key = state
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_id, sample(logits[:, -1], sub, sampling))
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
    return step + 1, cache, mask, out, done | jnp.isin(token, stops), key

  def decode(state):
    step, cache, mask, out, done, key = state
    slot = prompt_len + step - 1
    mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((batch, 1), bool), slot, axis=1)
    previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)
    logits, cache = model.apply(variables, previous, mask, cache, slot, last_only=True)
    return emit((step, cache, mask, out, done, key), logits)

  state = emit((0, cache, mask, jnp.full((batch, steps), pad_id, jnp.int32),
                jnp.zeros(batch, bool), key), logits)
  state = jax.lax.while_loop(lambda s: (s[0] < steps) & ~jnp.all(s[4]), decode, state)
  return state[3]


def bucket(length: int, minimum: int = 16) -> int:
  """The padded prompt length: the next power of two or three quarters of one (16, 24, 32, 48,
  ...), so few programs are ever compiled and padding wastes at most a third of a prefill."""
  size = max(minimum, 1 << (length - 1).bit_length())
  return size * 3 // 4 if size * 3 // 4 >= max(length, minimum) else size


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
  """(tokens, mask) int32/bool [B, length] with each prompt right-aligned."""
  length = length or bucket(max(len(p) for p in prompts))
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise ValueError(f"prompt {row} has {len(prompt)} tokens, more than {length}")
    tokens[row, length - len(prompt):] = prompt
    mask[row, length - len(prompt):] = True
  return tokens, mask


def generate_ids(model: Llama, variables, prompts: Sequence[Sequence[int]], key,
                 sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int) -> list[list[int]]:
  """Generated ids per prompt, up to and excluding the first stop token."""
  tokens, mask = left_pad(prompts, pad_id)
  out = np.asarray(generate_tokens(model, variables, tokens, mask, key, sampling=sampling,
                                   stop_ids=tuple(stop_ids), pad_id=pad_id))
  results = []
  for row in out:
    stop = np.flatnonzero(np.isin(row, stop_ids))
    results.append(row[:stop[0] if len(stop) else len(row)].tolist())
  return results


def generate_text(model: Llama, variables, tokenizer, prompts: Sequence[Sequence[int]], key,
                  sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = ()) -> list[str]:
  """Decoded completions of token-id prompts, cut at EOS and at the first stop string."""
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  ids = generate_ids(model, variables, prompts, key, sampling, [tokenizer.eos_token_id], pad_id)
  texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
  for marker in stop:
    texts = [text.split(marker, 1)[0] for text in texts]
  return texts


def chat_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
  """Token ids of a one-turn chat in the model's own chat template, ready for the answer."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user}]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has BOS if any


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "User message(s); each is one chat.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")


def main(argv):
  del argv
  from slim_jax import checkpoints
  config, params, tokenizer = checkpoints.load(_CHECKPOINT.value)
  sampling = SamplingConfig(_MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  prompts = [chat_prompt(tokenizer, text) for text in _PROMPT.value]
  answers = generate_text(Llama(config), {"params": params}, tokenizer, prompts,
                          jax.random.key(_SEED.value), sampling)
  for prompt, answer in zip(_PROMPT.value, answers):
    print(f">>> {prompt}\n{answer.strip()}\n")


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  app.run(main)
