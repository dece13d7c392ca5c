"""Progress bars: tqdm on a terminal, a few whole lines in a log."""

import io
from unittest import mock

from absl.testing import absltest

from slim_jax import progress


class Terminal(io.StringIO):

  def isatty(self):
    return True


class ProgressTest(absltest.TestCase):

  def test_a_log_gets_a_line_every_interval_and_one_at_the_end(self):
    log, clock = io.StringIO(), [1000.0]
    with mock.patch("tqdm.std.time", lambda: clock[0]):
      with progress.bar(1001, "train", "step", file=log) as bar:
        for step in range(1001):  # 0.5 s a step: 500 s, a line every 30 s
          clock[0] += 0.5
          bar.update()
          bar.set_postfix({"ndcg@10": f"{step / 1000:.4f}"}, refresh=False)
    lines = log.getvalue().splitlines()
    self.assertNotIn("\r", log.getvalue())
    self.assertLen(lines, 500 // 30 + 1)
    self.assertStartsWith(lines[0], "train: 60/1001 step [00:30<")
    self.assertStartsWith(lines[-1], "train: 1001/1001 step [08:20<00:00")
    self.assertIn("ndcg@10=1.0000", lines[-1])

  def test_a_short_loop_logs_its_end_only_and_a_disabled_bar_nothing(self):
    for disable, expected in ((False, 1), (True, 0)):
      log = io.StringIO()
      with progress.bar(3, "encode", file=log, disable=disable) as bar:
        for _ in range(3):
          bar.update()
      self.assertLen(log.getvalue().splitlines(), expected)

  def test_a_terminal_gets_the_tqdm_bar(self):
    screen = Terminal()
    with progress.bar(3, "encode", file=screen) as bar:
      bar.update(3)
    self.assertIn("\r", screen.getvalue())
    self.assertIn("3/3", screen.getvalue())


if __name__ == "__main__":
  absltest.main()
