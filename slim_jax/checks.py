"""The value checks config sections' `checked()` run at start-up, worded alike for every section.

`pipeline.run` calls `Config.checked()` before the first stage, so a bad value fails there
instead of in the stage that first reads it, hours into a run.
"""

from __future__ import annotations

from collections.abc import Iterable

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # of weights and activations


def one_of(key: str, value, choices: Iterable) -> None:
  """`value` (of the dotted config `key`) is one of `choices`."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{key}={value!r}: expected one of {choices}")


def within(cfg, section: str, interval: str, *names: str) -> None:
  """Each named field of `cfg` lies in `interval`, written as in mathematics: "[1, inf)" a
  count, "(0, inf)" a positive rate, "[0, 1)" a share. A tuple field needs one value at least,
  each in `interval`; None (a default the code fills in later) passes."""
  low, high = (float(bound) for bound in interval[1:-1].split(","))

  def inside(value) -> bool:
    return ((low < value if interval[0] == "(" else low <= value)
            and (value < high if interval[-1] == ")" else value <= high))

  for name in names:
    value = getattr(cfg, name)
    values = value if isinstance(value, tuple) else (value,)
    if value is not None and not (values and all(inside(v) for v in values)):
      what = "values" if isinstance(value, tuple) else "a value"
      raise ValueError(f"{section}.{name}={value}: expected {what} in {interval}")
