"""launch.py end to end: stages, artifacts, skipping complete stages, override errors, what a run
logs."""

import json
import pathlib
import subprocess
import sys

from absl.testing import absltest

from tests.fixtures import ROOT, third_party_info


def _launch(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=600)


class LaunchTest(absltest.TestCase):

  def test_fetch_and_prepare_the_embedded_default(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    result = _launch("--stages=fetch,prepare", f"--workdir={workdir}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    stats = json.loads((workdir / "prepare" / "stats.json").read_text())
    self.assertEqual((stats["users"], stats["items"], stats["interactions"]), (943, 1682, 100_000))
    self.assertIn('"interactions": 100000', result.stdout)
    config = json.loads((workdir / "config.json").read_text())
    self.assertEqual(config["data"]["name"], "ml-100k")
    self.assertIn(f"stage prepare: running into {workdir / 'prepare'}\n", result.stderr)
    self.assertNotRegex(result.stderr, r"(?m)^W\d{4} ")  # no warning on a fresh directory
    self.assertEqual(third_party_info(result.stderr), [])

    done = workdir / "prepare" / "DONE"
    written = done.stat().st_mtime_ns
    again = _launch("--stages=prepare", f"--workdir={workdir}", "--verbosity=1")
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertIn("complete", again.stderr)
    self.assertIn("xla_bridge.py", third_party_info(again.stderr))  # JAX starting its backends
    self.assertEqual(done.stat().st_mtime_ns, written)

    changed = _launch("--stages=prepare", f"--workdir={workdir}", "--set", "data.user_core=30")
    self.assertEqual(changed.returncode, 0, changed.stderr[-3000:])
    self.assertLess(json.loads((workdir / "prepare" / "stats.json").read_text())["users"], 943)

  def test_unknown_override_fails_listing_valid_keys(self):
    result = _launch("--stages=prepare", f"--workdir={self.create_tempdir().full_path}",
                     "--set", "data.max_sq_len=3")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("valid keys", result.stderr)
    self.assertIn("data.item_text_max_chars", result.stderr)

  def test_a_bad_value_fails_before_anything_is_written(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    result = _launch(f"--workdir={workdir}", "--set", "slim.modes=plain,item_txt")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("slim.modes='item_txt': expected one of", result.stderr)
    self.assertEqual(list(workdir.iterdir()), [])

  def test_unknown_stage(self):
    result = _launch("--stages=nope", f"--workdir={self.create_tempdir().full_path}")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("unknown stage 'nope'", result.stderr)


if __name__ == "__main__":
  absltest.main()
