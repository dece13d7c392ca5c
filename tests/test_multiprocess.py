"""launch.py as 2 JAX processes x 4 emulated CPU devices (jax.distributed over 127.0.0.1, gloo
collectives) against 1 process x 8 devices: the tiny pipeline of test_pipeline, stage by stage,
gives the same files, and every file is written once, by process 0. The one process goes on from
the shared run (fixtures.tiny_run): its stages up to encode read no recommender setting, so they
stay complete, and its train and report run again with the two processes' smaller settings.

A hang (a collective that one process never joins) is a failure: each run has a deadline.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time

import numpy as np
import safetensors.numpy
from absl.testing import absltest

from slim_jax import rationales
from tests.fixtures import ROOT, STAGES, TinyPipelineTest, launch_args

DEVICES = 8
SMALLER = ("--set=rec.epochs=2", "--set=slim.modes=plain,id_based")  # both runs train these
DEADLINE_S = 900  # a hang becomes a failure
# Both runs reduce gradients over 8 devices, in another order across processes (gloo) than
# within one: float32 rounding, grown by a few Adam steps (measured: 5e-7 on weights up to 0.14).
ADAPTER_ATOL = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class MultiprocessTest(TinyPipelineTest):

  def launch(self, workdir: pathlib.Path, processes: int) -> tuple[list[str], float]:
    """Runs every stage as `processes` processes sharing DEVICES; returns (each process's log,
    wall seconds); fails on a nonzero exit or a run past the deadline."""
    env = {**os.environ,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes}"}
    args = launch_args(self.tiny.config, workdir, STAGES, *SMALLER)
    if processes > 1:
      args += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    logs = [workdir.with_name(f"{workdir.name}.{i}.log") for i in range(processes)]
    start, running = time.monotonic(), []
    for i, log in enumerate(logs):
      with open(log, "w") as out:  # a file: an unread pipe would fill up and block the process
        running.append(subprocess.Popen(args + ([f"--process_id={i}"] if processes > 1 else []),
                                        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
      codes = [p.wait(timeout=max(1.0, DEADLINE_S - (time.monotonic() - start)))
               for p in running]
    except subprocess.TimeoutExpired:
      self.fail(f"{processes} processes still running after {DEADLINE_S} s (a hang?)")
    finally:
      for p in running:
        if p.poll() is None:
          p.kill()
          p.wait()
    texts = [log.read_text() for log in logs]
    for i, (code, text) in enumerate(zip(codes, texts)):
      self.assertEqual(code, 0, f"process {i}:\n{text[-4000:]}")
    return texts, time.monotonic() - start

  def test_two_processes_equal_one(self):
    one, two = self.root / "one", self.root / "two"
    shutil.copytree(self.tiny.workdir, one)
    logs, one_s = self.launch(one, 1)
    self.assertIn("stage encode: complete", logs[0])
    self.assertIn("stage train: running into", logs[0])
    server = self.tiny.server
    server.requests.clear()
    _, two_s = self.launch(two, 2)
    self.assertEqual(server.requests, self.tiny.requests)
    self.assertEqual(set(server.requests.values()), {1})  # each request sent once

    self.assertEqual((two / "teacher/rationales.jsonl").read_text(),
                     (one / "teacher/rationales.jsonl").read_text())
    # The student's rows carry a hash of its adapter's bytes, which differ in their last bits.
    unlabelled = lambda w: [{k: v for k, v in row.items() if k != "model"} for row in
                            rationales.read_rationales(w / "generate/rationales.jsonl")]
    self.assertEqual(unlabelled(two), unlabelled(one))
    adapters = [safetensors.numpy.load_file(w / "distill/adapter/adapter_model.safetensors")
                for w in (one, two)]
    self.assertEqual(adapters[0].keys(), adapters[1].keys())
    adapter_diff = max(float(np.max(np.abs(adapters[0][k] - adapters[1][k])))
                       for k in adapters[0])
    self.assertLessEqual(adapter_diff, ADAPTER_ATOL)
    metrics = [json.loads((w / "train/metrics.json").read_text()) for w in (one, two)]
    self.assertEqual(list(metrics[0]), list(metrics[1]))
    for variant, row in metrics[0].items():
      for name, value in row["test"].items():
        if isinstance(value, float):
          self.assertAlmostEqual(metrics[1][variant]["test"][name], value, delta=1e-5,
                                 msg=f"{variant} {name}")
    for stage in STAGES:
      self.assertTrue((two / stage / "DONE").is_file(), stage)
    self.assertEqual([p for p in two.rglob("*") if ".tmp" in p.name], [])

    server.requests.clear()
    logs, _ = self.launch(two, 2)
    for stage in STAGES:
      self.assertIn(f"stage {stage}: complete", logs[0])
    self.assertNotIn("running into", logs[0])
    self.assertEqual(sum(server.requests.values()), 0)
    print(json.dumps({"adapter_max_abs_diff": adapter_diff, "one_process_train_report_s": one_s,
                      "two_processes_s": two_s}))


if __name__ == "__main__":
  absltest.main()
