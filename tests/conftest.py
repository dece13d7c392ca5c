"""pytest entry: importing the tests package sets XLA_FLAGS before any test imports JAX."""

from absl import flags

import tests  # noqa: F401

# absltest helpers (create_tempdir, ...) read flags, which pytest never parses.
flags.FLAGS.mark_as_parsed()
