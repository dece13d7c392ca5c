"""Rationales: the requests, their cache, their files, and the one local generation path.

A rationale is written for a `Request` (a user's visible history as chat messages) by a teacher
(an OpenAI-compatible API or a local LLaMA) or by the student; all of them append one JSON record
per request to `cache.jsonl`, keyed by (user id, prompt hash, model), with flush + fsync per
record: a killed run loses at most the record being written, and a rerun generates only what has
no record. A rationale that fails the quality filter (`quality.rejection`) is never kept: its
request is recorded with status "failed" and the reason, and failures are retried on a later run
only when `retry_failures` is set. Finally `rationales.jsonl` gets one line per request whose
rationale was accepted.

Local models (the local teacher and the student) share `generate_local`: prompts in batches of
similar length, each batch filled to the same shape, guided steps ("Step 1:" opens the answer and
each line end opens the next step; see `generate.SamplingConfig`), sampled candidates, and best of
k: a user whose candidate is rejected gets another, up to `candidates`, the retries with twice
the token budget when the last one ran out of tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
from absl import logging

from slim_jax import checks, generate, multihost, parallel, progress, prompts, quality
from slim_jax.prompts import PromptConfig

RATIONALE_FIELDS = ("user", "user_id", "split", "prompt_hash", "model", "history_len", "text")


@dataclasses.dataclass(frozen=True)
class Request:
  """One rationale to write: a user's visible history as chat messages."""
  user: int  # contiguous user index in Prepared
  user_id: str  # raw user id: the cache key survives re-preparing the data
  split: str  # whose visible history (see prompts.HISTORIES)
  messages: tuple[Mapping[str, str], ...]
  history_len: int  # items kept after truncation to the token budget
  prompt_tokens: int  # as the writer's tokenizer counts them
  prefill: str = ""  # local models: the answer's opening, part of the prompt (and of the key)
  history_attributes: tuple[str, ...] = ()  # categories / brands of the kept history items

  @property
  def prompt_hash(self) -> str:
    return prompt_hash(self.messages, self.prefill)


def prompt_hash(messages: Iterable[Mapping[str, str]], prefill: str = "") -> str:
  canonical = json.dumps(list(messages) + ([{"prefill": prefill}] if prefill else []),
                         sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cache_key(record: Mapping) -> tuple[str, str, str]:
  return record["user_id"], record["prompt_hash"], record["model"]


def request_key(request: Request, model: str) -> tuple[str, str, str]:
  return request.user_id, request.prompt_hash, model


def build_requests(prepared, pcfg: PromptConfig, count_tokens: Callable[[list[dict]], int],
                   max_users: int = 0, local: bool = False) -> list[Request]:
  """A request per rationale the prompt config asks for, truncated with `count_tokens`; a local
  model's requests carry the guided answer's opening."""
  prefill = prompts.prefill(pcfg) if local else ""
  requests = []
  for user, split, items in prompts.visible_histories(prepared, pcfg.history):
    if max_users and user >= max_users:
      continue
    messages, kept = prompts.teacher_prompt(
        [prepared.item_text[i] for i in items], pcfg, count_tokens)
    attributes = quality.attributes_of(prepared, items[len(items) - kept:])
    requests.append(Request(user, str(prepared.user_ids[user]), split, tuple(messages), kept,
                            count_tokens(messages), prefill, attributes))
  return requests


def chat_ids(tokenizer, messages: Sequence[Mapping[str, str]], prefill: str = "") -> list[int]:
  """Token ids of `messages` in the model's chat template, ready for the answer, which opens
  with `prefill`."""
  text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  return tokenizer(text + prefill, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# The cache: an append-only JSONL log.


def read_cache(path: pathlib.Path) -> list[dict]:
  """Records in file order. A last line without its newline is a write cut short by a kill: it
  is ignored and cut from the file, so the next append starts on a fresh line."""
  if not path.exists():
    return []
  data = path.read_bytes()
  *lines, torn = data.split(b"\n")
  records = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
  if torn and multihost.is_writer():
    logging.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run",
                    path, len(torn))
    with open(path, "r+b") as f:
      f.truncate(len(data) - len(torn))
  return records


class CacheWriter:
  """Appends records durably; holds an exclusive lock so two runs never interleave. On every
  process but process 0, which writes for all of them (they generate the same records), it
  appends nothing."""

  def __init__(self, path: pathlib.Path):
    self._file = None
    if not multihost.is_writer():
      return
    self._file = open(path, "a", encoding="utf-8")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.close()
      raise RuntimeError(f"{path} is being written by another run") from None

  def append(self, record: Mapping) -> None:
    if self._file is None:
      return
    self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def pending(requests: Sequence[Request], records: Iterable[Mapping], model: str,
            retry_failures: bool) -> list[Request]:
  """Requests with no record yet (and, if asked, those whose latest record is a failure)."""
  latest = {cache_key(r): r["status"] for r in records}
  todo = []
  for request in requests:
    status = latest.get(request_key(request, model))
    if status is None or (retry_failures and status != "ok"):
      todo.append(request)
  return todo


def record(request: Request, model: str, *, text: str, error: str | None,
           finish_reason: str | None, attempts: int, prompt_tokens: int,
           completion_tokens: int, estimated_tokens: bool, cost_usd: float, seconds: float,
           rejections: Mapping[str, int] | None = None, kept_rejected: bool = False) -> dict:
  """The cache record of one request; `rejections` counts its candidates rejected, by reason.
  A failure keeps its last answer as `rejected_text` (what the filter saw), never as `text`."""
  return {"user": request.user, "user_id": request.user_id, "split": request.split,
          "prompt_hash": request.prompt_hash, "model": model,
          "status": "failed" if error else "ok", "text": "" if error else text, "error": error,
          "rejected_text": text if error else "", "kept_rejected": kept_rejected,
          "finish_reason": finish_reason, "attempts": attempts, "history_len": request.history_len,
          "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "estimated_tokens": estimated_tokens, "cost_usd": cost_usd,
          "seconds": round(seconds, 3), "rejections": dict(rejections or {})}


def summarize(requests: Sequence[Request], records: Sequence[Mapping], model: str) -> dict:
  """Outcomes of the current requests (latest record per key) and the spend of every record of
  this model in the cache, each counted once: failed attempts were paid for too."""
  mine = [r for r in records if r["model"] == model]
  latest = {cache_key(r): r for r in mine}
  final = [latest.get(request_key(q, model)) for q in requests]
  texts = [r["text"] for r in final if r and r["status"] == "ok"]
  rejections = collections.Counter()
  for r in final:
    rejections.update(r.get("rejections", {}) if r else {})
  return {
      "model": model, "requests": len(requests), "ok": len(texts),
      "failed": sum(1 for r in final if r and r["status"] != "ok"),
      "missing": sum(1 for r in final if r is None),
      "candidates": sum(r["attempts"] for r in final if r),
      "rejections": dict(sorted(rejections.items())),
      "kept_rejected": sum(1 for r in final if r and r.get("kept_rejected")),
      "steps": prompts.missing_steps(texts),
      "records": len(mine), "attempts": sum(r["attempts"] for r in mine),
      "prompt_tokens": sum(r["prompt_tokens"] for r in mine),
      "completion_tokens": sum(r["completion_tokens"] for r in mine),
      "estimated_token_records": sum(1 for r in mine if r["estimated_tokens"]),
      "cost_usd": sum(r["cost_usd"] for r in mine)}


# ---------------------------------------------------------------------------------------------
# rationales.jsonl: the accepted rationales, one per request.


def write_rationales(path: pathlib.Path, requests: Sequence[Request], records: Sequence[Mapping],
                     model: str) -> list[dict]:
  """Writes (process 0, atomically) one line per requested rationale that was accepted, in
  request order; returns the lines."""
  latest = {cache_key(r): r for r in records if r["status"] == "ok"}
  rows = [{k: found[k] for k in RATIONALE_FIELDS} for found in
          (latest.get(request_key(q, model)) for q in requests) if found]
  multihost.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  return rows


def read_rationales(path: pathlib.Path) -> list[dict]:
  """The rows of a rationales.jsonl (teacher's or student's), in file order; a malformed line is
  reported by file and line."""
  rows = []
  for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
    missing = [k for k in ("user", "user_id", "split", "text") if k not in row]
    if missing:
      raise ValueError(f"{path}:{number}: record lacks {', '.join(missing)}")
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------------------------
# Local generation, shared by the local teacher and the student.


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
  return generate.SamplingConfig(
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
                   variables, tokenizer, label: str, writer: CacheWriter,
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
  open_ = sorted((_Pending(r, chat_ids(tokenizer, r.messages, r.prefill)) for r in requests),
                 key=lambda p: len(p.prompt_ids))
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
          outputs = generate.generate_ids(model, variables, filled, key, sampling,
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
  return record(pending_.request, label, text=text,
                error=f"rejected: {reason}" if reason and not kept else None,
                finish_reason="length" if reason == "truncated" else "stop",
                attempts=pending_.drawn, prompt_tokens=len(pending_.prompt_ids),
                completion_tokens=pending_.completion_tokens, estimated_tokens=False,
                cost_usd=0.0, seconds=pending_.seconds,
                rejections=pending_.rejections, kept_rejected=kept)
