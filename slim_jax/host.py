"""Host-process settings that XLA on CPU trains faster with."""

from __future__ import annotations

import ctypes
import ctypes.util

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
