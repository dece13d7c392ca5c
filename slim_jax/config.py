"""The experiment config: `Config`, a section per pipeline stage, and `--set` overrides.

Configs are frozen dataclasses; experiments are Python files whose `get_config()` returns one.
This module is the composition root: it defines no section itself, but imports each from the
module whose code reads it (`DataConfig` from data/preprocess.py, `MeshConfig` from parallel.py,
`RecConfig` from models/recommender.py, ...), so a field is documented where it is used.
Importing a section is cheap, though its module holds the stage's code: the heavy runtimes
(transformers and torch, tokenizers, orbax, tensorboardX, grain) are imported only inside the
functions that use them (checkpoints.load, loop.run, ...), and tests/test_imports.py keeps it so.

`--set rec.backbone=gru4rec` style overrides are parsed against the field types, and
`Config.checked()` runs every section's own checks and the rules between sections, so a typo, a
wrong type or a bad value fails at start-up, before the first stage, instead of hours into a run.
`Config.resolved(workdir)` then fills in, once, what a config leaves to defaults (a backbone's
RecBole settings, the LLM and encoder checkpoints): stages receive that and derive nothing. The
stages' DONE files record the config as written, so a moved work directory stays complete.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import pathlib
import types
import typing
from collections.abc import Sequence

from slim_jax import layout
from slim_jax.data.preprocess import DataConfig
from slim_jax.embed import EncoderConfig
from slim_jax.export import ExportConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig
from slim_jax.parallel import MeshConfig
from slim_jax.prompts import PromptConfig, student_config
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig
from slim_jax.train.distill import DistillConfig, check_lengths


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment: a section per pipeline stage (each defined beside the code it configures)."""
  name: str = "ml100k_smollm2"
  preset: str = ""  # the argument get_config() was called with (e.g. quick | full)
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  prompt: PromptConfig = PromptConfig()
  teacher: TeacherConfig = TeacherConfig()
  distill: DistillConfig = DistillConfig()
  student: StudentConfig = StudentConfig()
  export: ExportConfig = ExportConfig()
  encoder: EncoderConfig = EncoderConfig()
  rec: RecConfig = RecConfig()
  slim: SlimConfig = SlimConfig()

  def checked(self) -> Config:
    """This config, or the first bad value: each section's `checked()`, then the rules
    between sections."""
    for section in dataclasses.fields(self):
      value = getattr(self, section.name)
      if dataclasses.is_dataclass(value):
        value.checked()
    if self.slim.finetune_encoder and self.encoder.kind != "minilm":
      raise ValueError(f"slim.finetune_encoder trains a MiniLM (BERT) encoder; encoder.kind is "
                       f"{self.encoder.kind!r}")
    check_lengths(self.distill, self.student_prompt)
    return self

  @property
  def student_prompt(self) -> PromptConfig:
    """The prompt section the student reads (distillation and generation alike)."""
    return student_config(self.prompt)

  def resolved(self, workdir: str | pathlib.Path) -> Config:
    """This config as the stages of `workdir` run it: checked, the backbone's defaults filled in,
    and every LLM checkpoint left empty pointed at the embedded one as the convert stage writes it
    into `workdir` (an empty MiniLM checkpoint is the embedded asset: `embed.checkpoint_dir`)."""
    self.checked()
    llm = lambda checkpoint: checkpoint or str(pathlib.Path(workdir) / layout.CONVERT /
                                               layout.EMBEDDED_LLM)
    encoder = (llm(self.encoder.checkpoint) if self.encoder.kind == "llm_pooled"
               else self.encoder.checkpoint)
    return dataclasses.replace(
        self, rec=self.rec.resolved(),
        teacher=dataclasses.replace(self.teacher, checkpoint=llm(self.teacher.checkpoint)),
        distill=dataclasses.replace(self.distill, checkpoint=llm(self.distill.checkpoint)),
        encoder=dataclasses.replace(self.encoder, checkpoint=encoder))


def load_config(path: str | pathlib.Path, preset: str | None = None) -> Config:
  """Runs `get_config()` (or `get_config(preset)`) from a Python config file, big_vision style."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"slim_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config()")
  if preset is None:
    return module.get_config()
  if not inspect.signature(module.get_config).parameters:
    raise ValueError(f"config file {path} has no presets; drop preset={preset}")
  return module.get_config(preset)


def from_flags(path: str | pathlib.Path, assignments: Sequence[str]) -> Config:
  """The config of `path` under `--set` assignments: `preset=...` chooses what get_config
  builds, then the other assignments override its fields (so they win over the preset)."""
  presets = [a.partition("=")[2].strip() for a in assignments
             if a.partition("=")[0].strip() == "preset"]
  others = [a for a in assignments if a.partition("=")[0].strip() != "preset"]
  return apply_overrides(load_config(path, presets[-1] if presets else None), others)


def field_paths(config) -> list[str]:
  """Every overridable dotted key of a (nested) config dataclass."""
  paths = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      paths += [f"{field.name}.{sub}" for sub in field_paths(value)]
    else:
      paths.append(field.name)
  return paths


def _parse(text: str, kind, key: str):
  """Parses an override value into the field's annotated type."""
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin in (typing.Union, types.UnionType):
    if text.lower() in ("none", "null") and type(None) in args:
      return None
    (kind,) = [a for a in args if a is not type(None)]
    return _parse(text, kind, key)
  if origin is tuple:
    item = args[0]
    return tuple(_parse(t.strip(), item, key) for t in text.split(",") if t.strip())
  if kind is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"--set {key}={text}: expected a bool (true/false)")
  try:
    return kind(text)
  except (TypeError, ValueError):
    raise ValueError(f"--set {key}={text}: expected {getattr(kind, '__name__', kind)}") from None


def override(config, key: str, text: str):
  """A copy of `config` with the dotted `key` set from its string form."""
  valid = field_paths(config)
  if key not in valid:
    if any(path.startswith(key + ".") for path in valid):
      raise KeyError(f"config key {key!r} is a section; set one of its fields, e.g. "
                     f"{next(p for p in valid if p.startswith(key + '.'))}")
    raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
  *parents, leaf = key.split(".")
  owner = config
  for name in parents:
    owner = getattr(owner, name)
  kind = typing.get_type_hints(type(owner))[leaf]
  return _replace(config, key.split("."), _parse(text, kind, key))


def _replace(config, names: Sequence[str], value):
  head, *rest = names
  return dataclasses.replace(
      config, **{head: _replace(getattr(config, head), rest, value) if rest else value})


def apply_overrides(config, assignments: Sequence[str]):
  """Applies 'key.sub=value' strings in order."""
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    if not sep:
      raise ValueError(f"override {assignment!r} is not of the form key.sub=value")
    config = override(config, key.strip(), text.strip())
  return config


def to_json(config) -> str:
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)
