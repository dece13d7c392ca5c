"""Local generation of rationales, shared by the local teacher and the student.

Apart from `rationales` (requests, cache, files) because only local models need it, and it
brings the sampler and JAX with it. Prompts go in batches of similar length, each batch filled to
the same shape; steps are guided ("Step 1:" opens the answer and each line end opens the next
step; see `sampler.SamplingConfig`); candidates are sampled, best of k: a user whose candidate is
rejected gets another, up to `candidates`, the retries with twice the token budget when the last
one ran out of tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Sequence

import jax
from absl import logging

from slim_jax import checks, parallel, progress, prompts, quality, rationales, sampler
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
  """Rows per generation call for `requests` prompts: `batch_size` (rounded up to a multiple of
  the mesh's batch devices, which split each batch), or for fewer prompts (a retry round) the
  smallest power of two times those devices that holds them, so a handful of retries does not
  pay for a whole batch and few shapes are ever compiled."""
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
  last: str | None = None  # the last candidate's rejection
  recorded: bool = False


def generate_local(requests: Sequence[Request], decoding: Decoding, pcfg: PromptConfig, model,
                   variables, tokenizer, label: str, writer: rationales.CacheWriter,
                   keep_rejected: bool = False) -> tuple[int, float]:
  """Writes a record per request: its first accepted candidate, or a failure after
  `decoding.candidates` rejected ones (with `keep_rejected`, the last of them instead, marked).
  Returns (generated tokens, seconds).

  Each round draws one candidate for every request still pending, in batches of similar prompt
  length; a short batch is filled with repeats of its last prompt so that every call has the
  same shape (no recompilation), and the repeats are dropped. Greedy decoding draws one
  candidate only: another would be the same.
  """
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  first = sampling_config(decoding, tokenizer, pcfg)
  open_ = sorted((_Pending(r, rationales.chat_ids(tokenizer, r.messages, r.prefill))
                  for r in requests), key=lambda p: len(p.prompt_ids))
  rounds = decoding.candidates if decoding.temperature > 0 else 1
  start, produced, written = time.monotonic(), 0, 0
  for round_ in range(rounds):
    longer = dataclasses.replace(first, max_new_tokens=2 * first.max_new_tokens)
    for group, sampling in (([p for p in open_ if p.last == "truncated"], longer),
                            ([p for p in open_ if p.last != "truncated"], first)):
      if not group:
        continue
      rows = batch_rows(len(group), decoding.batch_size)
      with progress.bar(len(group), f"{label}: round {round_ + 1} of {rounds}",
                        "request") as bar:
        for index in range(0, len(group), rows):
          batch = group[index:index + rows]
          filled = [p.prompt_ids for p in batch]
          filled += [filled[-1]] * (rows - len(batch))
          key = jax.random.fold_in(jax.random.fold_in(jax.random.key(decoding.seed), round_),
                                   written + index)
          batch_start = time.monotonic()
          outputs = sampler.generate_ids(model, variables, filled, key, sampling,
                                         [tokenizer.eos_token_id], pad_id)
          seconds = (time.monotonic() - batch_start) / len(batch)
          for pending_, ids in zip(batch, outputs):
            text = pending_.request.prefill + tokenizer.decode(ids, skip_special_tokens=True)
            truncated = len(ids) >= sampling.max_new_tokens
            reason = quality.rejection(text, truncated, pending_.request.history_attributes, pcfg)
            pending_.drawn += 1
            pending_.completion_tokens += len(ids)
            pending_.seconds += seconds
            produced += len(ids)
            if reason:
              pending_.rejections[reason] += 1
              pending_.last = reason
            if not reason or pending_.drawn == rounds:
              writer.append(_local_record(pending_, label, text.strip(), reason, keep_rejected))
              pending_.recorded = True
          bar.update(len(batch))
      written += len(group)
    open_ = [p for p in open_ if not p.recorded]
    logging.info("%s: round %d of %d, %d requests still without an accepted rationale, "
                 "%.1f generated tokens/s", label, round_ + 1, rounds, len(open_),
                 produced / max(time.monotonic() - start, 1e-9))
    if not open_:
      break
  return produced, time.monotonic() - start


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
