"""Several JAX processes, one work directory: who decides, who writes, and how files appear.

On a pod or cluster every host runs launch.py over one work directory that every host sees.
Process 0 (the writer) alone makes the decisions that touch files (skip, restart, resume) and
writes every file, each under a temporary name unique to the process and then renamed into place,
so a reader (another process, a rerun after a kill) sees a file whole or not at all. The other
processes compute alongside where a stage needs every device (a mesh spanning the processes) and
wait at a barrier otherwise. In a single process every function here is the ordinary local act.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_writer() -> bool:
  """Whether this process writes the work directory's files (and logs): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def writer_decides(value: int) -> int:
  """The writer's `value` on every process, so that all of them follow one decision."""
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def writer_decides_mask(mask) -> np.ndarray:
  """The writer's bool `mask` (of the same length on every process) on every process."""
  return multihost_utils.broadcast_one_to_all(np.asarray(mask, bool))


def temporary(path: pathlib.Path) -> pathlib.Path:
  """A name beside `path`, unique to this process on a filesystem shared by hosts, that keeps
  `path`'s suffix (np.save and savefig pick their format by it)."""
  return path.with_name(f".{path.stem}.p{jax.process_index()}.{os.getpid()}.tmp{path.suffix}")


def leftover_temporaries(path: pathlib.Path) -> list[pathlib.Path]:
  """The temporary names of `path` (any process's) that a write killed outright left behind:
  no rename ever reads them, so a rerun may delete them."""
  return sorted(path.parent.glob(f".{path.stem}.p*.tmp{path.suffix}"))


def write(path: str | pathlib.Path, save: Callable[[pathlib.Path], object]) -> None:
  """On the writer, `save(temporary name)` and then a rename to `path`; elsewhere nothing."""
  if not is_writer():
    return
  path = pathlib.Path(path)
  staged = temporary(path)
  try:
    save(staged)
    os.replace(staged, path)
  finally:
    staged.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str) -> None:
  write(path, lambda staged: staged.write_text(text, encoding="utf-8"))

