"""Host-process settings."""

import os
import pathlib
import platform
import subprocess
import sys
import textwrap

from absl.testing import absltest

from slim_jax import host

ROOT = pathlib.Path(__file__).parent.parent


class HostTest(absltest.TestCase):

  def test_glibc_keeps_freed_memory(self):
    """On glibc (Linux CI, TPU hosts) every mallopt setting must take; elsewhere nothing changes."""
    self.assertEqual(host.keep_freed_memory(), platform.libc_ver()[0] == "glibc")

  def test_compiled_programs_are_kept_for_the_next_process(self):
    directory = pathlib.Path(self.create_tempdir().full_path) / "xla"
    program = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from slim_jax import host
        host.cache_compilations({str(directory)!r})
        print(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).sum())
        """)
    # every program is kept, not only those that compile for a second or more
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run = lambda: subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
    first = run()
    self.assertEqual(first.returncode, 0, first.stderr[-2000:])
    kept = sorted(p.name for p in directory.iterdir())
    self.assertNotEmpty(kept)
    second = run()
    self.assertEqual((second.returncode, second.stdout), (0, first.stdout))
    self.assertEqual(sorted(p.name for p in directory.iterdir()), kept)  # read, not rewritten


if __name__ == "__main__":
  absltest.main()
