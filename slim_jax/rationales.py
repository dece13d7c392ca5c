"""Rationales: the requests, their cache and their files, whoever writes them.

A rationale is written for a `Request` (a user's visible history as chat messages) by a teacher
(an OpenAI-compatible API or a local LLaMA) or by the student; all of them append one JSON record
per request to `cache.jsonl`, keyed by (user id, prompt hash, model), with flush + fsync per
record: a killed run loses at most the record being written, and a rerun generates only what has
no record. A rationale that fails the quality filter (`quality.rejection`) is never kept: its
request is recorded with status "failed" and the reason, and failures are retried on a later run
only when `retry_failures` is set. Finally `rationales.jsonl` gets one line per request whose
rationale was accepted. Local models write theirs through `local_generation`, the API teacher
through `chat_api`.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

from absl import logging

from slim_jax import answers, multihost, prompts, quality
from slim_jax.prompts import PromptConfig

# A rationales.jsonl line: keyed by the raw user id and split, never by a row of the prepared
# arrays, which shift when the data is prepared again with another filter.
RATIONALE_FIELDS = ("user_id", "split", "prompt_hash", "model", "history_len", "text")


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
                   max_users: int = 0, local: bool = False,
                   writer: str = "student") -> list[Request]:
  """A request per rationale the prompt config asks `writer` for (`prompts.history_splits`),
  truncated with `count_tokens`; a local model's requests carry the guided answer's opening."""
  prefill = prompts.prefill(pcfg) if local else ""
  requests = []
  for user, split, items in prompts.visible_histories(prepared,
                                                      prompts.history_splits(pcfg, writer)):
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
  return {"user_id": request.user_id, "split": request.split,
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
      "steps": answers.missing_steps(texts),
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
  rows = [{**{k: found[k] for k in RATIONALE_FIELDS}, "user_id": q.user_id, "split": q.split}
          for q, found in ((q, latest.get(request_key(q, model))) for q in requests) if found]
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
    missing = [k for k in ("user_id", "split", "text") if k not in row]
    if missing:
      raise ValueError(f"{path}:{number}: record lacks {', '.join(missing)}")
    rows.append(row)
  return rows
