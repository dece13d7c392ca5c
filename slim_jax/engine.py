"""A serving engine for many prompts: continuous batching over a shared-prefix KV cache.

`slots` rows decode together in one compiled loop (`sampler.decode_step`: sampling, repetition
penalty, n-gram blocking and guided steps all on device). The loop returns to the host as soon as
a row stops (a stop token, a guided finish, its token budget); the host hands the row's tokens
to the caller, who may queue follow-up jobs (another candidate: it restarts in the same slot,
reusing its prompt's cache), and the freed slots take the next prompts at once, instead of a
batch waiting for its longest row. The prompts' common token prefix (the system prompt, an
exemplar turn) is prefilled once, and every new row starts from a copy of its KV cache; the
rows' own suffixes are prefilled in groups of a fixed size, their length padded to a `width`, so
few programs are ever compiled. Every row writes its own cache slot, so rows of any length and
age decode side by side.

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
  return sampler.start_rows(state, rows, new_mask, prefix_len + width - 1, tokens[:, -1], keys,
                            limit, pad_id, cache)


@functools.partial(jax.jit, static_argnames=("pad_id",), donate_argnames=("state",))
def _restart(state: DecodeState, rows, pos, last, keys, limit, *, pad_id: int) -> DecodeState:
  """`state` with the slots `rows` [k] generating again after the prompt their cache already
  holds, up to slot `pos` [k] where its `last` token [k] goes: a new candidate for the same
  prompt costs no prefill."""
  prompt = jnp.arange(state.mask.shape[1]) < pos[:, None]
  return sampler.start_rows(state, rows, state.mask[rows] & prompt, pos, last, keys, limit,
                            pad_id)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "stop_ids", "pad_id"),
                   donate_argnames=("state",))
def _decode(model: Llama, variables, state: DecodeState, until, *, sampling: SamplingConfig,
            stop_ids: tuple[int, ...], pad_id: int) -> DecodeState:
  """Decode steps until `until` of the live rows have stopped, or all of them."""
  stops = jnp.asarray(stop_ids, jnp.int32)
  live = ~state.done
  until = jnp.minimum(until, jnp.sum(live))
  step = lambda s: sampler.decode_step(model, variables, s, sampling, stops, pad_id)
  return jax.lax.while_loop(lambda s: jnp.sum(live & s.done) < until, step, state)


def serve(model: Llama, variables, jobs: Iterable[Job], on_done: Callable[..., Iterable[Job]], *,
          sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int, slots: int,
          prefix: Sequence[int], max_prompt_len: int) -> None:
  """Completes `jobs` and every follow-up job on_done returns, `slots` rows at a time.

  on_done(job, tokens, seconds) gets a job's tokens (up to and excluding its first stop token)
  and its share of the wall time, and returns follow-up jobs. Every prompt starts with `prefix`
  and is at most `max_prompt_len` tokens; sampling.max_new_tokens bounds every job's budget.
  New rows go in groups of an eighth of the slots, one compiled insertion per suffix `width`;
  the loop returns to the host when a group's worth of rows has stopped, or any row once no job
  waits (so that follow-ups start at once). A follow-up of the finished job's own prompt (the
  next candidate) generates again in the same slot from the prompt's cache, with no prefill.
  Under a mesh that spans processes every process runs the same jobs and gets every result.
  """
  queue = collections.deque(jobs)
  group = max(1, slots // 8)
  total = len(prefix) + width(max_prompt_len - len(prefix)) + sampling.max_new_tokens
  to_device = _to_device(jax.sharding.get_mesh())
  prefix_cache = (_prefix_cache(model, variables, to_device(np.asarray([prefix], np.int32)),
                                slots=total) if prefix else init_cache(model.config, 1, total))
  state = sampler.idle_state(model.config, slots, total, sampling, pad_id)
  running: list[Job | None] = [None] * slots
  prompt_end = np.zeros(slots, np.int32)  # the slot of each row's last prompt token
  seconds = np.zeros(slots)
  while queue or any(running):
    free = [row for row, job in enumerate(running) if job is None]
    while queue and free:
      start = time.monotonic()
      starting = [queue.popleft() for _ in range(min(group, len(free), len(queue)))]
      rows, free = free[:len(starting)], free[len(starting):]
      tokens, mask, *rest = _insertion(starting, rows, group, slots, prefix, max_prompt_len,
                                       pad_id, to_device)
      state = _insert(model, variables, state, prefix_cache, tokens, mask, *rest,
                      prefix_len=len(prefix), pad_id=pad_id)
      for row, job in zip(rows, starting):
        running[row] = job
      prompt_end[rows] = len(prefix) + tokens.shape[1] - 1
      seconds[rows] += (time.monotonic() - start) / len(starting)
    start = time.monotonic()
    state = _decode(model, variables, state, group if queue else 1, sampling=sampling,
                    stop_ids=tuple(stop_ids), pad_id=pad_id)
    done, out = parallel.to_host(state.done), parallel.to_host(state.out)
    live = [row for row, job in enumerate(running) if job is not None]
    seconds[live] += (time.monotonic() - start) / len(live)
    again = []  # (row, job): a follow-up of the same prompt, generated again in place
    for row in live:
      if done[row]:
        job, running[row] = running[row], None
        stop = np.flatnonzero(np.isin(out[row], stop_ids))
        tokens = out[row, :stop[0] if len(stop) else job.max_new_tokens].tolist()
        follow_ups = list(on_done(job, tokens, float(seconds[row])))
        seconds[row] = 0.0
        if follow_ups and list(follow_ups[0].prompt) == list(job.prompt):
          again.append((row, follow_ups.pop(0)))
          running[row] = again[-1][1]
        queue.extend(follow_ups)
    for index in range(0, len(again), group):
      chunk = again[index:index + group]
      rows, jobs_ = [row for row, _ in chunk], [job for _, job in chunk]
      state = _restart(state, *_restarts(jobs_, rows, prompt_end, group, slots, to_device),
                       pad_id=pad_id)


def width(length: int) -> int:
  """A suffix's padded length: rounded up to a quarter of its power of two (at least 16), so
  groups of similar prompts share a few compiled insertions and pad an eighth on average."""
  step = max(1, 1 << max(0, (length - 1).bit_length() - 3))
  return max(16, -(-length // step) * step)


def _padded(values: Sequence, count: int, fill) -> list:
  return list(values) + [fill] * (count - len(values))


def _rows_array(values: Sequence[int], count: int, fill: int, to_device):
  """int32 `values` padded to `count` rows with `fill`, on the device."""
  return to_device(np.asarray(_padded(values, count, fill), np.int32))


def _row_keys(jobs: Sequence[Job], count: int, to_device):
  keys = jnp.stack(_padded([job.key for job in jobs], count, jobs[-1].key))
  return jax.random.wrap_key_data(to_device(np.asarray(jax.random.key_data(keys))),
                                  impl=jax.random.key_impl(keys))


def _insertion(jobs: Sequence[Job], rows: Sequence[int], group: int, slots: int,
               prefix: Sequence[int], max_prompt_len: int, pad_id: int, to_device) -> tuple:
  """_insert's arrays for `jobs` starting in `rows`, padded to `group` rows (the padding rows
  point past the slots: dropped)."""
  suffixes = [_suffix(job.prompt, prefix, max_prompt_len) for job in jobs]
  tokens, mask = sampler.left_pad(_padded(suffixes, group, suffixes[-1]), pad_id,
                                  width(max(map(len, suffixes))))
  return (to_device(tokens), to_device(mask), _rows_array(rows, group, slots, to_device),
          _row_keys(jobs, group, to_device),
          _rows_array([job.max_new_tokens for job in jobs], group, 0, to_device))


def _restarts(jobs: Sequence[Job], rows: Sequence[int], prompt_end: np.ndarray, group: int,
              slots: int, to_device) -> tuple:
  """_restart's arrays for `jobs` generating again in `rows`, padded to `group` rows."""
  as_array = lambda values, fill: _rows_array(values, group, fill, to_device)
  return (as_array(rows, slots), as_array(prompt_end[list(rows)], 0),
          as_array([job.prompt[-1] for job in jobs], 0), _row_keys(jobs, group, to_device),
          as_array([job.max_new_tokens for job in jobs], 0))


def _to_device(mesh):
  """Host arrays to the device, replicated over `mesh` when there is one (it may span
  processes)."""
  if mesh.empty:
    return jnp.asarray
  return lambda x: parallel.global_rows(x, mesh, split=False)


def _suffix(prompt: Sequence[int], prefix: Sequence[int], max_prompt_len: int) -> list[int]:
  if len(prompt) > max_prompt_len or list(prompt[:len(prefix)]) != list(prefix):
    raise ValueError(f"a prompt of {len(prompt)} tokens is longer than {max_prompt_len} or does "
                     "not start with the shared prefix")
  return list(prompt[len(prefix):])

