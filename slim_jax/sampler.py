"""Batched sampling from the LLaMA student with a preallocated KV cache.

Prompts are left-padded to a bucket (a power of two or three quarters of one), so one compiled
program (prefill, then a lax.while_loop of single-token decode steps) serves every prompt length
in the bucket. The loop stops when every row has emitted a stop token or max_new_tokens is
reached. Works with LoRA (pass {"params", "lora"}, or merged params) and on a sharded mesh (under
jax.set_mesh).

  python -m slim_jax.sampler --checkpoint=<HF directory or .gguf> \
      --prompt="Suggest three sci-fi movies for someone who loved Alien."
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax import checkpoints, parallel
from slim_jax.models.llama import Llama, init_cache, set_cache_rows


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = no top-k filter
  top_p: float = 1.0  # 1 = no nucleus filter
  # > 1 makes tokens this row already generated less likely (CTRL's penalty: positive logits
  # divided, negative multiplied). Prompt tokens are exempt: a rationale should name its history.
  repetition_penalty: float = 1.0
  # > 0 forbids a token that would repeat an n-gram this row already generated (the loops small
  # models fall into) while letting single tokens such as "Step" recur.
  no_repeat_ngram: int = 0
  # Guided steps: token ids of the markers that open steps 2..N ("Step 2:", ...). A row's first
  # line end (a token of `line_ends`) in step k < N is followed by step k+1's marker, forced;
  # a line end in step N stops the row (pad_id follows, so pad_id should be a stop id, as EOS
  # is). A small model then writes every step in order, each on one line, and stops after the
  # last, instead of numbering its own steps and rambling on.
  step_markers: tuple[tuple[int, ...], ...] = ()
  line_ends: tuple[int, ...] = ()


def banned_by_ngrams(out, step, n: int):
  """bool [B, T]: which of out's [B, T] positions hold a token that would, emitted at each row's
  `step` [B], repeat an n-gram of the row's first `step` tokens (their (n-1)-token prefix ends
  the row)."""
  batch, length = out.shape
  context = jax.vmap(lambda row, at: jax.lax.dynamic_slice_in_dim(row, at - (n - 1), n - 1))(
      out, step)
  starts = jnp.arange(length)
  window = jnp.stack([jnp.roll(out, -k, axis=1) for k in range(n - 1)], axis=-1)  # [B, T, n-1]
  matches = jnp.all(window == context[:, None, :], axis=-1) & (starts + n - 1 < step[:, None])
  matches &= (step >= n - 1)[:, None]
  return jnp.roll(matches, n - 1, axis=1)  # the position after each matching window


def forbid_ngram_repeats(logits, out, step, n: int):
  """fp32 logits [B, V] with every token that would complete a repeated n-gram at -inf."""
  if n <= 0:
    return logits
  banned = banned_by_ngrams(out, step, n)
  rows = jnp.broadcast_to(jnp.arange(out.shape[0])[:, None], out.shape)
  hits = jnp.zeros(logits.shape, bool).at[rows, out].max(banned)
  return jnp.where(hits, -jnp.inf, logits)


def penalize_repeats(logits, generated, penalty: float):
  """fp32 logits [B, V] with the tokens marked in `generated` [B, V] made less likely."""
  if penalty == 1.0:
    return logits
  return jnp.where(generated, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


# Nucleus sampling looks for its head among this many most likely tokens: sorting the whole
# vocabulary costs XLA's CPU backend more than a decode step of a small model, and top-k is cheap
# (docs/benchmarks.md, 2026-12-02). A nucleus wider than this is cut to it (no ordinary top_p
# reaches that far).
NUCLEUS_CANDIDATES = 256


def sample(logits, key, sampling: SamplingConfig):
  """Next tokens [B] from fp32 logits [B, V]: greedy, or temperature with top-k / top-p."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if not sampling.top_k and sampling.top_p >= 1:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  values, indices = jax.lax.top_k(
      logits, min(sampling.top_k or NUCLEUS_CANDIDATES, logits.shape[-1]))
  if sampling.top_p < 1:
    probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p
    before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(before < sampling.top_p, values, -jnp.inf)
  choice = jax.random.categorical(key, values, axis=-1)
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class DecodeState(NamedTuple):
  """The decode loop's carry, one row per prompt (per slot of the serving engine, `engine`).

  Each row feeds `last` [B], its newest token, at cache slot `pos` [B]; `out` [B, T] holds the
  `step` [B] tokens it has emitted, pad_id after them; it stops at a stop token, a guided
  finish or its token budget `limit` [B]. `done` [B] marks rows that have stopped (or hold no
  prompt). Row r samples its step s with fold_in(keys[r], s), so its tokens depend on its prompt
  and key alone, never on the rows beside it. `generated` [B, V] ([B, 0] without a repetition
  penalty) marks the tokens a row has emitted; with guided steps, `marker` [B] is the step
  marker a row is writing (-1: none), `forced` [B] how many of its tokens are out and `steps`
  [B] how many steps it has opened after the first.
  """
  cache: tuple
  mask: jax.Array
  pos: jax.Array
  last: jax.Array
  out: jax.Array
  step: jax.Array
  limit: jax.Array
  done: jax.Array
  keys: jax.Array
  generated: jax.Array
  marker: jax.Array
  forced: jax.Array
  steps: jax.Array


def _markers(sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """(marker ids [M, L] padded with 0, lengths [M]) of the guided steps."""
  width = max(map(len, sampling.step_markers))
  ids = [list(m) + [0] * (width - len(m)) for m in sampling.step_markers]
  return jnp.asarray(ids, jnp.int32), jnp.asarray([len(m) for m in sampling.step_markers])


def _guide(state: DecodeState, sampled, sampling: SamplingConfig):
  """(token, state, finished [B]): the sampled tokens, except rows writing a step marker, which
  emit its next token; a line end opens the next step's marker or finishes the last step."""
  if not sampling.step_markers:
    return sampled, state, jnp.zeros_like(state.done)
  ids, lengths = _markers(sampling)
  forcing = state.marker >= 0
  marker = jnp.maximum(state.marker, 0)
  token = jnp.where(forcing, ids[marker, state.forced], sampled)
  forced = jnp.where(forcing, state.forced + 1, 0)
  line_end = ~forcing & jnp.isin(token, jnp.asarray(sampling.line_ends, jnp.int32))
  opens = line_end & (state.steps < len(sampling.step_markers))
  marker = jnp.where(opens, state.steps,
                     jnp.where(forcing & (forced < lengths[marker]), state.marker, -1))
  state = state._replace(marker=marker, forced=jnp.where(marker >= 0, forced, 0),
                         steps=state.steps + opens)
  return token, state, line_end & ~opens


def _emit(state: DecodeState, logits, sampling: SamplingConfig, stops, pad_id: int):
  """Every live row's next token from its logits [B, 1, V]: recorded in out, fed next."""
  live = ~state.done
  logits = penalize_repeats(logits[:, -1].astype(jnp.float32), state.generated,
                            sampling.repetition_penalty)
  logits = forbid_ngram_repeats(logits, state.out, state.step, sampling.no_repeat_ngram)
  keys = jax.vmap(jax.random.fold_in)(state.keys, state.step)
  sampled = jax.vmap(lambda row, key: sample(row[None], key, sampling)[0])(logits, keys)
  token, state, finished = _guide(state, sampled, sampling)
  token = jnp.where(live, token, pad_id)
  writes = live[:, None] & (jnp.arange(state.out.shape[1]) == state.step[:, None])
  generated = state.generated
  if sampling.repetition_penalty != 1.0:
    rows = jnp.arange(len(token))
    generated = generated.at[rows, token].set(generated[rows, token] | live)
  step = state.step + live
  done = state.done | (live & (jnp.isin(token, stops) | finished | (step >= state.limit)))
  return state._replace(pos=state.pos + live, last=token, step=step, done=done,
                        out=jnp.where(writes, token[:, None], state.out), generated=generated)


def decode_step(model: Llama, variables, state: DecodeState, sampling: SamplingConfig, stops,
                pad_id: int) -> DecodeState:
  """Feeds every row's last token at its own slot and emits the next: the one decode step of
  the batched sampler and of the serving engine. Stopped rows go through it unchanged."""
  rows = jnp.arange(len(state.pos))
  mask = state.mask.at[rows, state.pos].set(True)
  logits, cache = model.apply(variables, state.last[:, None], mask, state.cache, state.pos,
                              last_only=True)
  return _emit(state._replace(cache=cache, mask=mask), logits, sampling, stops, pad_id)


def idle_state(config, rows: int, slots: int, sampling: SamplingConfig,
               pad_id: int) -> DecodeState:
  """`rows` stopped rows over an empty cache of `slots` slots, room for max_new_tokens each."""
  vocab = config.vocab_size if sampling.repetition_penalty != 1.0 else 0
  zeros = lambda: jnp.zeros(rows, jnp.int32)  # a buffer each: the engine donates the state
  return DecodeState(
      init_cache(config, rows, slots), jnp.zeros((rows, slots), bool), zeros(), zeros(),
      jnp.full((rows, sampling.max_new_tokens), pad_id, jnp.int32), zeros(), zeros(),
      jnp.ones(rows, bool), jax.random.split(jax.random.key(0), rows),
      jnp.zeros((rows, vocab), bool), jnp.full(rows, -1, jnp.int32), zeros(), zeros())


def start_rows(state: DecodeState, rows, mask, pos, last, keys, limit, pad_id: int,
               cache=None) -> DecodeState:
  """`state` with its rows `rows` [k] (out-of-range ones dropped) starting to generate afresh:
  `mask` [k, S] marks the prompt in their cache (`cache`'s k rows when given, else what they
  hold) but for its `last` token [k], fed next at slot `pos`; each row samples with its `keys`
  [k] and stops after `limit` tokens at most."""
  put = lambda full, new: full.at[rows].set(new, mode="drop")
  return state._replace(
      cache=state.cache if cache is None else set_cache_rows(state.cache, rows, cache),
      mask=put(state.mask, mask), pos=put(state.pos, pos), last=put(state.last, last),
      out=put(state.out, pad_id), step=put(state.step, 0), limit=put(state.limit, limit),
      done=put(state.done, False), keys=put(state.keys, keys),
      generated=put(state.generated, False), marker=put(state.marker, -1),
      forced=put(state.forced, 0), steps=put(state.steps, 0))


def row_keys(key, rows: int):
  """Row r's key, fold_in(key, r): the r-th prompt samples alike in any batch or engine slot."""
  return jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(rows))


@functools.partial(jax.jit, static_argnames=("model", "sampling", "stop_ids", "pad_id"))
def generate_tokens(model: Llama, variables, tokens, mask, key, *, sampling: SamplingConfig,
                    stop_ids: tuple[int, ...], pad_id: int):
  """New tokens [B, max_new_tokens] after left-padded prompts `tokens`/`mask` [B, P], in one
  compiled program: the prompts but their last tokens prefilled, then decode steps until every
  row has stopped. Each row ends with its first stop token, followed by pad_id.
  """
  batch, length = tokens.shape
  state = idle_state(model.config, batch, length + sampling.max_new_tokens, sampling, pad_id)
  mask = jnp.zeros_like(state.mask).at[:, :length - 1].set(mask[:, :-1].astype(bool))
  _, cache = model.apply(variables, tokens[:, :-1], mask, state.cache, 0, last_only=True)
  state = start_rows(state, jnp.arange(batch), mask, length - 1, tokens[:, -1],
                     row_keys(key, batch), sampling.max_new_tokens, pad_id, cache)
  stops = jnp.asarray(stop_ids, jnp.int32)
  step = lambda s: decode_step(model, variables, s, sampling, stops, pad_id)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state).out


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
                 sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int
                 ) -> list[list[int]]:
  """Generated ids per prompt, up to and excluding the first stop token. Under a mesh that spans
  processes, every process passes the same prompts and gets every row back."""
  tokens, mask = left_pad(prompts, pad_id)
  mesh = jax.sharding.get_mesh()
  if not mesh.empty:  # global inputs: the mesh may span processes
    tokens, mask = parallel.global_rows(tokens, mesh), parallel.global_rows(mask, mesh)
    key = jax.random.wrap_key_data(parallel.global_rows(
        np.asarray(jax.random.key_data(key)), mesh, split=False), impl=jax.random.key_impl(key))
  out = parallel.to_host(generate_tokens(model, variables, tokens, mask, key, sampling=sampling,
                                         stop_ids=tuple(stop_ids), pad_id=pad_id))
  results = []
  for row in out:
    stop = np.flatnonzero(np.isin(row, stop_ids))
    results.append(row[:stop[0] if len(stop) else len(row)].tolist())
  return results


def generate_text(model: Llama, variables, tokenizer, prompts: Sequence[Sequence[int]], key,
                  sampling: SamplingConfig = SamplingConfig()) -> list[str]:
  """Decoded completions of token-id prompts, cut at EOS."""
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  ids = generate_ids(model, variables, prompts, key, sampling, [tokenizer.eos_token_id], pad_id)
  return tokenizer.batch_decode(ids, skip_special_tokens=True)


def chat_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
  """Token ids of a one-turn chat in the model's own chat template, ready for the answer."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user}]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has BOS if any


def define_flags() -> None:
  """The command line's flags: defined when this module runs as a program, never on import, so
  that programs importing the sampler keep their own flags."""
  flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file.", required=True)
  flags.DEFINE_multi_string("prompt", [], "User message(s); each is one chat.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")


def main(argv):
  del argv
  args = flags.FLAGS
  config, params, tokenizer = checkpoints.load(args.checkpoint)
  sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  prompts = [chat_prompt(tokenizer, text) for text in args.prompt]
  answers = generate_text(Llama(config), {"params": params}, tokenizer, prompts,
                          jax.random.key(args.seed), sampling)
  for prompt, answer in zip(args.prompt, answers):
    print(f">>> {prompt}\n{answer.strip()}\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
