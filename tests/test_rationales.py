"""The one local generation path: the local teacher and the student write the same records for the
same model and prompts, best of k keeps the first accepted candidate and counts the rejected
ones, the answer is prefilled for local models, and a kill mid-generation loses nothing."""

import collections
import contextlib
import dataclasses
import io
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

from absl.testing import absltest

from slim_jax import (assets, checkpoints, layout, local_generation, parallel, quality,
                      rationales, student, teacher)
from slim_jax.config import DataConfig
from slim_jax.data import formats, preprocess
from slim_jax.models.llama import Llama
from slim_jax.prompts import PromptConfig
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig
from tests.fixtures import bigram_fixture

REPO = pathlib.Path(__file__).resolve().parent.parent
USERS = 40  # the kill test's: one generation call each, so a kill lands between two
VOLATILE = ("model", "seconds")  # what may differ between two writers of the same records


def comparable(records):
  return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in records),
                key=lambda r: r["user_id"])


class SharedPathTest(absltest.TestCase):

  def test_teacher_and_student_write_the_same_records(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    prepared, _ = bigram_fixture(directory)
    pcfg = PromptConfig(max_prompt_tokens=680, domain="generic", exemplar=False, history="prefix")
    decoding = dict(max_tokens=6, temperature=0.7, candidates=2, batch_size=4, seed=3)
    mesh = parallel.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    teacher.run_teacher(TeacherConfig(kind="local", checkpoint=str(directory / "bigram"),
                                      dtype="float32", **decoding), pcfg, prepared,
                        directory / "teacher", mesh)
    summary = student.run_student(StudentConfig(dtype="float32", **decoding), pcfg, prepared,
                                  directory / "bigram", directory / "student", mesh)
    records = [rationales.read_cache(directory / stage / layout.CACHE)
               for stage in ("teacher", "student")]
    self.assertLen(records[0], prepared.num_users)
    self.assertEqual(comparable(records[0]), comparable(records[1]))
    self.assertEqual(summary["candidates"], 2 * prepared.num_users)  # every candidate rejected
    self.assertEqual(summary["rejections"], {"missing_step": 2 * prepared.num_users})

  def test_prefill_is_in_local_prompts_and_in_the_cache_key(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    prepared, tokenizer = bigram_fixture(directory)
    pcfg = PromptConfig(domain="generic", exemplar=False)
    count = lambda messages: len(rationales.chat_ids(tokenizer, messages))
    local = rationales.build_requests(prepared, pcfg, count, local=True)
    remote = rationales.build_requests(prepared, pcfg, count)
    self.assertEqual({r.prefill for r in local}, {"Step 1:"})
    self.assertEqual({r.prefill for r in remote}, {""})
    for mine, theirs in zip(local, remote):
      self.assertEqual(mine.messages, theirs.messages)
      self.assertNotEqual(mine.prompt_hash, theirs.prompt_hash)
      ids = rationales.chat_ids(tokenizer, mine.messages, mine.prefill)
      self.assertEqual(ids[:-7], rationales.chat_ids(tokenizer, mine.messages))
      self.assertEqual(tokenizer.decode(ids[-7:]), "Step 1:")
    unguided = rationales.build_requests(prepared, dataclasses.replace(pcfg, guided=False), count,
                                         local=True)
    self.assertEqual({r.prefill for r in unguided}, {""})


class BestOfKTest(absltest.TestCase):
  """SmolLM2-135M-Instruct sampling real rationales for real MovieLens users."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from slim_jax.config import DataConfig
    from slim_jax.data import formats
    cls.prepared = preprocess.prepare(
        formats.read_dataset("recbole", assets.path("ml-100k"), "raise"), DataConfig())
    cls.config, cls.params, cls.tokenizer = checkpoints.load(assets.path("smollm2"))

  def test_keeps_the_first_accepted_candidate_and_counts_the_rejected(self):
    pcfg = PromptConfig(max_prompt_tokens=256, exemplar=False, max_words=60, history="prefix")
    decoding = local_generation.Decoding(max_tokens=48, temperature=0.9, top_p=0.9,
                                         repetition_penalty=1.0, no_repeat_ngram=4, candidates=3,
                                         batch_size=8, seed=0)
    count = lambda messages: len(rationales.chat_ids(self.tokenizer, messages))
    requests = rationales.build_requests(self.prepared, pcfg, count, max_users=8, local=True)
    cache = pathlib.Path(self.create_tempdir().full_path) / layout.CACHE
    log = io.StringIO()  # not a terminal: progress comes as lines
    with rationales.CacheWriter(cache) as writer, contextlib.redirect_stderr(log):
      local_generation.generate_local(requests, decoding, pcfg, Llama(self.config),
                                      {"params": self.params}, self.tokenizer, "smollm2", writer)
    self.assertIn("smollm2: 3 candidate(s) at most: 8/8 request", log.getvalue())
    records = rationales.read_cache(cache)
    by_user = {r["user_id"]: r for r in records}
    self.assertCountEqual([r["user_id"] for r in records], [q.user_id for q in requests])
    for request, r in ((q, by_user[q.user_id]) for q in requests):
      rejected = sum(r["rejections"].values())
      if r["status"] == "ok":  # accepted at the first candidate that passed
        self.assertEqual(r["attempts"], rejected + 1)
        self.assertIsNone(quality.rejection(r["text"], False, request.history_attributes, pcfg))
        self.assertTrue(r["text"].startswith("Step 1:"))
      else:
        self.assertEqual((r["attempts"], rejected), (3, 3))
        self.assertEqual(r["error"], "rejected: " + quality.rejection(
            r["rejected_text"], r["finish_reason"] == "length", request.history_attributes, pcfg))
    summary = rationales.summarize(requests, records, "smollm2")
    self.assertEqual(summary["candidates"], sum(r["attempts"] for r in records))
    self.assertEqual(sum(summary["rejections"].values()),
                     summary["candidates"] - summary["ok"])
    self.assertGreater(summary["ok"], 0)
    self.assertGreater(sum(summary["rejections"].values()), 0)  # both branches ran


class KillTest(absltest.TestCase):

  def test_sigkill_mid_generation_then_rerun_writes_each_user_once(self):
    directory = pathlib.Path(self.create_tempdir().full_path)
    bigram_fixture(directory)
    child = textwrap.dedent("""
        import pathlib, sys
        from slim_jax import assets, teacher
        from slim_jax.config import DataConfig
        from slim_jax.data import formats, preprocess
        from slim_jax.prompts import PromptConfig
        from slim_jax.teacher import TeacherConfig
        directory = pathlib.Path(sys.argv[1])
        prepared = preprocess.prepare(
            formats.read_dataset("recbole", assets.path("ml-100k"), "raise"), DataConfig())
        teacher.run_teacher(TeacherConfig(kind="local", checkpoint=str(directory / "bigram"),
                                          max_tokens=4, batch_size=1, temperature=0.0,
                                          max_users=USERS),
                            PromptConfig(exemplar=False), prepared, directory / "out")
        """).replace("USERS", str(USERS))
    run = lambda: subprocess.Popen([sys.executable, "-c", child, str(directory)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = directory / "out" / layout.CACHE
    process = run()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not (
        cache.exists() and cache.read_text().count("\n") >= 2):
      time.sleep(0.05)
    self.assertIsNone(process.poll(), "the run ended before it could be killed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(rationales.read_cache(cache))
    self.assertBetween(written, 2, USERS - 1)
    rerun = run()
    _, stderr = rerun.communicate(timeout=240)
    self.assertEqual(rerun.returncode, 0, stderr.decode()[-2000:])
    prepared = preprocess.prepare(formats.read_dataset("recbole", assets.path("ml-100k")),
                                  DataConfig())
    users = collections.Counter(r["user_id"] for r in rationales.read_cache(cache))
    self.assertEqual(users, collections.Counter(map(str, prepared.user_ids[:USERS])))


if __name__ == "__main__":
  absltest.main()
