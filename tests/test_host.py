"""Host-process settings."""

import platform

from absl.testing import absltest

from slim_jax import host


class HostTest(absltest.TestCase):

  def test_glibc_keeps_freed_memory(self):
    """On glibc (Linux CI, TPU hosts) every mallopt setting must take; elsewhere nothing changes."""
    self.assertEqual(host.keep_freed_memory(), platform.libc_ver()[0] == "glibc")


if __name__ == "__main__":
  absltest.main()
