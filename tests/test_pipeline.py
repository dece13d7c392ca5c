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
import tempfile
import time

import numpy as np
from absl.testing import absltest

from slim_jax.checkpoints import hf
from tests import fake_openai_server as fake
from tests.fixtures import TINY_LLAMA as CONFIG, random_params, word_tokenizer

ROOT = pathlib.Path(__file__).parent.parent
GENRES = ("Drama", "Comedy", "Action")


def write_recbole(directory: pathlib.Path, users: int = 16, items: int = 12) -> pathlib.Path:
  """tiny.inter and tiny.item in RecBole's atomic format: users favour one genre."""
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True)
  lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  for user in range(users):
    liked = [i for i in range(items) if i % len(GENRES) == user % len(GENRES)]
    for t, item in enumerate(rng.choice(liked + list(range(items)), 6 + user % 4)):
      lines.append(f"{user}\t{item}\t4\t{1000 * user + t}")
  (directory / "tiny.inter").write_text("\n".join(lines) + "\n")
  items_text = ["item_id:token\tmovie_title:token_seq\tclass:token_seq"]
  items_text += [f"{i}\tItem i{i}\t{GENRES[i % len(GENRES)]}" for i in range(items)]
  (directory / "tiny.item").write_text("\n".join(items_text) + "\n")
  return directory


CONFIG_FILE = '''
from slim_jax.config import Config, DataConfig
from slim_jax.encode import EncoderConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.prompts import PromptConfig
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig
from slim_jax.train.distill import DistillConfig


def get_config():
  return Config(
      name="tiny", data=DataConfig(name="tiny", path={data!r}),
      prompt=PromptConfig(domain="generic", max_prompt_tokens=192, exemplar=False),
      teacher=TeacherConfig(kind="openai", base_url={url!r}, api_key_env="", max_tokens=64,
                            concurrency=2, backoff_s=0.01),
      distill=DistillConfig(checkpoint={model!r}, lora_rank=4, lora_alpha=8.0, steps=4,
                            batch_size=8, lr=2e-2, warmup_steps=1, max_rationale_tokens=48,
                            buckets=(256,), heldout_fraction=0.25, eval_every=2,
                            checkpoint_every=2, dtype="float32", base_dtype="float32"),
      student=StudentConfig(max_tokens=8, batch_size=8, dtype="float32", temperature=1.0,
                            keep_rejected=True),
      encoder=EncoderConfig(kind="minilm", batch_size=8),
      rec=RecConfig(backbone="gru4rec", hidden=16, max_len=10, gru_hidden=16, batch=16,
                    eval_batch=16, epochs=6, eval_every=2, sampled_negatives=5))
'''


class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()))
    data = write_recbole(cls.root / "tiny")
    words = ["system", "user", "assistant", *"Step 1 2 3 The liked and lately More of what "
             "items have in common Something like Prompt Item Genres . : |".split(),
             *[f"i{i}" for i in range(12)], *GENRES]
    # Filler words up to the model's vocabulary (3 ids are special tokens), so that every token
    # a random student writes decodes to text.
    words += [f"w{i:03d}" for i in range(CONFIG.vocab_size - 3 - len(set(words)))]
    tokenizer = word_tokenizer([" ".join(words)])
    model = hf.save_hf(cls.root / "student", CONFIG, random_params(CONFIG), tokenizer)
    cls.server = fake.FakeOpenAI(fault_rate=0.0).__enter__()
    cls.config = cls.root / "tiny_config.py"
    cls.config.write_text(CONFIG_FILE.format(data=str(data), url=cls.server.url,
                                             model=str(model)))

  @classmethod
  def tearDownClass(cls):
    cls.server.__exit__(None, None, None)
    super().tearDownClass()

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
