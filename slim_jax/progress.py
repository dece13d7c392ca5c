"""Progress of long loops that reads well on a terminal and in a log file.

On a terminal it is tqdm's bar, redrawn in place. Written to a file (CI, a pod's log, nohup),
those redraws would be a stream of carriage returns, megabytes of bar updates, so there each
report is a plain line instead: one every `LOG_EVERY_S` seconds and one at the end.
"""

from __future__ import annotations

import sys
from typing import TextIO

import tqdm

from slim_jax import multihost

LOG_EVERY_S = 30.0
_LINE = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines(tqdm.tqdm):
  """tqdm that writes each report as a line of its own, and the final state when it closes."""

  def display(self, msg=None, pos=None):
    del pos
    if msg is None:  # tqdm passes a message only to erase a bar, which a line never needs
      self.fp.write(self.__str__() + "\n")
      self.fp.flush()
    return False  # nothing on screen for close() to erase

  def close(self):
    if not self.disable and self.n != self.last_print_n:
      self.display()
    self.leave = False  # so tqdm's close() erases (a no-op here) instead of redrawing the bar
    super().close()


def bar(total: int, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False,
        file: TextIO | None = None) -> tqdm.tqdm:
  """A tqdm bar on a terminal, log lines anywhere else; either is used as tqdm is (update,
  set_postfix(..., refresh=False), close, or as a context manager). Disabled on every process but
  process 0, which reports for the job."""
  file = sys.stderr if file is None else file
  disable = disable or not multihost.is_writer()
  if file.isatty():
    return tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                     file=file, dynamic_ncols=True)
  # miniters=1: check the clock at every update, so a slowing loop still reports on time.
  return _Lines(total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                mininterval=LOG_EVERY_S, delay=LOG_EVERY_S, miniters=1, bar_format=_LINE)
