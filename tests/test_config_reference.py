"""docs/config.md: current, complete, and each row carrying its field's comments."""

import dataclasses
import inspect
import pathlib

from absl.testing import absltest

from slim_jax import config, config_reference
from slim_jax.models.recommender import RecConfig

ROOT = pathlib.Path(__file__).parent.parent


@dataclasses.dataclass(frozen=True)
class Inner:
  """Nested."""
  depth: int = 2  # how | deep


@dataclasses.dataclass(frozen=True)
class Section:
  """A section with every comment layout."""
  # first,
  # second
  lr: float = 1e-3  # and trailing
  names: tuple[str, ...] = ("a", "b")

  # detached by the blank line below

  plain: int | None = None
  inner: Inner = Inner()


@dataclasses.dataclass(frozen=True)
class Derived(Section):
  extra: str = ""  # declared by the subclass


def row(text: str, key: str) -> str:
  """The table row of `key` in rendered markdown."""
  (line,) = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
  return line


def source_comment(cls: type, name: str) -> str:
  """The trailing comment of field `name`, else the comment line above it, read from the source
  line by line (independently of the ast / tokenize reading under test)."""
  lines = inspect.getsource(cls).splitlines()
  (i,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
  trailing = lines[i].partition("  # ")[2]
  above = lines[i - 1].strip()
  return trailing or (above[1:].strip() if above.startswith("#") else "")


class ConfigReferenceTest(absltest.TestCase):

  def test_docs_file_is_current(self):
    path = ROOT / "docs" / "config.md"
    self.assertTrue(path.is_file(), f"{path} is missing: run `{config_reference.COMMAND}`")
    self.assertMultiLineEqual(
        path.read_text(), config_reference.render(),
        f"docs/config.md is out of date: run `{config_reference.COMMAND}`")

  def test_every_overridable_key_has_a_row(self):
    text = config_reference.render()
    keys = config.field_paths(config.Config())
    self.assertContainsSubset({"name", "preset", "rec.lr", "slim.modes"}, keys)
    for key in keys:
      with self.subTest(key):
        row(text, key)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    self.assertLen(rows, len(keys))

  def test_known_comments_land_in_their_rows(self):
    text = config_reference.render()
    found = {name: source_comment(RecConfig, name) for name in ("lr", "ema_decay", "backbone")}
    self.assertTrue(any(found.values()), "none of the fields has a comment left to look for")
    for name, comment in found.items():
      with self.subTest(name):
        self.assertIn(comment.replace("|", r"\|"), row(text, f"rec.{name}"))

  def test_comment_layouts(self):
    text = "\n".join(config_reference.rows(Derived(), "s."))
    self.assertEqual(row(text, "s.lr"),
                     "| `s.lr` | `float` | `0.001` | first, second and trailing |")
    self.assertEqual(row(text, "s.names"), "| `s.names` | `tuple[str, ...]` | `a, b` |  |")
    self.assertEqual(row(text, "s.plain"), r"| `s.plain` | `int \| None` | `None` |  |")
    self.assertEqual(row(text, "s.inner.depth"),
                     r"| `s.inner.depth` | `int` | `2` | how \| deep |")
    self.assertEqual(row(text, "s.extra"),
                     "| `s.extra` | `str` | `''` | declared by the subclass |")
    self.assertEqual(config_reference.section("s", Derived, []).splitlines()[2],
                     "| key | type | default | meaning |")  # no docstring of its own: no paragraph

  def test_check_fails_on_a_stale_file(self):
    path = pathlib.Path(self.create_tempdir().full_path) / "config.md"
    self.assertEqual(config_reference.main(["--write", str(path)]), 0)
    self.assertEqual(config_reference.main(["--check", str(path)]), 0)
    path.write_text(path.read_text().replace("| `rec.lr` |", "| `rec.learning_rate` |"))
    self.assertEqual(config_reference.main(["--check", str(path)]), 1)


if __name__ == "__main__":
  absltest.main()
