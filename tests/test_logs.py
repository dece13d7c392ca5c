"""Which log records a run prints below --verbosity=1 (launch.py's runs in test_launch and
test_pipeline show it end to end)."""

import logging
import pathlib

from absl import logging as absl_logging
from absl.testing import absltest

from slim_jax import logs, pipeline

PROGRAM = str(pathlib.Path(logs.PACKAGE).parent / "launch.py")


def record(level: int, pathname: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


class ShownTest(absltest.TestCase):

  def test_our_info_and_everyones_warnings(self):
    ours = (logs.PACKAGE, PROGRAM)
    other = absl_logging.__file__  # a library that logs through absl, as orbax and grain do
    self.assertTrue(logs.shown(record(logging.INFO, pipeline.__file__), ours))
    self.assertTrue(logs.shown(record(logging.INFO, PROGRAM), ours))
    self.assertFalse(logs.shown(record(logging.INFO, other), ours))
    self.assertFalse(logs.shown(record(logging.INFO, logs.PACKAGE[:-1] + "_extra/x.py"), ours))
    self.assertTrue(logs.shown(record(logging.WARNING, other), ours))
    self.assertTrue(logs.shown(record(logging.ERROR, other), ours))


if __name__ == "__main__":
  absltest.main()
