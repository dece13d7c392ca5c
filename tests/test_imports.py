"""How slim_jax's modules import each other: no cycle, configs without the heavy runtimes, and
no command-line flag defined on import."""

import ast
import json
import pathlib
import subprocess
import sys

from absl import flags
from absl.testing import absltest

from slim_jax import pipeline, sampler  # noqa: F401  (every module, the one program among them)

ROOT = pathlib.Path(__file__).parent.parent
# Runtimes that only a stage's work needs, never reading or checking a config.
HEAVY = ("transformers", "tokenizers", "torch", "orbax", "tensorboardX", "grain", "scipy")


def module_graph() -> dict[str, set[str]]:
  """slim_jax module -> the slim_jax modules it imports, at the top or inside a function."""
  paths = {}
  for path in (ROOT / "slim_jax").rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in paths.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module)
        imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    graph[name] = {other for other in imported if other in paths and other != name}
  return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle of `graph` (its modules in order, the first repeated at the end), or []."""
  state, path = {}, []

  def visit(name: str) -> list[str]:
    state[name] = "open"
    path.append(name)
    for other in sorted(graph[name]):
      if state.get(other) == "open":
        return path[path.index(other):] + [other]
      if other not in state and (found := visit(other)):
        return found
    state[name] = "done"
    path.pop()
    return []

  for name in sorted(graph):
    if name not in state and (found := visit(name)):
      return found
  return []


def loaded_by(statement: str) -> list[str]:
  """The modules in sys.modules after `statement` runs in a fresh interpreter."""
  code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=300)
  return json.loads(result.stdout.splitlines()[-1])


class ImportsTest(absltest.TestCase):

  def test_no_import_cycle(self):
    graph = module_graph()
    self.assertIn("slim_jax.config", graph)
    self.assertEqual(cycle(graph), [])
    self.assertEqual(cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])

  def test_importing_defines_no_flag(self):
    modules = flags.FLAGS.flags_by_module_dict()
    self.assertEqual([name for name in modules if name.startswith("slim_jax")], [])

  def test_configs_load_no_heavy_runtime(self):
    loaded = loaded_by("import slim_jax.config")
    self.assertEqual([m for m in loaded if m.split(".")[0] in HEAVY], [])

  def test_preprocessing_loads_no_stage(self):
    loaded = loaded_by("import slim_jax.data.preprocess")
    stages = ("slim_jax.teacher", "slim_jax.student", "slim_jax.train.distill", "slim_jax.encode")
    self.assertEqual([m for m in loaded if m in stages], [])


if __name__ == "__main__":
  absltest.main()
