"""What a run prints: our INFO lines (stages, resumes, metrics), everyone's warnings, and other
libraries' INFO lines only when asked for with --verbosity=1 or more.

Orbax alone writes most of a run's lines at INFO (one per checkpoint step and file). Orbax, grain
and JAX log as we do, through absl.logging (one logger, 'absl', for every library that imports
it) or Python's logging, so a logger's name cannot tell their records from ours; the file that
logged can.
"""

from __future__ import annotations

import logging
import os
import pathlib

from absl import logging as absl_logging

PACKAGE = str(pathlib.Path(__file__).parent) + os.sep  # every slim_jax module's file is below


def shown(record: logging.LogRecord, ours: tuple[str, ...]) -> bool:
  """Whether a record is printed below --verbosity=1: a warning or worse from anyone, INFO only
  from a file whose path starts with one of `ours` (directories ending in a separator, files)."""
  return record.levelno >= logging.WARNING or record.pathname.startswith(ours)


def hide_third_party_info(program: str) -> None:
  """Below --verbosity=1, drops INFO records of files other than slim_jax's and `program` (the
  entry point's __file__). Call it in the main of an absl app, before JAX starts its backends
  (their INFO lines come then): app.run puts absl's handler on the root logger, so every
  library's records pass through it."""
  if absl_logging.get_verbosity() < 1:
    ours = (PACKAGE, program)
    absl_logging.get_absl_handler().addFilter(lambda record: shown(record, ours))
