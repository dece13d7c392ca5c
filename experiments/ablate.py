"""Ablations: encoder x fusion x backbone x seed, with the plain backbone and the controls, in one
combined table.

Needs a work directory whose prepare and generate stages are done (student rationales), e.g.

  python launch.py --workdir=runs/ml100k --stages=fetch,prepare,convert,teacher,distill,generate \
      --set student.max_users=0
  python -m experiments.ablate --workdir=runs/ml100k --backbones=gru4rec,sasrec \
      --encoders=minilm,llm_pooled --fusions=add,gate --seeds=0,1,2

Per backbone and seed it trains the plain backbone; per encoder also SLIM ID-based for every
fusion, the shuffled-rationale control (first fusion), the ID-agnostic ranker and the zero-shot
ranking. Each run lands in <workdir>/<out>/runs/<name>/ and is skipped when its metrics.json
exists, so an interrupted sweep resumes (runs are named by backbone, variant, encoder and seed
only: sweep other settings into their own --out). The table (mean and standard deviation over
seeds of test NDCG@10 and HR@10, and the change of the mean against the plain backbone) is
printed as JSON and written to <workdir>/<out>/table.md.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from absl import app, flags, logging

from slim_jax import config as config_lib
from slim_jax import encode, parallel, pipeline
from slim_jax.models import bert
from slim_jax.train import recommend

_CONFIG = flags.DEFINE_string("config", str(pathlib.Path(__file__).parent / "ml100k_smollm2.py"),
                              "Experiment config file (its rec and encoder sections apply).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory with prepare and generate done.",
                               required=True)
_SET = flags.DEFINE_multi_string("set", [], "Config overrides, as launch.py's --set.")
_BACKBONES = flags.DEFINE_list("backbones", ["gru4rec", "sasrec"], "Backbones.")
_ENCODERS = flags.DEFINE_list(
    "encoders", ["minilm"], "Encoders: minilm (frozen vectors), minilm_finetuned (trained with "
    "the recommender), llm_pooled (the student's pooled hidden states).")
_FUSIONS = flags.DEFINE_list("fusions", ["add"], "ID-based fusions: add, concat, gate.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Recommender seeds.")
_AGNOSTIC = flags.DEFINE_bool("agnostic", True, "Also the ID-agnostic and zero-shot rankers.")
_OUT = flags.DEFINE_string("out", "ablations", "Subdirectory of --workdir for this sweep's runs "
                           "and table: give each --set combination its own.")

METRICS = ("ndcg@10", "hr@10")


@dataclasses.dataclass(frozen=True)
class Run:
  backbone: str  # "-" for the ID-agnostic rankers
  variant: str  # plain | id_based/<fusion> | shuffled/<fusion> | id_agnostic | zero_shot
  encoder: str  # "-" for the plain backbone
  seed: int

  @property
  def name(self) -> str:
    return f"{self.backbone}_{self.variant.replace('/', '-')}_{self.encoder}_s{self.seed}"

  @property
  def mode(self) -> str:
    return self.variant.split("/")[0]


def plan(backbones, encoders, fusions, seeds, agnostic: bool) -> list[Run]:
  runs = []
  for seed in seeds:
    for backbone in backbones:
      runs.append(Run(backbone, "plain", "-", seed))
      for encoder in encoders:
        runs += [Run(backbone, f"id_based/{fusion}", encoder, seed) for fusion in fusions]
        runs.append(Run(backbone, f"shuffled/{fusions[0]}", encoder, seed))
    if agnostic:
      runs += [Run("-", "id_agnostic", encoder, seed) for encoder in encoders]
  if agnostic:  # deterministic: one seed is enough
    runs += [Run("-", "zero_shot", encoder, seeds[0]) for encoder in encoders
             if encoder != "minilm_finetuned"]  # nothing trains: the same as minilm
  return runs


def execute(run: Run, cfg, prepared, encoded: dict, minilm, root: pathlib.Path, mesh) -> dict:
  out = root / "runs" / run.name
  if (out / "metrics.json").is_file():
    return json.loads((out / "metrics.json").read_text())
  logging.info("ablation run %s", run.name)
  rec = dataclasses.replace(cfg.rec, backbone=run.backbone if run.backbone != "-" else
                            cfg.rec.backbone, seed=run.seed)
  fusion = run.variant.split("/")[1] if "/" in run.variant else cfg.slim.fusion
  finetune = run.encoder == "minilm_finetuned"
  slim = dataclasses.replace(cfg.slim, fusion=fusion, finetune_encoder=finetune)
  return recommend.train_recommender(rec, prepared, out, mesh, run.mode, slim,
                                     encoded.get(encoding(run.encoder)),
                                     minilm if finetune else None)


def encoding(encoder: str) -> str:
  """The encode stage's kind behind an encoder name: fine-tuning starts from MiniLM's."""
  return "minilm" if encoder == "minilm_finetuned" else encoder


def table(runs: list[Run], results: list[dict]) -> list[dict]:
  """Mean and standard deviation over seeds per (backbone, variant, encoder), with the change
  of the mean against the same backbone's plain runs."""
  groups: dict[tuple, list[dict]] = {}
  for run, result in zip(runs, results):
    groups.setdefault((run.backbone, run.variant, run.encoder), []).append(result["test"])
  rows = []
  for (backbone, variant, encoder), tests in groups.items():
    row = {"backbone": backbone, "variant": variant, "encoder": encoder, "seeds": len(tests)}
    for metric in METRICS:
      values = np.array([t[metric] for t in tests])
      row[metric] = float(values.mean())
      row[f"{metric}_std"] = float(values.std())
    rows.append(row)
  plain = {r["backbone"]: r for r in rows if r["variant"] == "plain"}
  for row in rows:
    base = plain.get(row["backbone"])
    for metric in METRICS:
      row[f"{metric}_vs_plain"] = (row[metric] / base[metric] - 1) if base else None
  return rows


def markdown(rows: list[dict]) -> str:
  header = ["backbone", "variant", "encoder", "seeds", "NDCG@10", "HR@10", "NDCG@10 vs plain",
            "HR@10 vs plain"]
  pct = lambda v: "" if v is None else f"{100 * v:+.1f}%"
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append(f"| {r['backbone']} | {r['variant']} | {r['encoder']} | {r['seeds']} | "
                 f"{r['ndcg@10']:.4f} ± {r['ndcg@10_std']:.4f} | "
                 f"{r['hr@10']:.4f} ± {r['hr@10_std']:.4f} | {pct(r['ndcg@10_vs_plain'])} | "
                 f"{pct(r['hr@10_vs_plain'])} |")
  return "\n".join(lines)


def main(argv):
  del argv
  cfg = config_lib.from_flags(_CONFIG.value, _SET.value)
  workdir = pathlib.Path(_WORKDIR.value)
  root = workdir / _OUT.value
  prepared, mesh = pipeline.load_prepared(workdir), parallel.make_mesh(cfg.mesh.axes())
  rationales = workdir / "generate" / "rationales.jsonl"
  encoded = {}
  for kind in sorted({encoding(name) for name in _ENCODERS.value}):
    out = workdir / "ablations" / f"encode_{kind}"  # shared by every sweep
    out.mkdir(parents=True, exist_ok=True)
    encode.encode_stage(dataclasses.replace(cfg.encoder, kind=kind), prepared, rationales, out,
                        mesh)
    encoded[kind] = encode.load_encoded(out)
  runs = plan(_BACKBONES.value, _ENCODERS.value, _FUSIONS.value,
              [int(s) for s in _SEEDS.value], _AGNOSTIC.value)
  minilm = (bert.load(encode.checkpoint_dir(cfg.encoder), cfg.encoder.max_len)
            if "minilm_finetuned" in _ENCODERS.value else None)
  results = [execute(run, cfg, prepared, encoded, minilm, root, mesh) for run in runs]
  rows = table(runs, results)
  (root / "table.md").write_text(markdown(rows) + "\n")
  print(json.dumps(rows, indent=2))
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
