"""SLIM's stages and their artifacts under one work directory.

Each stage reads what earlier stages wrote, writes into `workdir/<stage>/`, and finally writes
`workdir/<stage>/DONE` holding the config sections it ran with. A rerun skips a stage whose DONE
matches the current config and redoes it when the config changed; a stage interrupted before
DONE resumes from whatever partial state it keeps itself.

With several JAX processes (a pod), process 0 alone decides skip or restart and writes the
bookkeeping (`multihost`); every process runs a stage that needs every device, process 0 alone one
that does not; all of them meet at a barrier before and after each stage and return the summary
that DONE holds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable

from absl import logging

from slim_jax import (assets, checkpoints, embed, encode, export, layout, multihost, parallel,
                      report, student, teacher)
from slim_jax.config import Config
from slim_jax.data import formats, preprocess
from slim_jax.models import bert, slim
from slim_jax.train import distill, recommend


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str  # also its directory under the work directory
  run: Callable[[Config, pathlib.Path], dict]  # (config, stage dir) -> summary written to DONE
  sections: tuple[str, ...]  # config sections whose change invalidates the stage's output
  # Whether a config change deletes the stage's directory: true for stages whose partial state
  # (checkpoints) belongs to one config; false for ones whose caches are keyed by their inputs.
  restart_on_change: bool = False
  # Whether every process runs the stage (config -> bool): those that compute on the mesh, which
  # spans the processes, and fetch, whose asset store is each host's own. Process 0 alone runs
  # the others (an HTTP teacher then sends each request once in the whole job).
  everywhere: Callable[[Config], bool] = lambda cfg: True
  # The version of what the stage writes: raising it runs the stage again in work directories
  # whose DONE an older layout of its files wrote (0, the first layout, is left out of DONE).
  artifacts: int = 0
  default: bool = True  # whether a run without --stages runs it (DEFAULT_STAGES)


def _fetch(cfg: Config, out: pathlib.Path) -> dict:
  del cfg, out
  return {name: str(p) for name, p in assets.fetch_all().items()}


def dataset_path(cfg: Config) -> pathlib.Path:
  return pathlib.Path(cfg.data.path) if cfg.data.path else assets.path("ml-100k")


def _prepare(cfg: Config, out: pathlib.Path) -> dict:
  raw = formats.read_dataset(cfg.data.format, dataset_path(cfg), on_error=cfg.data.on_error)
  prepared = preprocess.prepare(raw, cfg.data)
  preprocess.save(prepared, out)
  stats = dict(prepared.stats)
  print(json.dumps({"dataset": cfg.data.name, **stats}, indent=2))
  return stats


def load_prepared(workdir: pathlib.Path) -> preprocess.Prepared:
  """The prepare stage's dataset; a clear error when that stage has not run."""
  if _done(workdir / layout.PREPARE) is None:
    raise FileNotFoundError(f"{workdir / layout.PREPARE} is not complete: run --stages=prepare "
                            "first")
  return preprocess.load(workdir / layout.PREPARE)


def _mesh(cfg: Config):
  return parallel.make_mesh(cfg.mesh.axes())


def _convert(cfg: Config, out: pathlib.Path) -> dict:
  del cfg
  directory = checkpoints.convert_gguf_to_hf(assets.path("smollm2"), out / layout.EMBEDDED_LLM)
  print(f"converted {assets.path('smollm2').name} to the Hugging Face directory {directory}")
  return {"checkpoint": str(directory)}


def _teacher(cfg: Config, out: pathlib.Path) -> dict:
  prepared = load_prepared(out.parent)
  if cfg.teacher.kind == "openai":
    logging.info("teacher dry run: %s",
                 json.dumps(teacher.estimate_cost(cfg.teacher, cfg.prompt, prepared)))
  return teacher.run_teacher(cfg.teacher, cfg.prompt, prepared, out, mesh=_mesh(cfg))


def _distill(cfg: Config, out: pathlib.Path) -> dict:
  return distill.run_distill(cfg.distill, cfg.student_prompt, load_prepared(out.parent),
                             out.parent / layout.TEACHER / layout.RATIONALES, out,
                             mesh=_mesh(cfg))


def _generate(cfg: Config, out: pathlib.Path) -> dict:
  checkpoint = (out.parent / layout.DISTILL / layout.ADAPTER if cfg.student.distilled
                else cfg.distill.checkpoint)
  return student.run_student(cfg.student, cfg.student_prompt, load_prepared(out.parent),
                             checkpoint, out, mesh=_mesh(cfg))


def _export(cfg: Config, out: pathlib.Path) -> dict:
  if _done(out.parent / layout.DISTILL) is None:
    raise FileNotFoundError(f"{out.parent / layout.DISTILL} is not complete: run --stages=distill "
                            "first")
  return export.export_gguf(out.parent / layout.DISTILL / layout.ADAPTER,
                            out / f"{cfg.name}.gguf", cfg.export.dtype, cfg.name)


def rationale_paths(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Each writer's rationales.jsonl (encode.WRITERS), which the encode stage alone reads."""
  return {writer: workdir / stage / layout.RATIONALES for writer, stage in encode.WRITERS.items()}


def _encode(cfg: Config, out: pathlib.Path) -> dict:
  return encode.encode_stage(cfg.encoder, load_prepared(out.parent), rationale_paths(out.parent),
                             out, mesh=_mesh(cfg))


def finetuned_encoder(cfg: Config) -> bert.SentenceEncoder | None:
  """The MiniLM that `slim.finetune_encoder` trains with the recommender, else None."""
  if not cfg.slim.finetune_encoder:
    return None
  return bert.load(embed.checkpoint_dir(cfg.encoder), cfg.encoder.max_len)


def trained_modes(cfg: Config) -> tuple[str, ...]:
  """`slim.modes`, less those that read text vectors when encoder.kind=none."""
  unencoded = tuple(mode for mode in cfg.slim.modes if mode in slim.TEXT_FREE_MODES)
  if cfg.encoder.kind == "none" and cfg.slim.modes != unencoded:
    logging.warning("encoder.kind=none: no text vectors, so only %s train", unencoded)
    return unencoded
  return cfg.slim.modes


def _train(cfg: Config, out: pathlib.Path) -> dict:
  """Trains every variant of `slim.modes` into out/<variant>/; out/metrics.json sums them up."""
  modes = trained_modes(cfg)
  prepared, mesh = load_prepared(out.parent), _mesh(cfg)
  encoded = (None if all(mode in slim.TEXT_FREE_MODES for mode in modes) else
             encode.load_encoded(out.parent / layout.ENCODE, prepared, cfg.encoder.postprocess))
  encoder = finetuned_encoder(cfg)
  summary = {}
  for mode in modes:
    name = slim.variant_name(cfg.rec.backbone, mode)
    result = recommend.train_recommender(cfg.rec, prepared, out / name, mesh, mode, cfg.slim,
                                         encoded, encoder)
    summary[name] = {"backbone": result["backbone"], "mode": mode, "test": result["test"]}
    logging.info("%s", json.dumps({name: {k: round(v, 4) for k, v in result["test"].items()
                                          if k in ("hr@10", "ndcg@10", "mrr@10")}}))
  multihost.write_text(out / layout.METRICS, json.dumps(summary, indent=2))
  return {name: {k: v for k, v in row["test"].items() if isinstance(v, float)}
          for name, row in summary.items()}


def _report(cfg: Config, out: pathlib.Path) -> dict:
  workdir = out.parent
  path = report.write_report(cfg, load_prepared(workdir),
                             {name: workdir / name for name in STAGES}, summaries(workdir), out)
  print(f"report: {path}")
  return {"report": str(path)}


_NOWHERE_ELSE = lambda cfg: False  # process 0 alone runs the stage
_UPSTREAM_OF_STUDENT = ("data", "prompt", "teacher", "distill")
_RECOMMENDERS = (*_UPSTREAM_OF_STUDENT, "student", "encoder", "rec", "slim")
STAGES: dict[str, Stage] = {
    stage.name: stage for stage in (
        Stage(layout.FETCH, _fetch, ()),
        Stage(layout.PREPARE, _prepare, ("data",), everywhere=_NOWHERE_ELSE),
        Stage(layout.CONVERT, _convert, (), everywhere=_NOWHERE_ELSE),
        Stage(layout.TEACHER, _teacher, ("data", "prompt", "teacher"),
              everywhere=lambda cfg: cfg.teacher.kind != "openai"),
        Stage(layout.DISTILL, _distill, _UPSTREAM_OF_STUDENT),
        Stage(layout.EXPORT, _export, (*_UPSTREAM_OF_STUDENT, "export"),
              everywhere=_NOWHERE_ELSE, default=False),
        Stage(layout.GENERATE, _generate, (*_UPSTREAM_OF_STUDENT, "student")),
        Stage(layout.ENCODE, _encode, (*_UPSTREAM_OF_STUDENT, "student", "encoder"),
              artifacts=1),  # 1: rationale vectors keyed by user id, the teacher's too
        Stage(layout.TRAIN, _train, _RECOMMENDERS, restart_on_change=True),
        Stage(layout.REPORT, _report, _RECOMMENDERS, restart_on_change=True,
              everywhere=_NOWHERE_ELSE),
    )
}
DEFAULT_STAGES = tuple(name for name, stage in STAGES.items() if stage.default)


def _fingerprint(cfg: Config, stage: Stage) -> dict:
  """The stage's config sections as JSON reads them back (tuples become lists), so that a
  fingerprint compares equal to the one a DONE file holds."""
  sections = {section: dataclasses.asdict(getattr(cfg, section)) for section in stage.sections}
  return json.loads(json.dumps(
      sections | ({"artifacts": stage.artifacts} if stage.artifacts else {})))


def _done(out: pathlib.Path) -> dict | None:
  """What a completed stage wrote to its DONE ({"config": ..., "summary": ...}), else None."""
  done = out / layout.DONE
  return json.loads(done.read_text()) if done.is_file() else None


def summaries(workdir: pathlib.Path) -> dict[str, dict]:
  """The summary of every stage complete in `workdir`, by stage name."""
  records = {name: _done(workdir / name) for name in STAGES}
  return {name: record["summary"] for name, record in records.items() if record is not None}


_SKIP, _RUN = 0, 1


def _prepare_stage(stage: Stage, cfg: Config, out: pathlib.Path) -> int:
  """Process 0's decision, _SKIP or _RUN; to run, DONE is gone and the directory is there,
  cleared when it held a run of another config."""
  fingerprint = _fingerprint(cfg, stage)
  record = _done(out)
  if record is not None:
    if record["config"] == fingerprint:
      logging.info("stage %s: complete in %s, skipped", stage.name, out)
      return _SKIP
    logging.warning("stage %s: config changed since %s was written; running it again",
                    stage.name, out)
    (out / layout.DONE).unlink()
  started = out / layout.CONFIG
  if (stage.restart_on_change and started.is_file()
      and json.loads(started.read_text()) != fingerprint):
    logging.warning("stage %s: %s holds a run of another config; starting over", stage.name, out)
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  multihost.write_text(started, json.dumps(fingerprint, indent=2))
  return _RUN


def run_stage(name: str, cfg: Config, workdir: pathlib.Path,
              resolved: Config | None = None) -> dict:
  """Runs one stage unless its output is complete for `cfg`, the config as written (its DONE
  records that); the stage itself runs `resolved` (default `cfg.resolved(workdir)`). Returns the
  stage's summary."""
  stage = STAGES[name]
  out = workdir / name
  multihost.barrier(f"before {name}")  # no process still reads what the decision may remove
  # A collective: no process goes on before process 0 has prepared the directory.
  decision = multihost.writer_decides(_prepare_stage(stage, cfg, out) if multihost.is_writer()
                                      else _SKIP)
  if decision == _RUN:
    if multihost.is_writer() or stage.everywhere(cfg):
      logging.info("stage %s: running into %s", name, out)
      summary = stage.run(resolved or cfg.resolved(workdir), out)
      multihost.write_text(out / layout.DONE, json.dumps(
          {"config": _fingerprint(cfg, stage), "summary": summary}, indent=2, default=str))
  multihost.barrier(f"after {name}")  # DONE is written for every process to read
  return _done(out)["summary"]


def run(cfg: Config, workdir: pathlib.Path, stages: list[str]) -> dict[str, dict]:
  """Runs `stages` in order, once every value of `cfg` has passed its checks."""
  unknown = [name for name in stages if name not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
  resolved = cfg.resolved(workdir)  # a bad value fails here, not stages later
  workdir.mkdir(parents=True, exist_ok=True)
  return {name: run_stage(name, cfg, workdir, resolved) for name in stages}
