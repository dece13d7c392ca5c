"""Teachers that write SLIM's rationales: an OpenAI-compatible chat API, or a local LLaMA.

Both append one JSON record per request to `cache.jsonl`, keyed by (user id, prompt hash, model),
with flush + fsync per record: a killed run loses at most the record being written, and a rerun
requests only what has no record. A response that is empty, malformed or truncated is retried,
then recorded with status "failed", never as a rationale; failures are retried on a later run
only when `retry_failures` is set. Every record carries its token counts and dollars, summed over
all the attempts it took, so the spend is the sum over records, each counted once.
Finally `rationales.jsonl` gets one line per requested rationale that succeeded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import email.utils
import fcntl
import functools
import hashlib
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

from slim_jax import assets, prompts
from slim_jax.prompts import PromptConfig

KINDS = ("local", "openai")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  kind: str = "local"  # local: a LLaMA checkpoint through slim_jax.generate; openai: HTTP API
  max_users: int = 0  # rationales for the first N users only (0 = all)
  max_tokens: int = 256  # completion length limit; a completion that reaches it is a failure
  temperature: float = 0.0
  retry_failures: bool = False  # on a rerun, request again what was recorded as failed
  # openai
  base_url: str = "https://api.openai.com/v1"
  model: str = "gpt-3.5-turbo"
  api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key; "" = send none
  concurrency: int = 8
  timeout_s: float = 60.0  # per socket operation of one request
  max_retries: int = 6
  backoff_s: float = 1.0  # first retry delay; doubles per retry, with jitter
  max_backoff_s: float = 60.0
  requests_per_minute: float = 0.0  # 0 = no limit
  tokens_per_minute: float = 0.0  # prompt + max_tokens per request, as OpenAI counts them
  input_usd_per_1k: float = 0.0015  # gpt-3.5-turbo, as quoted in the SLIM paper
  output_usd_per_1k: float = 0.002
  assumed_output_tokens: int = 0  # dry run: mean completion tokens; 0 = max_tokens (upper bound)
  # local
  checkpoint: str = ""  # HF directory or .gguf; "" = the embedded SmolLM2-135M-Instruct
  batch_size: int = 8
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Request:
  """One rationale to write: a user's visible history as chat messages."""
  user: int  # contiguous user index in Prepared
  user_id: str  # raw user id: the cache key survives re-preparing the data
  split: str  # whose visible history (see prompts.HISTORIES)
  messages: tuple[Mapping[str, str], ...]
  history_len: int  # items kept after truncation to the token budget
  prompt_tokens: int  # as the teacher's tokenizer counts them

  @property
  def prompt_hash(self) -> str:
    return prompt_hash(self.messages)


def prompt_hash(messages: Iterable[Mapping[str, str]]) -> str:
  canonical = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cache_key(record: Mapping) -> tuple[str, str, str]:
  return record["user_id"], record["prompt_hash"], record["model"]


def model_name(cfg: TeacherConfig) -> str:
  """The `model` of the records: the API's model name, or the local checkpoint's file name."""
  if cfg.kind == "openai":
    return cfg.model
  return "local:" + (pathlib.Path(cfg.checkpoint).name if cfg.checkpoint else
                     assets.ASSETS["smollm2"].main.rsplit("/", 1)[-1])


def build_requests(prepared, pcfg: PromptConfig, count_tokens: Callable[[list[dict]], int],
                   max_users: int = 0) -> list[Request]:
  """A request per rationale the prompt config asks for, truncated with `count_tokens`."""
  requests = []
  for user, split, items in prompts.visible_histories(prepared, pcfg.history):
    if max_users and user >= max_users:
      continue
    messages, kept = prompts.teacher_prompt(
        [prepared.item_text[i] for i in items], pcfg, count_tokens)
    requests.append(Request(user, str(prepared.user_ids[user]), split, tuple(messages), kept,
                            count_tokens(messages)))
  return requests


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


def dollars(prompt_tokens: int, completion_tokens: int, cfg: TeacherConfig) -> float:
  return (prompt_tokens * cfg.input_usd_per_1k + completion_tokens * cfg.output_usd_per_1k) / 1000


def estimate_cost(tcfg: TeacherConfig, pcfg: PromptConfig, prepared) -> dict:
  """Tokens and dollars for the whole run before anything is spent (the OpenAI dry run)."""
  requests = build_requests(prepared, pcfg, chat_tokens, tcfg.max_users)
  output = tcfg.assumed_output_tokens or tcfg.max_tokens
  prompt_tokens = sum(r.prompt_tokens for r in requests)
  completion_tokens = output * len(requests)
  return {
      "requests": len(requests), "model": tcfg.model, "prompt_tokens": prompt_tokens,
      "mean_prompt_tokens": prompt_tokens / max(len(requests), 1),
      "mean_history_items": sum(r.history_len for r in requests) / max(len(requests), 1),
      "completion_tokens": completion_tokens,
      "completion_tokens_per_request": output,
      "completion_assumption": ("assumed_output_tokens (mean)" if tcfg.assumed_output_tokens
                                else "max_tokens (upper bound)"),
      "cost_usd": dollars(prompt_tokens, completion_tokens, tcfg)}


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
  if torn:
    logging.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run",
                    path, len(torn))
    with open(path, "r+b") as f:
      f.truncate(len(data) - len(torn))
  return records


class CacheWriter:
  """Appends records durably; holds an exclusive lock so two runs never interleave."""

  def __init__(self, path: pathlib.Path):
    self._file = open(path, "a", encoding="utf-8")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.close()
      raise RuntimeError(f"{path} is being written by another run") from None

  def append(self, record: Mapping) -> None:
    self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
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
    status = latest.get((request.user_id, request.prompt_hash, model))
    if status is None or (retry_failures and status != "ok"):
      todo.append(request)
  return todo


def record(request: Request, model: str, *, text: str, error: str | None,
           finish_reason: str | None, attempts: int, prompt_tokens: int,
           completion_tokens: int, estimated_tokens: bool, cost_usd: float,
           seconds: float) -> dict:
  return {"user": request.user, "user_id": request.user_id, "split": request.split,
          "prompt_hash": request.prompt_hash, "model": model,
          "status": "failed" if error else "ok", "text": "" if error else text, "error": error,
          "finish_reason": finish_reason, "attempts": attempts, "history_len": request.history_len,
          "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "estimated_tokens": estimated_tokens, "cost_usd": cost_usd,
          "seconds": round(seconds, 3)}


def summarize(requests: Sequence[Request], records: Sequence[Mapping], model: str) -> dict:
  """Outcomes of the current requests (latest record per key) and the spend of every record of
  this model in the cache, each counted once: failed attempts were paid for too."""
  mine = [r for r in records if r["model"] == model]
  latest = {cache_key(r): r for r in mine}
  final = [latest.get((q.user_id, q.prompt_hash, model)) for q in requests]
  texts = [r["text"] for r in final if r and r["status"] == "ok"]
  return {
      "model": model, "requests": len(requests), "ok": len(texts),
      "failed": sum(1 for r in final if r and r["status"] != "ok"),
      "missing": sum(1 for r in final if r is None),
      "steps": prompts.missing_steps(texts),
      "records": len(mine), "attempts": sum(r["attempts"] for r in mine),
      "prompt_tokens": sum(r["prompt_tokens"] for r in mine),
      "completion_tokens": sum(r["completion_tokens"] for r in mine),
      "estimated_token_records": sum(1 for r in mine if r["estimated_tokens"]),
      "cost_usd": sum(r["cost_usd"] for r in mine)}


def write_rationales(path: pathlib.Path, requests: Sequence[Request], records: Sequence[Mapping],
                     model: str) -> None:
  """One line per requested rationale that succeeded, in request order (written atomically)."""
  latest = {cache_key(r): r for r in records if r["status"] == "ok"}
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for request in requests:
      found = latest.get((request.user_id, request.prompt_hash, model))
      if found:
        f.write(json.dumps({k: found[k] for k in (
            "user", "user_id", "split", "prompt_hash", "model", "history_len", "text")},
                           ensure_ascii=False) + "\n")
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible client.


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


def backoff(attempt: int, cfg: TeacherConfig, server_wait: float | None) -> float:
  """The server's Retry-After when it gives a sane one, else exponential backoff with jitter so
  that concurrent workers do not retry in lockstep."""
  if server_wait is not None and server_wait <= cfg.max_backoff_s:
    return server_wait
  return min(cfg.max_backoff_s, cfg.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)


def complete(request: Request, cfg: TeacherConfig, api_key: str, limiter: RateLimiter) -> dict:
  """The cache record of one request after up to 1 + max_retries attempts."""
  body = {"model": cfg.model, "messages": list(request.messages),
          "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
  start, spent, estimated = time.monotonic(), [0, 0], False
  for attempt in range(cfg.max_retries + 1):
    limiter.acquire(request.prompt_tokens + cfg.max_tokens)
    try:
      outcome = interpret(*post_chat(cfg.base_url, body, api_key, cfg.timeout_s), request)
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, dropped connections
      outcome = Outcome(f"{type(e).__name__}: {e}")
    spent = [spent[0] + outcome.prompt_tokens, spent[1] + outcome.completion_tokens]
    estimated |= outcome.estimated_tokens
    if outcome.error is None or not outcome.retryable or attempt == cfg.max_retries:
      break
    logging.debug("user %s attempt %d: %s", request.user_id, attempt + 1, outcome.error)
    time.sleep(backoff(attempt, cfg, outcome.retry_after))
  return record(request, cfg.model, text=outcome.text, error=outcome.error,
                finish_reason=outcome.finish_reason, attempts=attempt + 1,
                prompt_tokens=spent[0], completion_tokens=spent[1], estimated_tokens=estimated,
                cost_usd=dollars(*spent, cfg), seconds=time.monotonic() - start)


def api_key(cfg: TeacherConfig) -> str:
  if not cfg.api_key_env:
    return ""
  key = os.environ.get(cfg.api_key_env, "")
  if not key:
    raise KeyError(f"teacher.api_key_env={cfg.api_key_env!r}: that environment variable is "
                   "not set (set it, or teacher.api_key_env='' for a server without keys)")
  return key


def _log_progress(done: int, total: int, failed: int, cost: float, start: float) -> None:
  if done == total or done % max(1, total // 20) == 0:
    logging.info("teacher: %d/%d recorded (%d failed), %.2f/s, $%.4f", done, total, failed,
                 done / max(time.monotonic() - start, 1e-9), cost)


def run_openai(requests: Sequence[Request], cfg: TeacherConfig, cache: pathlib.Path) -> None:
  """Completes `requests` with bounded concurrency, appending each record as it finishes."""
  key = api_key(cfg)
  limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
  pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency)
  start, failed, cost = time.monotonic(), 0, 0.0
  try:
    with CacheWriter(cache) as writer:
      futures = [pool.submit(complete, request, cfg, key, limiter) for request in requests]
      for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
        result = future.result()
        writer.append(result)
        failed += result["status"] != "ok"
        cost += result["cost_usd"]
        _log_progress(done, len(requests), failed, cost, start)
  finally:
    pool.shutdown(cancel_futures=True)  # an interrupted run must not keep spending


# ---------------------------------------------------------------------------------------------
# The local teacher.


def chat_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
  """Token ids of `messages` in the model's chat template, ready for the answer."""
  text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_local(requests: Sequence[Request], cfg: TeacherConfig, cache: pathlib.Path, model,
              variables, tokenizer, model_label: str) -> None:
  """Generates in batches of similar prompt length through slim_jax.generate; records cost no
  dollars. A completion that reaches max_tokens without a stop token is a failure."""
  import jax
  from slim_jax import generate
  sampling = generate.SamplingConfig(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  prompted = sorted(((r, chat_ids(tokenizer, r.messages)) for r in requests),
                    key=lambda pair: len(pair[1]))
  start, produced = time.monotonic(), 0
  with CacheWriter(cache) as writer:
    for index in range(0, len(prompted), cfg.batch_size):
      batch = prompted[index:index + cfg.batch_size]
      batch_start = time.monotonic()
      outputs = generate.generate_ids(
          model, variables, [ids for _, ids in batch],
          jax.random.fold_in(jax.random.key(cfg.seed), index), sampling,
          [tokenizer.eos_token_id], pad_id)
      seconds = (time.monotonic() - batch_start) / len(batch)
      for (request, prompt_ids), ids in zip(batch, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        truncated = len(ids) >= cfg.max_tokens
        error = ("truncated (finish_reason=length)" if truncated else
                 "empty completion" if not text.strip() else None)
        writer.append(record(
            request, model_label, text=text, error=error,
            finish_reason="length" if truncated else "stop", attempts=1,
            prompt_tokens=len(prompt_ids), completion_tokens=len(ids), estimated_tokens=False,
            cost_usd=0.0, seconds=seconds))
        produced += len(ids)
      logging.info("local teacher: %d/%d, %.1f generated tokens/s",
                   index + len(batch), len(prompted), produced / (time.monotonic() - start))


def run_teacher(tcfg: TeacherConfig, pcfg: PromptConfig, prepared, out_dir, mesh=None) -> dict:
  """Writes out_dir/cache.jsonl (resumable log) and out_dir/rationales.jsonl; returns a summary.

  With a mesh, the local teacher's parameters are sharded by the LLaMA rules and its batches
  by the mesh's batch axes.
  """
  if tcfg.kind not in KINDS:
    raise ValueError(f"teacher.kind={tcfg.kind!r}; expected one of {KINDS}")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cache, model = out_dir / "cache.jsonl", model_name(tcfg)
  if tcfg.kind == "openai":
    requests = build_requests(prepared, pcfg, chat_tokens, tcfg.max_users)
    todo = pending(requests, read_cache(cache), model, tcfg.retry_failures)
    logging.info("teacher %s: %d of %d requests to do", model, len(todo), len(requests))
    run_openai(todo, tcfg, cache)
  else:
    import jax
    from slim_jax import checkpoints
    from slim_jax.models.llama import Llama
    config, params, tokenizer = checkpoints.load(tcfg.checkpoint or assets.path("smollm2"), mesh)
    requests = build_requests(prepared, pcfg, lambda m: len(chat_ids(tokenizer, m)),
                              tcfg.max_users)
    todo = pending(requests, read_cache(cache), model, tcfg.retry_failures)
    logging.info("teacher %s: %d of %d requests to do", model, len(todo), len(requests))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      run_local(todo, tcfg, cache, Llama(config), {"params": params}, tokenizer, model)
  records = read_cache(cache)
  write_rationales(out_dir / "rationales.jsonl", requests, records, model)
  summary = summarize(requests, records, model)
  if summary["failed"]:
    logging.warning("teacher %s: %d requests failed (see %s); rerun with "
                    "teacher.retry_failures=true to retry them", model, summary["failed"], cache)
  return summary
