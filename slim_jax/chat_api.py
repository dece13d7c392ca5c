"""An OpenAI-compatible chat completions client: what its requests cost, and completing them.

A whole HTTP client (rate limits, retries with backoff and Retry-After, parameters a server
refuses, cl100k billing) apart from the teacher stage that calls it; it reads the teacher's config
section (`teacher.TeacherConfig`, passed in as `cfg`) and never imports the stage. A response
that is empty, malformed, truncated or rejected by the quality filter is retried, then recorded
in `rationales`' cache with status "failed", never as a rationale. Every record carries its token
counts and dollars, summed over all the attempts it took, so the spend is the sum over records,
each counted once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import functools
import http.client
import json
import os
import pathlib
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence

from absl import logging

from slim_jax import assets, progress, quality, rationales
from slim_jax.prompts import PromptConfig
from slim_jax.rationales import Request


# ---------------------------------------------------------------------------------------------
# Tokens and dollars.

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


@functools.cache
def cl100k():
  """gpt-3.5-turbo's tokenizer from the offline asset (tiktoken would otherwise download it)."""
  import tiktoken
  import tiktoken.load
  ranks = tiktoken.load.load_tiktoken_bpe(str(assets.path("cl100k")), expected_hash=CL100K_SHA256)
  return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                           special_tokens=CL100K_SPECIAL)


def chat_tokens(messages: Iterable[Mapping[str, str]]) -> int:
  """Prompt tokens OpenAI bills for chat messages: 3 per message for the role framing, the
  encoded role and content, and 3 that prime the reply (OpenAI's published recipe)."""
  encoding = cl100k()
  return 3 + sum(3 + len(encoding.encode(m["role"], disallowed_special=()))
                 + len(encoding.encode(m["content"], disallowed_special=())) for m in messages)


def text_tokens(text: str) -> int:
  return len(cl100k().encode(text, disallowed_special=()))


def dollars(prompt_tokens: int, completion_tokens: int, cfg) -> float:
  return (prompt_tokens * cfg.input_usd_per_1k + completion_tokens * cfg.output_usd_per_1k) / 1000


# ---------------------------------------------------------------------------------------------
# Completing requests.


class RateLimiter:
  """Requests- and tokens-per-minute limits as token buckets holding one second's worth.

  A request may overdraw a bucket (one prompt can hold more than a second's tokens); the next
  waits until the debt is repaid, so the average rate holds and no request waits forever.
  """

  def __init__(self, requests_per_minute: float, tokens_per_minute: float,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep):
    self._rates = [requests_per_minute / 60, tokens_per_minute / 60]  # per second; 0 = no limit
    self._levels = list(self._rates)
    self._clock, self._sleep = clock, sleep
    self._time = clock()
    self._lock = threading.Lock()

  def acquire(self, tokens: int) -> None:
    with self._lock:  # waiters queue here, so each is served in turn
      self._refill()
      wait = max((-level / rate for rate, level in zip(self._rates, self._levels)
                  if rate and level < 0), default=0.0)
      if wait > 0:
        self._sleep(wait)
        self._refill()
      self._levels = [level - amount for level, amount in zip(self._levels, (1, tokens))]

  def _refill(self) -> None:
    now = self._clock()
    self._levels = [min(rate, level + (now - self._time) * rate)
                    for rate, level in zip(self._rates, self._levels)]
    self._time = now


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What one HTTP attempt produced; `error` None means a usable rationale."""
  error: str | None
  retryable: bool = True
  text: str = ""
  finish_reason: str | None = None
  retry_after: float | None = None
  prompt_tokens: int = 0  # billed for this attempt (0 when nothing came back)
  completion_tokens: int = 0
  estimated_tokens: bool = False


def retry_after(headers: Mapping[str, str]) -> float | None:
  """Seconds a server asks us to wait: retry-after-ms, or Retry-After in seconds or as a date."""
  if headers.get("retry-after-ms"):
    try:
      return float(headers["retry-after-ms"]) / 1000
    except ValueError:
      pass
  value = headers.get("retry-after")
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    try:
      return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
      return None


def interpret(status: int, headers: Mapping[str, str], body: bytes,
              request: Request) -> Outcome:
  """Classifies one HTTP response. Usage tokens are taken from the response when present and
  counted with cl100k otherwise. Error text never includes the body: it may echo credentials."""
  if status in (408, 409, 429) or status >= 500:  # timeouts, conflicts, rate limits, outages
    return Outcome(f"HTTP {status}", retry_after=retry_after(headers))
  if status != 200:
    return Outcome(f"HTTP {status}", retryable=False)
  try:
    payload = json.loads(body)
    choice = payload["choices"][0]
    text = choice["message"]["content"] or ""
    finish_reason = choice.get("finish_reason")
    usage = payload.get("usage") or {}
    if not isinstance(text, str):
      raise TypeError("content is not a string")
  except (ValueError, KeyError, IndexError, TypeError) as e:
    return Outcome(f"malformed response ({type(e).__name__})")
  estimated = "prompt_tokens" not in usage or "completion_tokens" not in usage
  error = ("truncated (finish_reason=length)" if finish_reason == "length" else
           "empty completion" if not text.strip() else None)
  return Outcome(
      error, text=text, finish_reason=finish_reason, estimated_tokens=estimated,
      prompt_tokens=request.prompt_tokens if estimated else int(usage["prompt_tokens"]),
      completion_tokens=text_tokens(text) if estimated else int(usage["completion_tokens"]))


def post_chat(base_url: str, body: Mapping, api_key: str, timeout: float
              ) -> tuple[int, dict[str, str], bytes]:
  """POST {base_url}/chat/completions on a fresh connection: (status, lower-case headers, body)."""
  url = urllib.parse.urlsplit(base_url)
  connection_class = (http.client.HTTPSConnection if url.scheme == "https"
                      else http.client.HTTPConnection)
  connection = connection_class(url.hostname, url.port, timeout=timeout)
  headers = {"Content-Type": "application/json"}
  if api_key:
    headers["Authorization"] = f"Bearer {api_key}"
  try:
    connection.request("POST", url.path.rstrip("/") + "/chat/completions",
                       body=json.dumps(body).encode(), headers=headers)
    response = connection.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
  finally:
    connection.close()


def backoff(attempt: int, cfg, server_wait: float | None) -> float:
  """The server's Retry-After when it gives a sane one, else exponential backoff with jitter so
  that concurrent workers do not retry in lockstep."""
  if server_wait is not None and server_wait <= cfg.max_backoff_s:
    return server_wait
  return min(cfg.max_backoff_s, cfg.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)


class OptionalParameters:
  """Request parameters beyond the protocol's core that a server may refuse: a 400 that names one
  drops it from every later request (logged once), and the request goes again without it."""

  def __init__(self, cfg):
    self._values = {"top_p": cfg.top_p}
    if cfg.repetition_penalty != 1.0:
      self._values["repetition_penalty"] = cfg.repetition_penalty
    self._optional = tuple(self._values)
    self._lock = threading.Lock()

  def values(self) -> dict:
    with self._lock:
      return dict(self._values)

  def drop_named(self, status: int, body: bytes, sent: Mapping) -> bool:
    """Whether an error response names an optional parameter of the request `sent` (dropped
    now, unless a concurrent request's refusal dropped it already)."""
    if status != 400:
      return False
    text = body.decode("utf-8", "replace")
    with self._lock:
      named = [name for name in sent if name in self._optional and name in text]
      for name in named:
        if self._values.pop(name, None) is not None:
          logging.warning("teacher: the server refused the parameter %r; dropped from requests",
                          name)
    return bool(named)


def complete(request: Request, cfg, api_key: str, limiter: RateLimiter,
             optional: OptionalParameters, pcfg: PromptConfig) -> dict:
  """The cache record of one request after up to 1 + max_retries attempts, of which at most
  `candidates` complete answers the quality filter rejects."""
  start, spent, estimated, rejections = time.monotonic(), [0, 0], False, collections.Counter()
  attempt = 0
  while True:
    body = {"model": cfg.model, "messages": list(request.messages),
            "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, **optional.values()}
    limiter.acquire(request.prompt_tokens + cfg.max_tokens)
    try:
      status, headers, payload = post_chat(cfg.base_url, body, api_key, cfg.timeout_s)
      if optional.drop_named(status, payload, body):
        continue
      outcome = interpret(status, headers, payload, request)
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, dropped connections
      outcome = Outcome(f"{type(e).__name__}: {e}")
    attempt += 1
    spent = [spent[0] + outcome.prompt_tokens, spent[1] + outcome.completion_tokens]
    estimated |= outcome.estimated_tokens
    if outcome.error is None:
      reason = quality.rejection(outcome.text, False, request.history_attributes, pcfg)
      if reason:
        rejections[reason] += 1
        retryable = sum(rejections.values()) < cfg.candidates
        outcome = dataclasses.replace(outcome, error=f"rejected: {reason}", retryable=retryable)
    elif outcome.finish_reason == "length":
      rejections["truncated"] += 1
    if outcome.error is None or not outcome.retryable or attempt > cfg.max_retries:
      break
    logging.debug("user %s attempt %d: %s", request.user_id, attempt, outcome.error)
    if not outcome.error.startswith("rejected"):
      time.sleep(backoff(attempt - 1, cfg, outcome.retry_after))
  return rationales.record(
      request, cfg.model, text=outcome.text, error=outcome.error,
      finish_reason=outcome.finish_reason, attempts=attempt, prompt_tokens=spent[0],
      completion_tokens=spent[1], estimated_tokens=estimated, cost_usd=dollars(*spent, cfg),
      seconds=time.monotonic() - start, rejections=rejections)


def api_key(cfg) -> str:
  if not cfg.api_key_env:
    return ""
  key = os.environ.get(cfg.api_key_env, "")
  if not key:
    raise KeyError(f"teacher.api_key_env={cfg.api_key_env!r}: that environment variable is "
                   "not set (set it, or teacher.api_key_env='' for a server without keys)")
  return key


def run_openai(requests: Sequence[Request], cfg, pcfg: PromptConfig, cache: pathlib.Path) -> None:
  """Completes `requests` with bounded concurrency, appending each record as it finishes."""
  key = api_key(cfg)
  limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
  optional = OptionalParameters(cfg)
  pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency)
  failed, cost = 0, 0.0
  try:
    with (rationales.CacheWriter(cache) as writer,
          progress.bar(len(requests), f"teacher {cfg.model}", "request") as bar):
      futures = [pool.submit(complete, request, cfg, key, limiter, optional, pcfg)
                 for request in requests]
      for future in concurrent.futures.as_completed(futures):
        result = future.result()
        writer.append(result)
        failed += result["status"] != "ok"
        cost += result["cost_usd"]
        bar.set_postfix(failed=failed, cost=f"${cost:.4f}", refresh=False)
        bar.update()
  finally:
    pool.shutdown(cancel_futures=True)  # an interrupted run must not keep spending
