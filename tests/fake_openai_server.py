"""A fault-injecting OpenAI-compatible chat server on 127.0.0.1, for the teacher client's tests.

It speaks POST /v1/chat/completions with the real JSON protocol. Whether a prompt is faulty, how
many of its first attempts fail, and which fault each one gets depend only on (seed, prompt,
attempt number), never on timing or arrival order, so a run is reproducible at any concurrency.
Answers are deterministic rationales built from the prompt (`rationale_for`). The server counts
requests per prompt (`requests`) and bills the usage of every response a client could read
(`billed`), which is what a client's cost summary must add up to.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import random
import re
import threading
import time
from collections.abc import Callable, Sequence

FAULTS = ("429", "500", "stall", "drop", "malformed", "length", "empty")


def prompt_key(messages: Sequence[dict]) -> str:
  return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def rationale_for(messages: Sequence[dict]) -> str:
  """The answer to a prompt: names its oldest and newest history items, so tests can check that
  a recorded rationale belongs to its own prompt."""
  history = re.findall(r"^\d+\. (.*)$", messages[-1]["content"], re.M) or ["nothing"]
  return (f"Step 1: The user liked {history[0]} and lately {history[-1]}.\n"
          f"Step 2: More of what {len(history)} items have in common.\n"
          f"Step 3:\n1. Something like {history[-1]}\n2. Prompt {prompt_key(messages)}")


def usage(messages: Sequence[dict], text: str) -> dict[str, int]:
  prompt = sum(len(m["content"].split()) for m in messages)
  return {"prompt_tokens": prompt, "completion_tokens": len(text.split()),
          "total_tokens": prompt + len(text.split())}


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128  # the default backlog of 5 drops concurrent clients' connections


class FakeOpenAI:
  """Use as a context manager; `url` is the base URL a client appends /chat/completions to."""

  def __init__(self, *, seed: int = 0, fault_rate: float = 0.3, faults: Sequence[str] = FAULTS,
               faulty_attempts: tuple[int, int] = (1, 2), retry_after: str = "0.05",
               stall_s: float = 1.5, latency_s: float = 0.0, api_key: str | None = None,
               with_usage: bool = True, unsupported: Sequence[str] = (),
               answer: Callable[[Sequence[dict]], str] = rationale_for):
    self.seed, self.fault_rate, self.faults = seed, fault_rate, tuple(faults)
    self.faulty_attempts, self.retry_after, self.stall_s = faulty_attempts, retry_after, stall_s
    self.latency_s, self.api_key, self.with_usage = latency_s, api_key, with_usage
    self.unsupported = tuple(unsupported)  # request parameters answered with a 400 naming them
    self.refused: collections.Counter[str] = collections.Counter()
    self.bodies: list[dict] = []
    self.answer = answer  # the text a prompt's messages get
    self.requests: collections.Counter[str] = collections.Counter()
    self.faults_served: collections.Counter[str] = collections.Counter()
    self.billed = {"prompt_tokens": 0, "completion_tokens": 0}
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()
    self._server = _Server(("127.0.0.1", 0), _handler(self))

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

  def __enter__(self):
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  def fault(self, key: str, attempt: int) -> str | None:
    """The fault for the `attempt`-th (0-based) request of prompt `key`, or None."""
    draw = random.Random(f"{self.seed}/{key}")
    if draw.random() >= self.fault_rate or attempt >= draw.randint(*self.faulty_attempts):
      return None
    return random.Random(f"{self.seed}/{key}/{attempt}").choice(self.faults)

  def bill(self, tokens: dict[str, int]) -> None:
    with self.lock:
      for name in self.billed:
        self.billed[name] += tokens[name]


def _handler(server: FakeOpenAI):

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):  # keep test output quiet
      pass

    def server_unsupported(self):
      return server.unsupported

    def do_POST(self):
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      if self.path != "/v1/chat/completions":
        return self._send(404, {"error": {"message": f"no route {self.path}"}})
      if server.api_key is not None and (
          self.headers.get("Authorization") != f"Bearer {server.api_key}"):
        return self._send(401, {"error": {"type": "invalid_request_error",
                                          "code": "invalid_api_key"}})
      refused = [name for name in self.server_unsupported() if name in body]
      if refused:
        with server.lock:
          server.refused[refused[0]] += 1
        return self._send(400, {"error": {"type": "invalid_request_error", "message":
                                          f"Unrecognized request argument supplied: {refused[0]}"}})
      with server.lock:
        server.bodies.append(body)
      key = prompt_key(body["messages"])
      with server.lock:
        attempt = server.requests[key]
        server.requests[key] += 1
      fault = server.fault(key, attempt)
      stalled = fault == "stall"  # outlives its client's wait, so not counted as in flight
      with server.lock:
        if fault:
          server.faults_served[fault] += 1
        server.in_flight += not stalled
        server.max_in_flight = max(server.max_in_flight, server.in_flight)
      try:
        time.sleep(server.latency_s)
        self._answer(body, fault)
      except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall)
        pass
      finally:
        with server.lock:
          server.in_flight -= not stalled

    def _answer(self, body: dict, fault: str | None):
      messages = body["messages"]
      with server.lock:
        text, finish = server.answer(messages), "stop"
      if fault == "429":
        return self._send(429, {"error": {"type": "rate_limit"}},
                          {"Retry-After": server.retry_after})
      if fault == "500":
        return self._send(500, {"error": {"type": "server_error"}})
      if fault == "stall":
        time.sleep(server.stall_s)
        return self._send(500, {"error": {"type": "timeout"}})
      if fault == "drop":
        self.close_connection = True
        return
      if fault == "malformed":
        return self._send(200, b'{"choices": [{"message": {"content": "Step 1: The')
      if fault == "length":
        text, finish = text[:len(text) // 2], "length"
      if fault == "empty":
        text = ""
      payload = {"id": f"chatcmpl-{prompt_key(messages)}", "object": "chat.completion",
                 "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": finish,
                              "message": {"role": "assistant", "content": text}}]}
      if server.with_usage:
        payload["usage"] = usage(messages, text)
        server.bill(payload["usage"])
      self._send(200, payload)

    def _send(self, status: int, payload, headers: dict[str, str] | None = None):
      data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      self.end_headers()
      self.wfile.write(data)

  return Handler
