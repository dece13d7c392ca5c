"""The whole pipeline through launch.py on a tiny synthetic dataset with a tiny random student:
every stage's artifacts, the report, a run killed in the train stage that resumes to the
numbers of an uninterrupted one, and data prepared again with fewer users, whose rows shift,
reading every rationale on its own user's row from the caches.

The uninterrupted run is the one that the test modules share (fixtures.tiny_run). The teacher is
the fault-injecting OpenAI-compatible server (no faults here), since a random student never
writes a complete rationale; everything else is the project's own code.
"""

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
from absl.testing import absltest

from slim_jax import encode, pipeline, prompts, rationales
from slim_jax.config import Config
from slim_jax.data import preprocess
from slim_jax.prompts import PromptConfig
from tests.fixtures import ROOT, STAGES, TinyPipelineTest, launch_args, third_party_info


class PipelineTest(TinyPipelineTest):

  def launch(self, workdir: pathlib.Path, wait: bool = True, stages=STAGES, *overrides):
    args = launch_args(self.tiny.config, workdir, stages, *overrides)
    if not wait:  # output to a file: an unread pipe would fill up and block the process
      log = open(workdir.with_suffix(".log"), "w")
      self.addCleanup(log.close)
      return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    self.assertEqual(result.returncode, 0, result.stderr[-4000:])
    return result

  def test_whole_pipeline_and_resume_after_kill(self):
    whole = self.tiny.workdir
    for artifact in ("teacher/rationales.jsonl", "distill/adapter/adapter_model.safetensors",
                     "generate/rationales.jsonl", "encode/item_vectors.npy",
                     "encode/rationales_student.npz", "encode/rationales_teacher.npz",
                     "report/report.md",
                     "report/popularity.png", "report/sparsity.png"):
      self.assertTrue((whole / artifact).is_file(), artifact)
    for stage in STAGES:
      self.assertIn(f"stage {stage}: running into {whole / stage}\n", self.tiny.log)
    self.assertEqual(third_party_info(self.tiny.log), [])  # orbax checkpoints distill and train
    # One per history of the causal schedule: cut-offs, seq[:-2] and seq[:-1] of 16 users.
    histories = prompts.visible_histories(pipeline.load_prepared(whole),
                                          prompts.history_splits(PromptConfig()))
    self.assertLen((whole / "generate" / "rationales.jsonl").read_text().splitlines(),
                   len(list(histories)))
    trained = json.loads((whole / "train" / "metrics.json").read_text())
    self.assertEqual(list(trained), [
        "gru4rec_plain", "gru4rec_item_text", "gru4rec_item_text_permuted", "gru4rec_id_based",
        "gru4rec_shuffled", "gru4rec_constant_rationale", "gru4rec_history_text",
        "gru4rec_teacher_rationales", "id_agnostic", "zero_shot", "popularity"])
    report = (whole / "report" / "report.md").read_text()
    for heading in ("## Accuracy", "## Paired tests", "## Popularity bias",
                    "## User sparsity groups", "## Leak audit", "## Cost", "## Example users",
                    "gru4rec_id_based", "zero_shot"):
      self.assertIn(heading, report)
    accuracy = report.split("## Accuracy (test)\n\n")[1].splitlines()[0]
    self.assertLessEqual(accuracy.count("|") - 1, 10)  # metrics only; the tests have a table
    self.assertIn("| gru4rec_id_based | gru4rec_shuffled | full ranking |", report)

    # Killed in the train stage, from the shared run's stages before it, and run again.
    killed = self.root / "killed"
    for stage in STAGES[:STAGES.index("train")]:
      shutil.copytree(whole / stage, killed / stage)
    process = self.launch(killed, wait=False)
    checkpoints = killed / "train" / "gru4rec_id_based" / "checkpoints"
    deadline = time.monotonic() + 600
    while not checkpoints.is_dir() and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    self.assertFalse((killed / "train" / "DONE").exists())
    resumed = self.launch(killed)
    self.assertIn("stage distill: complete", resumed.stderr)
    self.assertEqual(json.loads((killed / "train" / "metrics.json").read_text()), trained)

    # Prepared again with a filter that drops users: the kept users' rows shift, their prompts do
    # not. The caches answer every request, and every rationale stays its own user's.
    before = preprocess.load(whole / "prepare")
    vectors_before = encode.load_rationales(whole / "encode", "student")
    fewer = self.root / "fewer"
    shutil.copytree(whole, fewer)  # the shared run stays as it was
    requests = sum(self.tiny.server.requests.values())
    self.launch(fewer, True, ("prepare", "teacher", "generate", "encode"), "--set",
                "data.user_core=8")
    after = preprocess.load(fewer / "prepare")
    self.assertLess(after.num_users, before.num_users)
    self.assertFalse(np.array_equal(after.user_ids, before.user_ids[:after.num_users]))
    self.assertEqual(sum(self.tiny.server.requests.values()), requests)
    self.assertEqual(json.loads((fewer / "generate" / "DONE").read_text())["summary"]
                     ["generated"], 0)
    texts = lambda path: {(row["user_id"], row["split"]): row["text"]
                          for row in rationales.read_rationales(path)}
    old, new = (texts(directory / "generate" / "rationales.jsonl") for directory in (whole, fewer))
    self.assertEqual({user for user, _ in new}, set(after.user_ids))
    self.assertEqual(new, {key: text for key, text in old.items() if key[0] in after.user_ids})
    table, present = encode.load_encoded(fewer / "encode", after).rationales["valid"]
    self.assertTrue(present.all())
    for row, user_id in enumerate(after.user_ids):
      (source,) = np.flatnonzero((vectors_before["user_ids"] == user_id)
                                 & (vectors_before["splits"] == "valid"))
      np.testing.assert_allclose(table[row], vectors_before["vectors"][source], atol=1e-6)


class StageDecisionTest(absltest.TestCase):

  def test_a_new_artifact_layout_runs_a_complete_stage_again(self):
    out = pathlib.Path(self.create_tempdir().full_path) / "stage"
    old = pipeline.Stage("stage", lambda cfg, out: {}, ("data",))
    cfg = Config()
    self.assertEqual(pipeline._prepare_stage(old, cfg, out), pipeline._RUN)
    (out / "DONE").write_text(json.dumps({"config": pipeline._fingerprint(cfg, old)}))
    self.assertEqual(pipeline._prepare_stage(old, cfg, out), pipeline._SKIP)
    self.assertEqual(pipeline._prepare_stage(dataclasses.replace(old, artifacts=1), cfg, out),
                     pipeline._RUN)
    self.assertFalse((out / "DONE").exists())


if __name__ == "__main__":
  absltest.main()
