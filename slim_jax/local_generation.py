"""Local generation of rationales, shared by the local teacher and the student.

Apart from `rationales` (requests, cache, files) because only local models need it, and it
brings JAX with it. Every request goes through the serving engine (`engine`: continuous
batching, the prompts' shared prefix prefilled once); steps are guided ("Step 1:" opens the
answer and each line end opens the next step; see `sampler.SamplingConfig`); candidates are
sampled, best of k: a user whose candidate is rejected gets another at once, up to
`candidates`, with twice the token budget when the last one ran out of tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Sequence

import jax
from absl import logging

from slim_jax import checks, engine, parallel, progress, prompts, quality, rationales, sampler
from slim_jax.prompts import PromptConfig
from slim_jax.rationales import Request


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How a local model writes rationales (read from the teacher's or the student's config)."""
  max_tokens: int  # per candidate; retries after a truncation get twice as many
  temperature: float
  top_p: float
  repetition_penalty: float
  no_repeat_ngram: int
  candidates: int  # best of k: candidates drawn per request at most
  batch_size: int  # rows per generation call
  seed: int

  @classmethod
  def of(cls, cfg) -> Decoding:
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def check_decoding(cfg, section: str) -> None:
  """The Decoding fields of a teacher or student config `section`."""
  checks.within(cfg, section, "[1, inf)", "max_tokens", "candidates", "batch_size")
  checks.within(cfg, section, "[0, inf)", "temperature", "no_repeat_ngram")
  checks.within(cfg, section, "(0, 1]", "top_p")
  checks.within(cfg, section, "(0, inf)", "repetition_penalty")


def sampling_config(decoding: Decoding, tokenizer, pcfg: PromptConfig):
  """The decoding of `decoding` with the prompt's guided steps in this tokenizer's ids."""
  markers = tuple(tuple(tokenizer(marker, add_special_tokens=False)["input_ids"])
                  for marker in prompts.step_markers(pcfg)[1:])
  return sampler.SamplingConfig(
      max_new_tokens=decoding.max_tokens, temperature=decoding.temperature, top_p=decoding.top_p,
      repetition_penalty=decoding.repetition_penalty, no_repeat_ngram=decoding.no_repeat_ngram,
      step_markers=markers, line_ends=line_end_ids(tokenizer) if markers else ())


def line_end_ids(tokenizer) -> tuple[int, ...]:
  """Every token whose text holds a line break: any of them ends a guided step."""
  return tuple(i for i in range(len(tokenizer))
               if "\n" in tokenizer.decode([i], skip_special_tokens=False))


def batch_rows(requests: int, batch_size: int) -> int:
  """Engine slots for `requests` prompts: `batch_size` (rounded up to a multiple of the mesh's
  batch devices, which split the rows), or for fewer prompts the smallest power of two times
  those devices that holds them."""
  mesh = jax.sharding.get_abstract_mesh()
  multiple = 1 if mesh.empty else parallel.batch_size_multiple(mesh)
  return min(-(-batch_size // multiple) * multiple,
             multiple * 1 << max(0, math.ceil(requests / multiple) - 1).bit_length())


@dataclasses.dataclass
class _Pending:
  """A request still without an accepted candidate."""
  request: Request
  prompt_ids: list[int]
  drawn: int = 0
  completion_tokens: int = 0
  seconds: float = 0.0
  rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def generate_local(requests: Sequence[Request], decoding: Decoding, pcfg: PromptConfig, model,
                   variables, tokenizer, label: str, writer: rationales.CacheWriter,
                   keep_rejected: bool = False) -> tuple[int, float]:
  """Writes a record per request: its first accepted candidate, or a failure after
  `decoding.candidates` rejected ones (with `keep_rejected`, the last of them instead, marked).
  Returns (generated tokens, seconds).

  The requests go through the serving engine (`engine.serve`), shortest prompts first, so that
  neighbouring insertions share a length bucket; a rejected candidate's request goes back in the
  queue at once, its next candidate with twice the token budget when this one ran out of tokens.
  Candidate c of request i samples with fold_in(fold_in(key(seed), c), i). Greedy decoding
  draws one candidate only: another would be the same.
  """
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  sampling = sampling_config(decoding, tokenizer, pcfg)
  candidates = decoding.candidates if decoding.temperature > 0 else 1
  if candidates > 1:  # room for a retry's longer budget
    sampling = dataclasses.replace(sampling, max_new_tokens=2 * decoding.max_tokens)
  todo = sorted((_Pending(r, rationales.chat_ids(tokenizer, r.messages, r.prefill))
                 for r in requests), key=lambda p: len(p.prompt_ids))
  if not todo:
    return 0, 0.0
  seed = jax.random.key(decoding.seed)
  job = lambda index, pending_, budget: engine.Job(
      pending_.prompt_ids, jax.random.fold_in(jax.random.fold_in(seed, pending_.drawn), index),
      budget, (index, pending_))
  start, produced = time.monotonic(), 0
  with progress.bar(len(todo), f"{label}: {candidates} candidate(s) at most", "request") as bar:

    def on_done(job_: engine.Job, ids: list[int], seconds: float) -> list[engine.Job]:
      nonlocal produced
      index, pending_ = job_.tag
      text = pending_.request.prefill + tokenizer.decode(ids, skip_special_tokens=True)
      truncated = len(ids) >= job_.max_new_tokens
      reason = quality.rejection(text, truncated, pending_.request.history_attributes, pcfg)
      pending_.drawn += 1
      pending_.completion_tokens += len(ids)
      pending_.seconds += seconds
      produced += len(ids)
      if reason:
        pending_.rejections[reason] += 1
        if pending_.drawn < candidates:
          budget = decoding.max_tokens * (2 if reason == "truncated" else 1)
          return [job(index, pending_, budget)]
      writer.append(_local_record(pending_, label, text.strip(), reason, keep_rejected))
      bar.update(1)
      return []

    prompts_ = [p.prompt_ids for p in todo]
    engine.serve(model, variables, [job(i, p, decoding.max_tokens) for i, p in enumerate(todo)],
                 on_done, sampling=sampling, stop_ids=(tokenizer.eos_token_id,), pad_id=pad_id,
                 slots=batch_rows(len(todo), decoding.batch_size),
                 prefix=engine.common_prefix(prompts_), max_prompt_len=max(map(len, prompts_)))
  seconds = time.monotonic() - start
  logging.info("%s: %d requests, %d candidates, %.1f generated tokens/s", label, len(todo),
               sum(p.drawn for p in todo), produced / max(seconds, 1e-9))
  return produced, seconds


def _local_record(pending_: _Pending, label: str, text: str, reason: str | None,
                  keep_rejected: bool) -> dict:
  """A request's record once it has an accepted candidate or none is left to draw."""
  kept = bool(reason) and keep_rejected
  return rationales.record(
      pending_.request, label, text=text,
      error=f"rejected: {reason}" if reason and not kept else None,
      finish_reason="length" if reason == "truncated" else "stop", attempts=pending_.drawn,
      prompt_tokens=len(pending_.prompt_ids), completion_tokens=pending_.completion_tokens,
      estimated_tokens=False, cost_usd=0.0, seconds=pending_.seconds,
      rejections=pending_.rejections, kept_rejected=kept)
