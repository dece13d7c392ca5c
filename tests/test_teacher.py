"""Teachers: the OpenAI-compatible client against a fault-injecting server, the resumable cache,
cost accounting, the dry run, and the local teacher through slim_jax.sampler."""

import collections
import contextlib
import dataclasses
import email.utils
import io
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

from absl.testing import absltest
import numpy as np

from slim_jax import chat_api, parallel, prompts, rationales, teacher
from slim_jax.prompts import PromptConfig
from slim_jax.teacher import TeacherConfig
from tests import fake_openai_server as fake
from tests.fixtures import KEY_ENV, bigram_fixture, client_config, synthetic_requests

REPO = pathlib.Path(__file__).resolve().parent.parent
SECRET = "sk-test-8c1f0e2d9b7a4c6e"
PCFG = PromptConfig()


def served(server: fake.FakeOpenAI, requests) -> list[int]:
  return [server.requests[fake.prompt_key(list(r.messages))] for r in requests]


class OpenAIClientTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(absltest.mock.patch.dict(os.environ, {KEY_ENV: SECRET}))
    self.cache = pathlib.Path(self.create_tempdir().full_path) / "cache.jsonl"

  def test_200_prompts_with_30_percent_faults_complete_exactly_once(self):
    requests = synthetic_requests(200)
    cfg = client_config("")
    log = io.StringIO()
    with (fake.FakeOpenAI(seed=1, fault_rate=0.3, api_key=SECRET) as server,
          contextlib.redirect_stderr(log)):
      chat_api.run_openai(requests, dataclasses.replace(cfg, base_url=server.url), PCFG,
                          self.cache)
    records = rationales.read_cache(self.cache)
    summary = rationales.summarize(requests, records, "gpt-test")
    # The progress line's final report: every request, none failed, what they cost.
    self.assertIn("teacher gpt-test: 200/200 request", log.getvalue())
    self.assertIn(f"cost=${summary['cost_usd']:.4f}, failed=0]", log.getvalue())

    self.assertEqual(set(server.faults_served), set(fake.FAULTS))  # every fault was served
    self.assertGreater(sum(server.faults_served.values()), 60)
    self.assertLessEqual(server.max_in_flight, cfg.concurrency)
    self.assertLen(records, 200)
    self.assertEqual(collections.Counter(map(rationales.cache_key, records)).most_common(1)[0][1], 1)
    by_user = {r["user_id"]: r for r in records}
    for request, requested in zip(requests, served(server, requests)):
      got = by_user[request.user_id]
      self.assertEqual(got["status"], "ok", got)
      self.assertEqual(got["text"], fake.rationale_for(list(request.messages)))
      self.assertEqual(got["prompt_hash"], request.prompt_hash)
      self.assertGreaterEqual(got["attempts"], requested)  # a timed-out connect never arrives

    self.assertEqual((summary["ok"], summary["failed"], summary["missing"]), (200, 0, 0))
    self.assertEqual(summary["steps"]["missing_any"], 0)
    self.assertEqual(summary["prompt_tokens"], server.billed["prompt_tokens"])
    self.assertEqual(summary["completion_tokens"], server.billed["completion_tokens"])
    self.assertAlmostEqual(summary["cost_usd"], (server.billed["prompt_tokens"] * 0.0015 +
                                                 server.billed["completion_tokens"] * 0.002) / 1000)
    self.assertEqual(rationales.pending(requests, records, "gpt-test", retry_failures=True), [])

  def test_sigkill_midway_then_rerun_requests_nothing_already_recorded(self):
    requests = synthetic_requests(200)
    child = textwrap.dedent("""
        import pathlib, sys
        from slim_jax import chat_api
        from slim_jax.prompts import PromptConfig
        from tests.fixtures import client_config, synthetic_requests
        chat_api.run_openai(synthetic_requests(200), client_config(sys.argv[1], concurrency=4),
                            PromptConfig(), pathlib.Path(sys.argv[2]))
        """)
    with fake.FakeOpenAI(seed=2, fault_rate=0.3, latency_s=0.02, api_key=SECRET) as server:
      process = subprocess.Popen([sys.executable, "-c", child, server.url, str(self.cache)],
                                 cwd=REPO, stderr=subprocess.PIPE, text=True)
      while process.poll() is None and (
          not self.cache.exists() or self.cache.read_bytes().count(b"\n") < 40):
        time.sleep(0.005)
      process.send_signal(signal.SIGKILL)
      stderr = process.communicate()[1]
      self.assertEqual(process.returncode, -signal.SIGKILL, stderr)

      recorded = rationales.read_cache(self.cache)
      self.assertBetween(len(recorded), 40, 199)
      before = dict(server.requests)
      cfg = client_config(server.url)
      chat_api.run_openai(rationales.pending(requests, recorded, "gpt-test", False), cfg, PCFG,
                          self.cache)

    for record in recorded:
      key = fake.prompt_key(list(requests[int(record["user_id"][1:])].messages))
      self.assertEqual(server.requests[key], before[key], record)  # not requested again
    records = rationales.read_cache(self.cache)
    self.assertCountEqual([r["user_id"] for r in records], [f"u{u}" for u in range(200)])
    self.assertTrue(all(r["status"] == "ok" for r in records))
    self.assertNotIn(SECRET, stderr)

  def test_truncated_completions_become_failures_retried_only_when_asked(self):
    requests = synthetic_requests(5)
    with fake.FakeOpenAI(fault_rate=1.0, faults=["length"], faulty_attempts=(99, 99)) as server:
      cfg = client_config(server.url, max_retries=2)
      chat_api.run_openai(requests, cfg, PCFG, self.cache)
      self.assertEqual(served(server, requests), [3] * 5)
      records = rationales.read_cache(self.cache)
      self.assertEqual({(r["status"], r["text"], r["finish_reason"]) for r in records},
                       {("failed", "", "length")})
      self.assertEqual(rationales.pending(requests, records, "gpt-test", retry_failures=False), [])
      todo = rationales.pending(requests, records, "gpt-test", retry_failures=True)
      chat_api.run_openai(todo, cfg, PCFG, self.cache)
      self.assertEqual(served(server, requests), [6] * 5)
      summary = rationales.summarize(requests, rationales.read_cache(self.cache), "gpt-test")
    self.assertEqual((summary["ok"], summary["failed"], summary["records"]), (0, 5, 10))
    self.assertEqual(summary["prompt_tokens"], server.billed["prompt_tokens"])  # paid, though
    out = pathlib.Path(self.create_tempdir().full_path) / "rationales.jsonl"
    rationales.write_rationales(out, requests, rationales.read_cache(self.cache), "gpt-test")
    self.assertEqual(out.read_text(), "")

  def test_api_key_is_sent_but_never_logged_or_written(self):
    requests = synthetic_requests(30)
    with self.assertLogs(level=logging.DEBUG) as logs:
      with fake.FakeOpenAI(seed=3, fault_rate=0.5, api_key=SECRET) as server:
        chat_api.run_openai(requests, client_config(server.url), PCFG, self.cache)
      with fake.FakeOpenAI(api_key="another-key") as server:
        chat_api.run_openai(synthetic_requests(31)[30:], client_config(server.url), PCFG,
                            self.cache)
    records = rationales.read_cache(self.cache)
    self.assertEqual(collections.Counter(r["status"] for r in records), {"ok": 30, "failed": 1})
    self.assertEqual(records[-1]["error"], "HTTP 401")  # refused at once, not retried
    self.assertEqual(records[-1]["attempts"], 1)
    self.assertTrue(any("attempt" in line for line in logs.output))
    self.assertNotIn(SECRET, "\n".join(logs.output))
    self.assertNotIn(SECRET.encode(), self.cache.read_bytes())

  def test_a_refused_parameter_is_dropped_and_logged_and_prompts_carry_no_prefill(self):
    requests = synthetic_requests(6)
    with fake.FakeOpenAI(fault_rate=0, unsupported=["repetition_penalty"]) as server:
      with self.assertLogs(level="WARNING") as logs:
        chat_api.run_openai(requests, client_config(server.url, repetition_penalty=1.2), PCFG,
                            self.cache)
    self.assertTrue(all(r["status"] == "ok" for r in rationales.read_cache(self.cache)))
    self.assertBetween(server.refused["repetition_penalty"], 1, 6)  # until the first refusal
    self.assertTrue(any("repetition_penalty" in line for line in logs.output))
    self.assertEqual(served(server, requests), [1] * 6)
    for body in server.bodies:
      self.assertNotIn("repetition_penalty", body)
      self.assertEqual(body["top_p"], TeacherConfig().top_p)
      self.assertEqual(body["messages"][-1]["role"], "user")  # no prefilled answer over HTTP
      self.assertNotIn("Step 1:", body["messages"][-1]["content"].splitlines()[-1])

  def test_rejected_answers_are_retried_up_to_candidates_then_recorded_as_failures(self):
    echo = prompts.INSTRUCTION.split("think step by step about what the user will want next.\n")[1]
    requests = synthetic_requests(3)
    answers = iter([echo, echo, echo, echo, echo, fake.rationale_for(requests[2].messages)] * 2)
    with fake.FakeOpenAI(fault_rate=0, answer=lambda messages: next(answers)) as server:
      chat_api.run_openai(requests[:2], client_config(server.url, candidates=2, concurrency=1),
                          PCFG, self.cache)
      self.assertEqual(served(server, requests[:2]), [2, 2])
      chat_api.run_openai(requests[2:], client_config(server.url, candidates=3), PCFG, self.cache)
    records = {r["user_id"]: r for r in rationales.read_cache(self.cache)}
    self.assertEqual([records[f"u{u}"]["status"] for u in range(3)], ["failed", "failed", "ok"])
    self.assertEqual(records["u0"]["error"], "rejected: echo")
    self.assertEqual(records["u0"]["rejections"], {"echo": 2})
    self.assertEqual(records["u0"]["rejected_text"], echo)
    self.assertEqual((records["u2"]["attempts"], records["u2"]["rejections"]), (2, {"echo": 1}))

  def test_missing_key_names_the_variable(self):
    del os.environ[KEY_ENV]
    with self.assertRaisesRegex(KeyError, KEY_ENV):
      chat_api.run_openai(synthetic_requests(1), client_config("http://127.0.0.1:9/v1"), PCFG,
                          self.cache)

  def test_without_usage_tokens_are_counted_with_cl100k(self):
    requests = [dataclasses.replace(r, prompt_tokens=chat_api.chat_tokens(r.messages))
                for r in synthetic_requests(4)]
    with fake.FakeOpenAI(fault_rate=0, with_usage=False) as server:
      chat_api.run_openai(requests, client_config(server.url), PCFG, self.cache)
    for request, record in zip(requests, sorted(rationales.read_cache(self.cache),
                                                key=lambda r: int(r["user_id"][1:]))):
      self.assertTrue(record["estimated_tokens"])
      self.assertEqual(record["prompt_tokens"], request.prompt_tokens)
      self.assertEqual(record["completion_tokens"], chat_api.text_tokens(record["text"]))
      self.assertGreater(record["completion_tokens"], 20)


class CacheTest(absltest.TestCase):

  def test_torn_last_line_is_dropped_and_cut_off(self):
    path = pathlib.Path(self.create_tempdir().full_path) / "cache.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "te')
    self.assertEqual(rationales.read_cache(path), [{"a": 1}, {"a": 2}])
    self.assertEqual(path.read_text(), '{"a": 1}\n{"a": 2}\n')
    with rationales.CacheWriter(path) as writer:
      writer.append({"a": 4})
    self.assertEqual(rationales.read_cache(path), [{"a": 1}, {"a": 2}, {"a": 4}])

  def test_corrupt_inner_line_names_file_and_line(self):
    path = pathlib.Path(self.create_tempdir().full_path) / "cache.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with self.assertRaisesRegex(ValueError, "cache.jsonl:2: not a JSON record"):
      rationales.read_cache(path)

  def test_second_writer_is_refused(self):
    path = pathlib.Path(self.create_tempdir().full_path) / "cache.jsonl"
    with rationales.CacheWriter(path):
      with self.assertRaisesRegex(RuntimeError, "being written by another run"):
        rationales.CacheWriter(path)


class RateLimiterTest(absltest.TestCase):

  def _run(self, rpm, tpm, tokens, n):
    clock = [0.0]
    limiter = chat_api.RateLimiter(rpm, tpm, clock=lambda: clock[0],
                                   sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    for _ in range(n):
      limiter.acquire(tokens)
    return clock[0]

  def test_requests_per_minute(self):
    # 600/min: a burst of one second's worth (10) plus one, then one every 0.1 s.
    self.assertAlmostEqual(self._run(600, 0, 1, 31), 2.0)

  def test_tokens_per_minute_allows_overdraw_then_repays(self):
    # 6000/min = 100/s; 250-token requests: the 2nd waits 1.5 s of debt, later ones 2.5 s.
    self.assertAlmostEqual(self._run(0, 6000, 250, 4), 1.5 + 2.5 * 2)

  def test_unlimited_never_waits(self):
    self.assertEqual(self._run(0, 0, 10**6, 100), 0.0)


class ResponseTest(absltest.TestCase):

  def test_retry_after_forms(self):
    self.assertEqual(chat_api.retry_after({"retry-after": "3"}), 3.0)
    self.assertEqual(chat_api.retry_after({"retry-after-ms": "250", "retry-after": "9"}), 0.25)
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    self.assertBetween(chat_api.retry_after({"retry-after": date}), 25, 31)
    self.assertIsNone(chat_api.retry_after({}))

  def test_backoff_honours_retry_after_else_grows_with_jitter(self):
    cfg = TeacherConfig(backoff_s=1.0, max_backoff_s=10.0)
    self.assertEqual(chat_api.backoff(0, cfg, 0.05), 0.05)
    self.assertBetween(chat_api.backoff(2, cfg, None), 2.0, 4.0)
    self.assertBetween(chat_api.backoff(9, cfg, 600.0), 5.0, 10.0)  # an absurd wait is capped


class DryRunTest(absltest.TestCase):

  def test_ml100k_estimate(self):
    from slim_jax import assets
    from slim_jax.config import DataConfig
    from slim_jax.data import formats, preprocess
    prepared = preprocess.prepare(
        formats.read_dataset("recbole", assets.path("ml-100k"), "raise"), DataConfig())
    pcfg, tcfg = PromptConfig(max_prompt_tokens=1024), TeacherConfig(kind="openai")
    estimate = teacher.estimate_cost(tcfg, pcfg, prepared)
    print(json.dumps(estimate, indent=1))
    self.assertEqual(estimate["requests"], 943)
    self.assertBetween(estimate["mean_prompt_tokens"], 200, 1024)
    self.assertEqual(estimate["completion_tokens"], 943 * tcfg.max_tokens)
    self.assertAlmostEqual(estimate["cost_usd"], (estimate["prompt_tokens"] * 0.0015
                                                  + estimate["completion_tokens"] * 0.002) / 1000)
    requests = rationales.build_requests(prepared, pcfg, chat_api.chat_tokens, max_users=10,
                                         writer="teacher")
    self.assertLen(requests, 10)
    self.assertLessEqual(max(r.prompt_tokens for r in requests), 1024)
    lengths = np.diff(prepared.seq_offsets)[:10] - 2
    self.assertTrue(all(r.history_len <= n for r, n in zip(requests, lengths)))
    self.assertTrue(any(r.history_len < n for r, n in zip(requests, lengths)))  # truncated


class LocalTeacherTest(absltest.TestCase):

  def test_bigram_llama_answers_every_request_once_at_zero_dollars(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    prepared, tokenizer = bigram_fixture(directory)
    tcfg = TeacherConfig(kind="local", checkpoint=str(directory / "bigram"), max_tokens=4,
                         batch_size=4, max_users=4, temperature=0.0)
    pcfg = PromptConfig(max_prompt_tokens=660, domain="generic", exemplar=False)
    mesh = parallel.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    summary = teacher.run_teacher(tcfg, pcfg, prepared, directory / "out", mesh)
    records = rationales.read_cache(directory / "out" / "cache.jsonl")

    # The bigram model writes "A" after the prefilled "Step 1:" and stops: a rationale without
    # steps 2 and 3, which the filter rejects.
    self.assertEqual((summary["requests"], summary["ok"], summary["failed"]), (4, 0, 4))
    self.assertEqual(summary["rejections"], {"missing_step": 4})
    users = prepared.rows_of([r["user_id"] for r in records])
    self.assertEqual(sorted(users), [0, 1, 2, 3])
    cut = 0
    for r, user in zip(records, users):
      history = [prepared.item_text[i] for i in prepared.split("valid").history(user)]
      cut += r["history_len"] < len(history)
      messages = prompts.cot_messages(history[-r["history_len"]:], pcfg)
      self.assertLessEqual(len(rationales.chat_ids(tokenizer, messages)), 660)
      prompt = rationales.chat_ids(tokenizer, messages, "Step 1:")
      self.assertEqual(tokenizer.decode(prompt[-7:]), "Step 1:")  # the answer is prefilled
      self.assertEqual((r["model"], r["rejected_text"], r["status"], r["error"]),
                       ("local:bigram", "Step 1:A", "failed", "rejected: missing_step"))
      self.assertEqual((r["prompt_tokens"], r["completion_tokens"]), (len(prompt), 1))
      self.assertEqual(r["cost_usd"], 0.0)
    self.assertEqual(summary["prompt_tokens"], sum(r["prompt_tokens"] for r in records))
    self.assertBetween(cut, 1, 3)  # the budget cut some histories, not all
    self.assertEqual((directory / "out" / "rationales.jsonl").read_text(), "")
    teacher.run_teacher(tcfg, pcfg, prepared, directory / "out", mesh)  # a rerun adds nothing
    self.assertLen(rationales.read_cache(directory / "out" / "cache.jsonl"), 4)


if __name__ == "__main__":
  absltest.main()
