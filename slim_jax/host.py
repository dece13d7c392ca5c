"""Host-process settings that XLA trains and starts faster with."""

from __future__ import annotations

import ctypes
import ctypes.util
import pathlib

import jax

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
  """Make glibc keep freed buffers of up to `limit` bytes for reuse instead of unmapping them.

  XLA:CPU allocates a step's temporaries and outputs afresh at every call. glibc serves large
  ones with mmap and unmaps them when freed, so each step page-faults through new memory: a
  third of an SRGNN training step on ml-100k (docs/benchmarks.md, 2026-11-30). Served from a heap
  that is never trimmed, they are reused, as TPU hosts do with tcmalloc. The process keeps its
  peak memory. Returns False, changing nothing, where glibc's mallopt is missing (macOS, musl).
  """
  library = ctypes.util.find_library("c")
  mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
  if mallopt is None:
    return False
  settings = ((_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit), (_M_TOP_PAD, 256 << 20))
  return all([mallopt(option, value) == 1 for option, value in settings])


def cache_compilations(directory: str | pathlib.Path) -> None:
  """Keep every compiled XLA program that took a second or more to compile in `directory`, for
  the next process with the same program (JAX's persistent compilation cache).

  Compiling a model's programs (a LLaMA's decode loop, its LoRA step, a recommender's step)
  takes seconds to tens of seconds on a CPU, a large share of a short run; a rerun, a resumed
  run, a sweep over seeds or the other processes of a test suite load them instead.
  """
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(directory).expanduser()))
