"""SLIM's stages and their artifacts under one work directory.

Each stage reads what earlier stages wrote, writes into `workdir/<stage>/`, and finally writes
`workdir/<stage>/DONE` holding the config sections it ran with. A rerun skips a stage whose DONE
matches the current config and redoes it when the config changed; a stage interrupted before
DONE resumes from whatever partial state it keeps itself.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable

from absl import logging

from slim_jax import assets
from slim_jax.config import Config


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable[[Config, pathlib.Path], dict]  # (config, stage dir) -> summary written to DONE
  sections: tuple[str, ...]  # config sections whose change invalidates the stage's output
  # Whether a config change deletes the stage's directory: true for stages whose partial state
  # (checkpoints) belongs to one config; false for ones whose caches are keyed by their inputs.
  restart_on_change: bool = False


def _fetch(cfg: Config, out: pathlib.Path) -> dict:
  del cfg, out
  return {name: str(p) for name, p in assets.fetch_all().items()}


def dataset_path(cfg: Config) -> pathlib.Path:
  return pathlib.Path(cfg.data.path) if cfg.data.path else assets.path("ml-100k")


def _prepare(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax.data import formats, preprocess
  raw = formats.read_dataset(cfg.data.format, dataset_path(cfg), on_error=cfg.data.on_error)
  prepared = preprocess.prepare(raw, cfg.data)
  preprocess.save(prepared, out)
  stats = dict(prepared.stats)
  print(json.dumps({"dataset": cfg.data.name, **stats}, indent=2))
  return stats


def load_prepared(workdir: pathlib.Path):
  """The prepare stage's dataset; a clear error when that stage has not run."""
  from slim_jax.data import preprocess
  if not (workdir / "prepare" / "DONE").is_file():
    raise FileNotFoundError(f"{workdir / 'prepare'} is not complete: run --stages=prepare first")
  return preprocess.load(workdir / "prepare")


def _mesh(cfg: Config):
  from slim_jax import parallel
  return parallel.make_mesh(cfg.mesh.axes())


EMBEDDED_LLM = "smollm2-135m-instruct"  # the converted embedded GGUF, under workdir/convert/


def llm_checkpoint(checkpoint: str, workdir: pathlib.Path) -> str:
  """A configured checkpoint, or the HF directory the convert stage made of the embedded GGUF."""
  return checkpoint or str(workdir / "convert" / EMBEDDED_LLM)


def _convert(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax import checkpoints
  del cfg
  directory = checkpoints.convert_gguf_to_hf(assets.path("smollm2"), out / EMBEDDED_LLM)
  print(f"converted {assets.path('smollm2').name} to the Hugging Face directory {directory}")
  return {"checkpoint": str(directory)}


def _teacher(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax import teacher
  tcfg = dataclasses.replace(cfg.teacher, checkpoint=llm_checkpoint(cfg.teacher.checkpoint,
                                                                    out.parent))
  if tcfg.kind == "openai":
    estimate = teacher.estimate_cost(tcfg, cfg.prompt, load_prepared(out.parent))
    logging.info("teacher dry run: %s", json.dumps(estimate))
  return teacher.run_teacher(tcfg, cfg.prompt, load_prepared(out.parent), out, mesh=_mesh(cfg))


def _distill(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax.train import distill
  dcfg = dataclasses.replace(cfg.distill, checkpoint=llm_checkpoint(cfg.distill.checkpoint,
                                                                    out.parent))
  return distill.run_distill(dcfg, cfg.prompt, load_prepared(out.parent),
                             out.parent / "teacher" / "rationales.jsonl", out, mesh=_mesh(cfg))


def _generate(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax import student
  checkpoint = (out.parent / "distill" / "adapter" if cfg.student.distilled
                else llm_checkpoint(cfg.distill.checkpoint, out.parent))
  return student.run_student(cfg.student, cfg.prompt, load_prepared(out.parent), checkpoint, out,
                             mesh=_mesh(cfg))


def _encode(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax import encode
  return encode.encode_stage(cfg.encoder, load_prepared(out.parent),
                             out.parent / "generate" / "rationales.jsonl", out, mesh=_mesh(cfg))


def variant_name(backbone: str, mode: str) -> str:
  """The train stage's directory of one variant: "sasrec_id_based", or "id_agnostic" (no
  backbone)."""
  from slim_jax.models import slim
  return mode if mode in slim.BACKBONE_FREE_MODES else f"{backbone}_{mode}"


def finetuned_encoder(cfg: Config):
  """The MiniLM that `slim.finetune_encoder` trains with the recommender, else None."""
  from slim_jax import encode
  from slim_jax.models import bert
  if not cfg.slim.finetune_encoder:
    return None
  if cfg.encoder.kind != "minilm":
    raise ValueError(f"slim.finetune_encoder trains a MiniLM (BERT) encoder; encoder.kind is "
                     f"{cfg.encoder.kind!r}")
  return bert.load(encode.checkpoint_dir(cfg.encoder), cfg.encoder.max_len)


def _train(cfg: Config, out: pathlib.Path) -> dict:
  """Trains every variant of `slim.modes` into out/<variant>/; out/metrics.json sums them up."""
  from slim_jax import encode
  from slim_jax.models import slim
  from slim_jax.train import recommend
  modes = cfg.slim.checked().modes
  unencoded = tuple(mode for mode in modes if mode in slim.TEXT_FREE_MODES)
  if cfg.encoder.kind == "none" and modes != unencoded:
    logging.warning("encoder.kind=none: no text vectors, so only %s train", unencoded)
    modes = unencoded
  prepared, mesh = load_prepared(out.parent), _mesh(cfg)
  teacher = (encode.encode_teacher(cfg.encoder, prepared, out.parent / "teacher" /
                                   "rationales.jsonl", out / "teacher_vectors", mesh)
             if "teacher_rationales" in modes else ({}, {}))
  encoded = (None if modes == unencoded else
             encode.load_encoded(out.parent / "encode", cfg.encoder.postprocess, teacher))
  encoder = finetuned_encoder(cfg)
  summary = {}
  for mode in modes:
    name = variant_name(cfg.rec.backbone, mode)
    result = recommend.train_recommender(cfg.rec, prepared, out / name, mesh, mode, cfg.slim,
                                         encoded, encoder)
    summary[name] = {"backbone": result["backbone"], "mode": mode, "test": result["test"]}
    print(json.dumps({name: {k: round(v, 4) for k, v in result["test"].items()
                             if k in ("hr@10", "ndcg@10", "mrr@10")}}), flush=True)
  (out / "metrics.json").write_text(json.dumps(summary, indent=2))
  return {name: {k: v for k, v in row["test"].items() if isinstance(v, float)}
          for name, row in summary.items()}


def _report(cfg: Config, out: pathlib.Path) -> dict:
  from slim_jax import report
  path = report.write_report(cfg, out.parent, out)
  print(f"report: {path}")
  return {"report": str(path)}


_UPSTREAM_OF_STUDENT = ("data", "prompt", "teacher", "distill")
_RECOMMENDERS = (*_UPSTREAM_OF_STUDENT, "student", "encoder", "rec", "slim")
STAGES: dict[str, Stage] = {
    stage.name: stage for stage in (
        Stage("fetch", _fetch, ()),
        Stage("prepare", _prepare, ("data",)),
        Stage("convert", _convert, ()),
        Stage("teacher", _teacher, ("data", "prompt", "teacher")),
        Stage("distill", _distill, _UPSTREAM_OF_STUDENT),
        Stage("generate", _generate, (*_UPSTREAM_OF_STUDENT, "student")),
        Stage("encode", _encode, (*_UPSTREAM_OF_STUDENT, "student", "encoder")),
        Stage("train", _train, _RECOMMENDERS, restart_on_change=True),
        Stage("report", _report, _RECOMMENDERS, restart_on_change=True),
    )
}


def _fingerprint(cfg: Config, stage: Stage) -> dict:
  """The stage's config sections as JSON reads them back (tuples become lists), so that a
  fingerprint compares equal to the one a DONE file holds."""
  return json.loads(json.dumps({section: dataclasses.asdict(getattr(cfg, section))
                                for section in stage.sections}))


def run_stage(name: str, cfg: Config, workdir: pathlib.Path) -> dict:
  """Runs one stage unless its output is complete for this config; returns its summary."""
  stage = STAGES[name]
  out = workdir / name
  done = out / "DONE"
  fingerprint = _fingerprint(cfg, stage)
  if done.is_file():
    record = json.loads(done.read_text())
    if record["config"] == fingerprint:
      logging.info("stage %s: complete in %s, skipped", name, out)
      return record["summary"]
    logging.warning("stage %s: config changed since %s was written; running it again", name, out)
    done.unlink()
  started = out / "CONFIG"  # the config a (possibly interrupted) run of the stage began with
  if (stage.restart_on_change and started.is_file()
      and json.loads(started.read_text()) != fingerprint):
    logging.warning("stage %s: %s holds a run of another config; starting over", name, out)
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  started.write_text(json.dumps(fingerprint, indent=2))
  logging.info("stage %s: running into %s", name, out)
  summary = stage.run(cfg, out)
  done.write_text(json.dumps({"config": fingerprint, "summary": summary}, indent=2, default=str))
  return summary


def run(cfg: Config, workdir: pathlib.Path, stages: list[str]) -> dict[str, dict]:
  unknown = [name for name in stages if name not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
  for section in dataclasses.fields(cfg):  # a bad value fails here, not stages later
    value = getattr(cfg, section.name)
    if hasattr(value, "checked"):
      value.checked()
  workdir.mkdir(parents=True, exist_ok=True)
  return {name: run_stage(name, cfg, workdir) for name in stages}
