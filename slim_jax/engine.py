"""A serving engine for many prompts: continuous batching over a shared-prefix KV cache.

`slots` rows decode together in one compiled loop (`sampler.decode_step`: sampling, repetition
penalty, n-gram blocking and guided steps all on device). The loop returns to the host as soon as
a row stops (a stop token, a guided finish, its token budget); the host hands the row's tokens
to the caller, who may queue follow-up jobs (another candidate), and the freed slots take the
next prompts at once, instead of a batch waiting for its longest row. The prompts' common token
prefix (the system prompt, an exemplar turn) is prefilled once, and every new row starts from a
copy of its KV cache; a row's own suffix is prefilled in a batch of a power-of-two size, its
length padded to a `sampler.bucket`, so few programs are ever compiled. Every row writes its own
cache slot, so rows of any length and age decode side by side.

A job's tokens depend only on its prompt, its key and its budget, never on the jobs beside it:
with the same per-row keys they are those `sampler.generate_ids` writes for a batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slim_jax import parallel, sampler
from slim_jax.models.llama import Llama, init_cache, tile_cache
from slim_jax.sampler import DecodeState, SamplingConfig


@dataclasses.dataclass(frozen=True)
class Job:
  """A prompt (token ids) to complete with up to `max_new_tokens`, sampling with `key`; `tag`
  is the caller's, handed back with the tokens."""
  prompt: Sequence[int]
  key: jax.Array
  max_new_tokens: int
  tag: object = None


def common_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
  """The longest token prefix every prompt shares, less one token of the shortest: every prompt
  keeps a suffix of its own, whose last token the decode loop feeds."""
  shortest = min(map(len, prompts))
  first = np.asarray(prompts[0][:shortest - 1])
  length = len(first)
  for prompt in prompts[1:]:
    differs = np.flatnonzero(np.asarray(prompt[:length]) != first[:length])
    length = int(differs[0]) if len(differs) else length
  return first[:length].tolist()


@functools.partial(jax.jit, static_argnames=("model", "slots"))
def _prefix_cache(model: Llama, variables, prefix, *, slots: int):
  """A one-row cache of `slots` slots holding `prefix` [1, P] at its first P."""
  cache = init_cache(model.config, 1, slots)
  mask = jnp.zeros((1, slots), bool).at[:, :prefix.shape[1]].set(True)
  return model.apply(variables, prefix, mask, cache, 0, last_only=True)[1]


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "pad_id"),
                   donate_argnames=("state",))
def _insert(model: Llama, variables, state: DecodeState, prefix_cache, tokens, mask, rows, keys,
            limit, *, prefix_len: int, pad_id: int) -> DecodeState:
  """`state` with the slots `rows` [k] starting the prompts `tokens`/`mask` [k, W] (suffixes,
  left-padded, after the shared prefix): all but their last tokens prefilled after a copy of
  the prefix's cache."""
  count, width = tokens.shape
  slots = state.mask.shape[1]
  new_mask = (jnp.zeros((count, slots), bool).at[:, :prefix_len].set(True)
              .at[:, prefix_len:prefix_len + width - 1].set(mask[:, :-1]))
  cache = tile_cache(prefix_cache, count)
  _, cache = model.apply(variables, tokens[:, :-1], new_mask, cache, prefix_len, last_only=True)
  return sampler.start_rows(state, rows, cache, new_mask, prefix_len + width - 1, tokens[:, -1],
                            keys, limit, pad_id)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "stop_ids", "pad_id"),
                   donate_argnames=("state",))
def _decode(model: Llama, variables, state: DecodeState, *, sampling: SamplingConfig,
            stop_ids: tuple[int, ...], pad_id: int) -> DecodeState:
  """Decode steps until a live row stops or none is live."""
  stops = jnp.asarray(stop_ids, jnp.int32)
  live = ~state.done
  step = lambda s: sampler.decode_step(model, variables, s, sampling, stops, pad_id)
  running = lambda s: jnp.any(live) & ~jnp.any(live & s.done)
  return jax.lax.while_loop(running, step, state)


def _insert_size(free: int, waiting: int, slots: int) -> int:
  """Rows per insertion: a power of two (or all slots) that holds the jobs that can start."""
  count = min(free, waiting)
  return min(slots, 1 << max(0, count - 1).bit_length())


def serve(model: Llama, variables, jobs: Iterable[Job], on_done: Callable[..., Iterable[Job]], *,
          sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int, slots: int,
          prefix: Sequence[int], max_prompt_len: int) -> None:
  """Completes `jobs` and every follow-up job on_done returns, `slots` rows at a time.

  on_done(job, tokens, seconds) gets a job's tokens (up to and excluding its first stop token)
  and its share of the wall time, and returns follow-up jobs. Every prompt starts with `prefix`
  and is at most `max_prompt_len` tokens; sampling.max_new_tokens bounds every job's budget.
  Under a mesh that spans processes every process runs the same jobs and gets every result.
  """
  queue = collections.deque(jobs)
  width = sampler.bucket(max_prompt_len - len(prefix))
  total = len(prefix) + width + sampling.max_new_tokens
  mesh = jax.sharding.get_mesh()
  to_device = ((lambda x, split=True: parallel.global_rows(np.asarray(x), mesh, split))
               if not mesh.empty else lambda x, split=True: jnp.asarray(x))
  prefix_cache = (_prefix_cache(model, variables, to_device(np.asarray([prefix], np.int32),
                                                            False), slots=total)
                  if prefix else init_cache(model.config, 1, total))
  state = sampler.idle_state(model.config, slots, total, sampling, pad_id)
  running: list[Job | None] = [None] * slots
  seconds = np.zeros(slots)
  stop_ids = tuple(stop_ids)
  while queue or any(running):
    free = [row for row, job in enumerate(running) if job is None]
    if queue and free:
      start = time.monotonic()
      count = _insert_size(len(free), len(queue), slots)
      starting = [queue.popleft() for _ in range(min(count, len(free), len(queue)))]
      rows = free[:len(starting)] + [slots] * (count - len(starting))  # slots: dropped
      suffixes = [_suffix(job.prompt, prefix, max_prompt_len) for job in starting]
      tokens, mask = sampler.left_pad(suffixes + [suffixes[-1]] * (count - len(starting)),
                                      pad_id, sampler.bucket(max(map(len, suffixes))))
      keys = jnp.stack([job.key for job in starting] + [starting[-1].key] *
                       (count - len(starting)))
      limits = [job.max_new_tokens for job in starting] + [0] * (count - len(starting))
      state = _insert(model, variables, state, prefix_cache, to_device(tokens, False),
                      to_device(mask, False), to_device(np.asarray(rows, np.int32), False),
                      _device_keys(keys, to_device), to_device(np.asarray(limits, np.int32),
                                                               False),
                      prefix_len=len(prefix), pad_id=pad_id)
      for row, job in zip(rows, starting):
        running[row] = job
      seconds[rows[:len(starting)]] += (time.monotonic() - start) / len(starting)
    start = time.monotonic()
    state = _decode(model, variables, state, sampling=sampling, stop_ids=stop_ids, pad_id=pad_id)
    done, out = parallel.to_host(state.done), parallel.to_host(state.out)
    live = [row for row, job in enumerate(running) if job is not None]
    seconds[live] += (time.monotonic() - start) / len(live)
    for row in live:
      if done[row]:
        job, running[row] = running[row], None
        stop = np.flatnonzero(np.isin(out[row], stop_ids))
        tokens = out[row, :stop[0] if len(stop) else job.max_new_tokens].tolist()
        queue.extend(on_done(job, tokens, float(seconds[row])))
        seconds[row] = 0.0


def _suffix(prompt: Sequence[int], prefix: Sequence[int], max_prompt_len: int) -> list[int]:
  if len(prompt) > max_prompt_len or list(prompt[:len(prefix)]) != list(prefix):
    raise ValueError(f"a prompt of {len(prompt)} tokens is longer than {max_prompt_len} or does "
                     "not start with the shared prefix")
  return list(prompt[len(prefix):])


def _device_keys(keys, to_device):
  data = to_device(np.asarray(jax.random.key_data(keys)), False)
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))
