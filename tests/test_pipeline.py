"""The whole pipeline through launch.py on a tiny synthetic dataset with a tiny random student:
every stage's artifacts, the report, and a run killed in the train stage that resumes to the
numbers of an uninterrupted one.

The teacher is the fault-injecting OpenAI-compatible server (no faults here), since a random
student never writes a complete rationale; everything else is the project's own code.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time

from absl.testing import absltest

from tests.fixtures import ROOT, TinyPipelineTest


class PipelineTest(TinyPipelineTest):

  def launch(self, workdir: pathlib.Path, wait: bool = True):
    args = [sys.executable, str(ROOT / "launch.py"), f"--config={self.config}",
            f"--workdir={workdir}", "--stages=prepare,teacher,distill,generate,encode,train,report"]
    if not wait:  # output to a file: an unread pipe would fill up and block the process
      log = open(workdir.with_suffix(".log"), "w")
      self.addCleanup(log.close)
      return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    self.assertEqual(result.returncode, 0, result.stderr[-4000:])
    return result

  def test_whole_pipeline_and_resume_after_kill(self):
    whole = self.root / "whole"
    self.launch(whole)
    for artifact in ("teacher/rationales.jsonl", "distill/adapter/adapter_model.safetensors",
                     "generate/rationales.jsonl", "encode/item_vectors.npy",
                     "encode/rationale_vectors_valid.npy", "report/report.md",
                     "report/popularity.png", "report/sparsity.png"):
      self.assertTrue((whole / artifact).is_file(), artifact)
    self.assertLen((whole / "generate" / "rationales.jsonl").read_text().splitlines(), 16)
    trained = json.loads((whole / "train" / "metrics.json").read_text())
    self.assertEqual(list(trained), ["gru4rec_plain", "gru4rec_item_text", "gru4rec_id_based",
                                     "gru4rec_shuffled", "gru4rec_teacher_rationales",
                                     "id_agnostic", "zero_shot", "popularity"])
    report = (whole / "report" / "report.md").read_text()
    for heading in ("## Accuracy", "## Popularity bias", "## User sparsity groups", "## Cost",
                    "## Example users", "gru4rec id_based", "zero_shot"):
      self.assertIn(heading, report)

    killed = self.root / "killed"
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
    self.assertEqual((killed / "generate" / "rationales.jsonl").read_text(),
                     (whole / "generate" / "rationales.jsonl").read_text())


if __name__ == "__main__":
  absltest.main()
