"""Ablations: the paper's variants x encoder x fusion x backbone x seed, in one table with both
evaluation protocols, paired tests and the gain per user-history quintile.

Needs a work directory whose prepare and generate stages are done (student rationales; the
teacher stage too for teacher_rationales), e.g.

  python launch.py --workdir=runs/ml100k --stages=fetch,prepare,convert,teacher,distill,generate \
      --set student.max_users=0
  python -m experiments.analysis.ablate --workdir=runs/ml100k --set preset=full \
      --set rec.epochs=50 --backbones=gru4rec,sasrec,srgnn --seeds=0,1,2,3,4

(--set preset=full: the quick preset's recommenders stop at 10 epochs.)

Per backbone and seed it trains every variant of --variants (`slim.MODES`: plain, item_text,
id_based for every fusion, the shuffled and teacher_rationales controls with the first fusion);
per encoder and seed the ID-agnostic ranker; zero_shot and popularity, deterministic, once. Each
run lands in <workdir>/<out>/runs/<name>/ and is skipped when its metrics.json exists, so an
interrupted sweep resumes (runs are named by backbone, variant, fusion, encoder and seed only:
sweep other settings, e.g. --set encoder.postprocess=whiten, into their own --out).

<workdir>/<out>/table.md holds (i) test NDCG@10 and HR@10, mean ± standard deviation over seeds,
under full ranking and among the sampled negatives (the paper's protocol); (ii) each variant
against plain (the same backbone's; the first backbone's for the rankers without one) and
against shuffled (same backbone, encoder): the change of the mean NDCG@10 and the p-values of
the paired tests over seeds and over users (`slim_jax/stats.py`); (iii) the NDCG@10 gain over
plain per quintile of user history length with its 95% interval, also plotted in quintiles.png.
table.json holds the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from slim_jax import config as config_lib
from slim_jax import embed, encode, layout, parallel, pipeline, stats
from slim_jax.models import bert, slim
from slim_jax.train import recommend

_CONFIG = flags.DEFINE_string(
    "config", str(pathlib.Path(__file__).parents[1] / "configs" / "ml100k_smollm2.py"),
    "Experiment config file (its rec and encoder sections apply).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory with prepare and generate done.",
                               required=True)
_SET = flags.DEFINE_multi_string("set", [], "Config overrides, as launch.py's --set.")
_BACKBONES = flags.DEFINE_list("backbones", ["gru4rec", "sasrec", "srgnn"], "Backbones.")
_VARIANTS = flags.DEFINE_list("variants", list(slim.MODES), "Variants (slim.MODES).")
_ENCODERS = flags.DEFINE_list(
    "encoders", ["minilm"], "Encoders: minilm (frozen vectors), minilm_finetuned (trained with "
    "the recommender), llm_pooled (the student's pooled hidden states).")
_FUSIONS = flags.DEFINE_list("fusions", ["paper"], "ID-based user-side fusions (slim.FUSIONS); "
                             "the controls use the first.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Recommender seeds.")
_OUT = flags.DEFINE_string("out", "ablations", "Subdirectory of --workdir for this sweep's runs "
                           "and table: give each --set combination its own.")

METRICS = ("ndcg@10", "hr@10")
TESTED = "ndcg@10"  # the metric of the paired tests and the quintile gains
NONE = "-"  # a Run field that does not apply


@dataclasses.dataclass(frozen=True)
class Run:
  backbone: str  # NONE for the backbone-free rankers
  mode: str  # a key of slim.MODES
  fusion: str  # the ID-based modes' user side; NONE for the others
  encoder: str  # NONE for plain and popularity
  seed: int

  @property
  def name(self) -> str:
    return f"{self.backbone}_{self.mode}_{self.fusion}_{self.encoder}_s{self.seed}"

  @property
  def group(self) -> tuple[str, str, str, str]:
    """What the table averages over seeds."""
    return self.backbone, self.mode, self.fusion, self.encoder


def plan(backbones, encoders, fusions, seeds, variants) -> list[Run]:
  unknown = [v for v in variants if v not in slim.MODES]
  if unknown:
    raise ValueError(f"--variants: {unknown[0]!r} is not one of {tuple(slim.MODES)}")
  wanted = lambda *modes: [mode for mode in modes if mode in variants]
  runs = []
  for seed in seeds:
    for backbone in backbones:
      runs += [Run(backbone, "plain", NONE, NONE, seed) for _ in wanted("plain")]
      for encoder in encoders:
        runs += [Run(backbone, "item_text", NONE, encoder, seed) for _ in wanted("item_text")]
        runs += [Run(backbone, "id_based", fusion, encoder, seed) for fusion in fusions
                 if wanted("id_based")]
        runs += [Run(backbone, control, fusions[0], encoder, seed)
                 for control in wanted("shuffled", "teacher_rationales")]
    runs += [Run(NONE, "id_agnostic", NONE, encoder, seed) for encoder in encoders
             if wanted("id_agnostic")]
  # Deterministic: one seed is enough; a fine-tuned encoder trains nothing here.
  runs += [Run(NONE, "zero_shot", NONE, encoder, seeds[0]) for encoder in encoders
           if wanted("zero_shot") and encoder != "minilm_finetuned"]
  runs += [Run(NONE, "popularity", NONE, NONE, seeds[0]) for _ in wanted("popularity")]
  return runs


def run_config(run: Run, cfg: config_lib.Config) -> config_lib.Config:
  """The config of one run, as written: `cfg` with the run's backbone, seed and fusion."""
  rec = dataclasses.replace(cfg.rec, backbone=run.backbone if run.backbone != NONE else
                            cfg.rec.backbone, seed=run.seed)
  slim_cfg = dataclasses.replace(cfg.slim, finetune_encoder=run.encoder == "minilm_finetuned",
                                 fusion=run.fusion if run.fusion != NONE else cfg.slim.fusion)
  return dataclasses.replace(cfg, rec=rec, slim=slim_cfg)


def execute(run: Run, cfg: config_lib.Config, workdir: pathlib.Path, prepared, encoded: dict,
            minilm, mesh) -> dict:
  """Trains one run, resolved as launch.py resolves a config, into <workdir>/<out>/runs/."""
  out = workdir / _OUT.value / "runs" / run.name
  if (out / layout.METRICS).is_file():
    return json.loads((out / layout.METRICS).read_text())
  logging.info("ablation run %s", run.name)
  resolved = run_config(run, cfg).resolved(workdir)
  return recommend.train_recommender(resolved.rec, prepared, out, mesh, run.mode, resolved.slim,
                                     encoded.get(encoding(run.encoder)),
                                     minilm if resolved.slim.finetune_encoder else None)


def encoding(encoder: str) -> str:
  """The encode stage's kind behind an encoder name: fine-tuning starts from MiniLM's."""
  return "minilm" if encoder == "minilm_finetuned" else encoder


GROUP_FIELDS = ("backbone", "variant", "fusion", "encoder")  # of a table row, as Run.group


def row_group(row: Mapping) -> tuple[str, ...]:
  """The Run.group a table row averages."""
  return tuple(row[name] for name in GROUP_FIELDS)


def summarize(runs: Sequence[Run], results: Sequence[dict]) -> list[dict]:
  """A row per group: mean and standard deviation over seeds of METRICS under both protocols."""
  groups: dict[tuple, list[dict]] = {}
  for run, result in zip(runs, results):
    groups.setdefault(run.group, []).append(result)
  rows = []
  for group, results_ in groups.items():
    tests = [result["test"] for result in results_]
    row = {**dict(zip(GROUP_FIELDS, group)), "seeds": len(tests)}
    if "users_with_teacher_rationale" in results_[0]:  # the same users on every seed
      row["users_with_teacher_rationale"] = results_[0]["users_with_teacher_rationale"]
    for protocol in stats.PROTOCOLS:
      for metric in METRICS:
        values = np.array([recommend.protocol_metrics(t, protocol)[metric] for t in tests])
        row[f"{protocol}/{metric}"] = float(values.mean())
        row[f"{protocol}/{metric}_std"] = float(values.std())
    rows.append(row)
  return rows


def reference(rows: Sequence[dict], row: dict, against: str) -> dict | None:
  """The row `row` is compared with: the same backbone's plain (the first backbone's for the
  backbone-free rankers), or the same backbone and encoder's shuffled."""
  if against == "plain":
    plains = [r for r in rows if r["variant"] == "plain"]
    same = [r for r in plains if r["backbone"] == row["backbone"]]
    return (same or plains or [None])[0]
  return next((r for r in rows if r["variant"] == "shuffled" and r["backbone"] == row["backbone"]
               and r["encoder"] == row["encoder"]), None)


def comparisons(runs: Sequence[Run], rows: Sequence[dict],
                users: Sequence[Mapping[str, Mapping[int, float]]]) -> list[dict]:
  """Each row against plain and against shuffled, per protocol: the change of the mean TESTED
  metric, the paired t-test over the seeds both have and Wilcoxon over seed-averaged users.
  `users[i]` is run i's {protocol: {user: TESTED}}."""
  by_group: dict[tuple, dict[int, Mapping]] = {}
  for run, per_user in zip(runs, users):
    by_group.setdefault(run.group, {})[run.seed] = per_user
  out = []
  for row in rows:
    for against in ("plain", "shuffled"):
      base = reference(rows, row, against)
      if base is None or base is row:
        continue
      mine, theirs = by_group[row_group(row)], by_group[row_group(base)]
      seeds = sorted(set(mine) & set(theirs))
      for protocol in stats.PROTOCOLS:
        metric = f"{protocol}/{TESTED}"
        mean_of = lambda group: stats.seed_averaged([s[protocol] for s in group.values()])
        _, a, b = stats.paired_users(mean_of(mine), mean_of(theirs))
        _, low, high = stats.mean_interval(a - b)
        out.append({**{name: row[name] for name in GROUP_FIELDS},
                    "against": against, "protocol": protocol, "metric": TESTED,
                    "change": row[metric] / base[metric] - 1 if base[metric] else None,
                    "difference": float(np.mean(a - b)), "low": low, "high": high,
                    "p_seeds": stats.p_over_seeds(
                        [np.mean(list(mine[s][protocol].values())) for s in seeds],
                        [np.mean(list(theirs[s][protocol].values())) for s in seeds]),
                    "p_users": stats.p_over_users(a, b)})
  for kind in ("seeds", "users"):
    tested = [c for c in out if c[f"p_{kind}"] is not None]
    for contrast, p in zip(tested, stats.adjusted([c[f"p_{kind}"] for c in tested])):
      contrast[f"p_{kind}_adjusted"] = p
  return out


def quintile_gains(runs: Sequence[Run], rows: Sequence[dict],
                   users: Sequence[Mapping[str, Mapping[int, float]]],
                   history_lengths: np.ndarray) -> list[dict]:
  """Per row but plain: the full-ranking TESTED gain over plain of each user (seed-averaged),
  by quintile of history length, with its interval (`stats.gain_by_history`)."""
  by_group: dict[tuple, list[Mapping[int, float]]] = {}
  for run, per_user in zip(runs, users):
    by_group.setdefault(run.group, []).append(per_user["full"])
  out = []
  for row in rows:
    base = reference(rows, row, "plain")
    if base is None or base is row:
      continue
    users_, a, b = stats.paired_users(stats.seed_averaged(by_group[row_group(row)]),
                                      stats.seed_averaged(by_group[row_group(base)]))
    out.append({**{name: row[name] for name in GROUP_FIELDS},
                "groups": stats.gain_by_history(dict(zip(users_.tolist(), a - b)),
                                                history_lengths)})
  return out


def _named(row: Mapping) -> str:
  return " | ".join(row_group(row))


def markdown(rows: Sequence[dict], compared: Sequence[dict], gains: Sequence[dict],
             negatives: str) -> str:
  """The three tables of table.md."""
  pct = lambda v: "" if v is None else f"{100 * v:+.1f}%"
  cell = lambda row, name: f"{row[name]:.4f} ± {row[name + '_std']:.4f}"
  lines = ["| backbone | variant | fusion | encoder | seeds | NDCG@10 | HR@10 | "
           f"NDCG@10 ({negatives}) | HR@10 ({negatives}) |", "|" + "---|" * 9]
  lines += [f"| {_named(r)} | {r['seeds']} | {cell(r, 'full/ndcg@10')} | "
            f"{cell(r, 'full/hr@10')} | {cell(r, 'sampled/ndcg@10')} | "
            f"{cell(r, 'sampled/hr@10')} |" for r in rows]
  teacher = [f"{_named(r)}: {count} users read the teacher's rationale instead of the "
             f"student's ({split} split)." for r in rows
             for split, count in r.get("users_with_teacher_rationale", {}).items()]
  lines += ["", *teacher] if teacher else []
  lines += ["", f"Paired tests of {TESTED.upper()} (p over seeds: paired t-test; over users: "
            "Wilcoxon on each user's value averaged over seeds; the difference is the mean "
            "per-user one with its 95% bootstrap interval; adjusted: Benjamini-Hochberg over "
            "every row of the column):", "",
            "| backbone | variant | fusion | encoder | against | protocol | change | difference "
            "[95% CI] | p over seeds | adjusted | p over users | adjusted |", "|" + "---|" * 13]
  lines += [f"| {_named(c)} | {c['against']} | "
            f"{'full ranking' if c['protocol'] == 'full' else negatives} | {pct(c['change'])} | "
            f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | "
            f"{stats.describe_p(c['p_seeds'])} | {stats.describe_p(c.get('p_seeds_adjusted'))} | "
            f"{stats.describe_p(c['p_users'])} | {stats.describe_p(c['p_users_adjusted'])} |"
            for c in compared]
  if gains:
    groups = gains[0]["groups"]
    lines += ["", f"Full-ranking {TESTED.upper()} gain over plain per quintile of history length "
              "(users' seed means; 95% bootstrap interval):", "",
              "| backbone | variant | fusion | encoder | "
              + " | ".join(f"G{g['group']} ({g['min_length']}-{g['max_length']})"
                           for g in groups) + " |", "|" + "---|" * (4 + len(groups))]
    lines += [f"| {_named(g)} | " + " | ".join(
        f"{q['gain']:+.4f} [{q['low']:+.4f}, {q['high']:+.4f}]" for q in g["groups"]) + " |"
              for g in gains]
    lines += ["", "![gain per history quintile](quintiles.png)"]
  return "\n".join(lines)


def plot_gains(path: pathlib.Path, gains: Sequence[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  for i, gain in enumerate(gains):
    groups = gain["groups"]
    x = np.arange(len(groups)) + 0.04 * (i - len(gains) / 2)  # apart, so intervals stay legible
    mean = np.array([g["gain"] for g in groups])
    ax.errorbar(x, mean, yerr=[mean - [g["low"] for g in groups],
                               [g["high"] for g in groups] - mean],
                marker="o", capsize=3,
                label=" ".join(name for name in row_group(gain) if name != NONE))
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set_xticks(range(len(gains[0]["groups"])),
                [f"G{g['group']}\n{g['min_length']}-{g['max_length']}" for g in gains[0]["groups"]])
  ax.set_xlabel("quintile of history length (G0 sparsest)")
  ax.set_ylabel(f"{TESTED.upper()} gain over plain")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  cfg = config_lib.from_flags(_CONFIG.value, _SET.value)
  workdir = pathlib.Path(_WORKDIR.value)
  cfg.checked()  # a bad value fails here, not runs later
  root = workdir / _OUT.value
  prepared, mesh = pipeline.load_prepared(workdir), parallel.make_mesh(cfg.mesh.axes())
  runs = plan(_BACKBONES.value, _ENCODERS.value, _FUSIONS.value, [int(s) for s in _SEEDS.value],
              _VARIANTS.value)
  # Each encoder as launch.py would resolve it; a fine-tuned MiniLM starts from the frozen one's.
  encoders = {kind: dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, kind=kind))
              .resolved(workdir).encoder
              for kind in sorted({encoding(run.encoder) for run in runs} - {NONE})}
  encoded = {}
  for kind, encoder in encoders.items():
    out = workdir / "ablations" / f"encode_{kind}"  # shared by every sweep
    out.mkdir(parents=True, exist_ok=True)
    encode.encode_stage(encoder, prepared, pipeline.rationale_paths(workdir), out, mesh)
    encoded[kind] = encode.load_encoded(out, prepared, cfg.encoder.postprocess)
  minilm = (bert.load(embed.checkpoint_dir(encoders["minilm"]), cfg.encoder.max_len)
            if "minilm_finetuned" in _ENCODERS.value else None)
  results = [execute(run, cfg, workdir, prepared, encoded, minilm, mesh) for run in runs]
  users = []
  for run in runs:
    ranked = np.load(root / "runs" / run.name / layout.RANKED_TEST)
    users.append({protocol: stats.user_metric(ranked, protocol, TESTED)
                  for protocol in stats.PROTOCOLS})
  rows = summarize(runs, results)
  compared = comparisons(runs, rows, users)
  gains = quintile_gains(runs, rows, users, np.diff(prepared.split("test").history_offsets))
  negatives = f"{cfg.rec.sampled_negatives} {cfg.rec.sampled_eval} negatives"
  if gains:
    plot_gains(root / "quintiles.png", gains)
  (root / "table.md").write_text(markdown(rows, compared, gains, negatives) + "\n")
  (root / "table.json").write_text(json.dumps({"rows": rows, "comparisons": compared,
                                               "quintile_gains": gains}, indent=2))
  print(markdown(rows, compared, gains, negatives))


if __name__ == "__main__":
  app.run(main)
