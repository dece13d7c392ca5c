"""Ablations: the paper's variants and their controls x encoder x fusion x rationale schedule x
item-text input x backbone x seed, in one table with both evaluation protocols, the primary
contrasts (Holm-corrected, with the effect each could have detected), the controls
(Benjamini-Hochberg) and the gain per user-history quintile.

Needs a work directory whose prepare and generate stages are done (student rationales; the
teacher stage too for teacher_rationales), e.g.

  python launch.py --workdir=runs/ml100k --stages=fetch,prepare,convert,teacher,distill,generate \
      --set student.max_users=0
  python -m experiments.analysis.ablate --workdir=runs/ml100k --set preset=full \
      --set rec.epochs=50 --backbones=gru4rec,sasrec,srgnn --seeds=0,1,2,3,4 \
      --schedules=causal,paper --item_text_inputs=false,true
  # the encoder ablation, on id_based and item_text:
  python -m experiments.analysis.ablate --workdir=runs/ml100k --set preset=full \
      --set rec.epochs=50 --variants=plain,item_text,id_based --out=ablations_encoders \
      --encoders=minilm,minilm_center,minilm_whiten,llm_pooled,minilm_finetuned
  # while a sweep runs (or after it was stopped): the table of the runs that exist so far,
  # e.g. of the seeds complete for every run, which table.md names
  python -m experiments.analysis.ablate --workdir=runs/ml100k --set preset=full \
      --set rec.epochs=50 --backbones=gru4rec,sasrec,srgnn --seeds=0,1 --table_only

(--set preset=full: the quick preset's recommenders stop at 10 epochs.)

What runs (`plan`): per backbone and seed, every variant of --variants (`slim.MODES`) that has a
backbone, per encoder. id_based runs for every --fusions x --schedules, history_text for every
schedule with the first fusion, the controls (shuffled, constant_rationale, teacher_rationales)
with the first fusion and schedule; item_text and id_based for every --item_text_inputs, the
other fused variants with the first. Per encoder and seed the ID-agnostic ranker; zero_shot and
popularity, deterministic, once. The first value of each list is the sweep's main setting: the
primary contrasts are taken there. --encoders names an encoder kind and, after "_center" or
"_whiten", the postprocessing of its vectors (`encoder.postprocess`; none without a suffix):
minilm, minilm_center, minilm_whiten, minilm_aligned (MiniLM aligned on the student's cut-off
rationales before it encodes: `slim_jax/train/align.py`), llm_pooled, minilm_finetuned (MiniLM
trained with the recommender: on an accelerator, far beyond a CPU's budget).

In what order (--order): seed, every run of seed 0 before seed 1 and so on, so an interrupted
sweep holds complete seeds; group, every seed of a variant before the next variant. Either way the
runs of the primary contrasts at the main settings come first.

Each run lands in <workdir>/<out>/runs/<name>/ beside a `config_hash` file: the sha256 of its
resolved config and mode. A run is reused only when a directory holds the same hash and its
metrics.json, in this sweep or another of the same work directory (the encoder ablation reads the
main sweep's MiniLM runs); a directory of another config is left as it is and the run trains into
<name>_<hash prefix>/, so a changed setting never reuses a stale result and an interrupted sweep
resumes.

<workdir>/<out>/table.md holds (i) test NDCG@10 and HR@10, mean ± standard deviation over seeds
(ddof 1; one seed: no ±), under full ranking and among the sampled negatives (the paper's
protocol), and the share of each top-10 the user had interacted with when runs report it; (ii)
the primary contrasts (`stats.PRIMARY_CONTRASTS`) per backbone and protocol: the change of the
mean NDCG@10, the mean per-user difference with its 95% interval, the minimum effect that
interval could detect, the p over seeds (paired t) and over users (Wilcoxon), Holm-corrected
within the backbone's family; (iii) the controls: each variant against plain and shuffled, the
primary contrasts at the other settings, the `stats.CONTROL_CONTRASTS`, each run under another
encoder, fusion, schedule or item-text input against the same under the main one,
Benjamini-Hochberg adjusted; (iv) the NDCG@10 gain over plain per quintile of user history length
with its 95% interval, also plotted in quintiles.png; (v) the runs not in the table: a group
enters it only when its run exists for every seed. table.json holds the same rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from slim_jax import config as config_lib
from slim_jax import embed, encode, layout, parallel, pipeline, stats
from slim_jax.models import bert, slim
from slim_jax.train import recommend

_CONFIG = flags.DEFINE_string(
    "config", str(pathlib.Path(__file__).parents[1] / "configs" / "ml100k_smollm2.py"),
    "Experiment config file (its rec, encoder and slim sections apply).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory with prepare and generate done.",
                               required=True)
_SET = flags.DEFINE_multi_string("set", [], "Config overrides, as launch.py's --set.")
_BACKBONES = flags.DEFINE_list("backbones", ["gru4rec", "sasrec", "srgnn"], "Backbones.")
_VARIANTS = flags.DEFINE_list("variants", list(slim.MODES), "Variants (slim.MODES).")
_ENCODERS = flags.DEFINE_list(
    "encoders", ["minilm"], "Encoders, the first the main one: minilm (frozen vectors), "
    "minilm_aligned (aligned before it encodes), minilm_finetuned (trained with the "
    "recommender), llm_pooled (the student's pooled hidden states), each with _center or "
    "_whiten for that encoder.postprocess (none without).")
_FUSIONS = flags.DEFINE_list("fusions", ["paper"], "ID-based user-side fusions (slim.FUSIONS), "
                             "the first the main one; the controls use it.")
_SCHEDULES = flags.DEFINE_list(
    "schedules", ["causal"], "Rationale schedules (slim.SCHEDULES), the first the main one; the "
    "others for id_based and history_text only.")
_ITEM_TEXT_INPUTS = flags.DEFINE_list(
    "item_text_inputs", ["false"], "slim.item_text_input values (false, true), the first the main "
    "one; the others for item_text and id_based only.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Recommender seeds.")
_ORDER = flags.DEFINE_enum("order", "seed", ["seed", "group"],
                           "seed: seed by seed, so an interrupted sweep has complete seeds; "
                           "group: every seed of a variant before the next.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Train nothing: write table.md and "
                                "table.json from the runs that exist, listing those missing.")
_OUT = flags.DEFINE_string("out", "ablations", "Subdirectory of --workdir for this sweep's runs "
                           "and table.")

METRICS = ("ndcg@10", "hr@10")
TESTED = "ndcg@10"  # the metric of the paired tests and the quintile gains
HISTORY_SHARE = "history_share@10"  # metrics.json's test split, in runs that report it
NONE = "-"  # a Run field that does not apply
CONFIG_HASH = "config_hash"  # in each run's directory: the config it trained with
POSTPROCESS_SUFFIXES = ("center", "whiten")  # of an --encoders name: its encoder.postprocess
ENCODER_KINDS = ("minilm", "minilm_aligned", "llm_pooled", "minilm_finetuned")  # the rest
SCHEDULED = ("id_based", "history_text")  # every --schedules value; other readers the first
READERS = ("id_based", "shuffled", "constant_rationale", "history_text", "teacher_rationales",
           "id_agnostic")  # trained reading a rationale (or history) vector per row: a schedule
TEXT_INPUTS = ("item_text", "id_based")  # every --item_text_inputs value; other fused the first
BOOLEANS = ("false", "true")


@dataclasses.dataclass(frozen=True)
class Run:
  backbone: str  # NONE for the backbone-free rankers
  mode: str  # a key of slim.MODES
  fusion: str  # the ID-based modes' user side; NONE for the others
  encoder: str  # an --encoders name; NONE for plain and popularity
  schedule: str  # slim.rationale_schedule of the trained rationale readers; NONE for the others
  item_text_input: str  # "false" | "true" for the fused backbone variants; NONE for the others
  seed: int

  @property
  def name(self) -> str:
    """The run's directory: its settings that apply, e.g. sasrec_plain_s0 or
    sasrec_id_based_paper_minilm_read-causal_textinput_s1 (textinput: item_text_input on)."""
    parts = [self.backbone, self.mode, self.fusion, self.encoder,
             NONE if self.schedule == NONE else f"read-{self.schedule}",
             "textinput" if self.item_text_input == "true" else NONE, f"s{self.seed}"]
    return "_".join(part for part in parts if part != NONE)

  @property
  def group(self) -> tuple[str, ...]:
    """What the table averages over seeds."""
    return (self.backbone, self.mode, self.fusion, self.encoder, self.schedule,
            self.item_text_input)

  @property
  def fields(self) -> dict[str, str]:
    """The group as a table row names it."""
    return dict(zip(GROUP_FIELDS, self.group))


GROUP_FIELDS = ("backbone", "variant", "fusion", "encoder", "schedule", "item_text_input")
SETTINGS = tuple(name for name in GROUP_FIELDS if name != "variant")
MAIN = ("encoder", "fusion", "schedule", "item_text_input")  # settings swept as lists


def encoder_setting(name: str) -> tuple[str, str, bool]:
  """(encoder.kind, encoder.postprocess, slim.finetune_encoder) of an --encoders name."""
  base, postprocess = name, "none"
  for suffix in POSTPROCESS_SUFFIXES:
    if name.endswith(f"_{suffix}"):
      base, postprocess = name[:-len(suffix) - 1], suffix
  if base not in ENCODER_KINDS:
    raise ValueError(f"--encoders: {name!r} is not one of {ENCODER_KINDS}, optionally followed "
                     f"by _{' or _'.join(POSTPROCESS_SUFFIXES)}")
  return ("minilm" if base == "minilm_finetuned" else base), postprocess, base == "minilm_finetuned"


def main_settings(encoders, fusions, schedules, item_text_inputs) -> dict[str, str]:
  """The sweep's main setting of each list: the first."""
  return dict(zip(MAIN, (encoders[0], fusions[0], schedules[0], item_text_inputs[0])))


def at_main(row: Mapping[str, str], main: Mapping[str, str]) -> bool:
  """Whether a row (or Run.fields) has the main value of every setting it has."""
  return all(row[name] in (NONE, main[name]) for name in MAIN)


def _check(flag: str, values: Sequence[str], allowed: Iterable[str]) -> None:
  allowed = tuple(allowed)
  for value in values:
    if value not in allowed:
      raise ValueError(f"--{flag}: {value!r} is not one of {allowed}")


def plan(backbones, encoders, fusions, seeds, variants, schedules=("causal",),
         item_text_inputs=("false",)) -> list[Run]:
  """Every run of the sweep, seed by seed (see the module docstring for which variant gets which
  settings); the first value of each list is its main one."""
  _check("variants", variants, slim.MODES)
  _check("fusions", fusions, slim.FUSIONS)
  _check("schedules", schedules, slim.SCHEDULES)
  _check("item_text_inputs", item_text_inputs, BOOLEANS)
  for encoder in encoders:
    encoder_setting(encoder)
  wanted = lambda *modes: [mode for mode in modes if mode in variants]
  runs = []
  for seed in seeds:
    for backbone in backbones:
      runs += [Run(backbone, "plain", NONE, NONE, NONE, NONE, seed) for _ in wanted("plain")]
      for encoder in encoders:
        for text_input in item_text_inputs:
          run = lambda mode, fusion=NONE, schedule=NONE: Run(backbone, mode, fusion, encoder,
                                                             schedule, text_input, seed)
          main_input = text_input == item_text_inputs[0]
          for mode in wanted("item_text", "item_text_permuted", "id_based", "shuffled",
                             "constant_rationale", "history_text", "teacher_rationales"):
            if not (main_input or mode in TEXT_INPUTS):
              continue
            fusions_ = fusions if mode == "id_based" else fusions[:1]
            schedules_ = (schedules if mode in SCHEDULED else schedules[:1]
                          ) if mode in READERS else [NONE]
            runs += [run(mode, fusion if mode in READERS else NONE, schedule)
                     for fusion in fusions_ for schedule in schedules_]
    runs += [Run(NONE, "id_agnostic", NONE, encoder, schedules[0], NONE, seed)
             for encoder in encoders if wanted("id_agnostic")]
  # Deterministic: one seed is enough; a fine-tuned encoder trains nothing here.
  runs += [Run(NONE, "zero_shot", NONE, encoder, NONE, NONE, seeds[0]) for encoder in encoders
           if wanted("zero_shot") and not encoder_setting(encoder)[2]]
  runs += [Run(NONE, "popularity", NONE, NONE, NONE, NONE, seeds[0])
           for _ in wanted("popularity")]
  return runs


def order(runs: Sequence[Run], how: str, main: Mapping[str, str]) -> list[Run]:
  """The order to train `runs` in: "seed", seed by seed, so that an interrupted sweep leaves
  complete seeds to table; "group", all seeds of a group before the next group. Within either,
  the runs of the primary contrasts at the main settings come first."""
  primary = {mode for pair in stats.PRIMARY_CONTRASTS for mode in pair}
  later = lambda run: not (run.mode in primary and at_main(run.fields, main))
  if how == "seed":
    return sorted(runs, key=lambda run: (run.seed, later(run)))  # stable: plan order within
  if how != "group":
    raise ValueError(f"--order: {how!r} is not one of ('seed', 'group')")
  first = {}
  for i, run in enumerate(runs):
    first.setdefault(run.group, i)
  return sorted(runs, key=lambda run: (later(run), first[run.group], run.seed))


def run_config(run: Run, cfg: config_lib.Config) -> config_lib.Config:
  """The config of one run, as written: `cfg` with the run's mode alone in slim.modes (so its
  config hash does not change when slim.MODES grows), backbone, seed, encoder (kind,
  postprocessing, fine-tuning), fusion, schedule and item-text input."""
  kind, postprocess, finetune = (encoder_setting(run.encoder) if run.encoder != NONE else
                                 (cfg.encoder.kind, cfg.encoder.postprocess, False))
  given = lambda value, default: default if value == NONE else value
  rec = dataclasses.replace(cfg.rec, backbone=given(run.backbone, cfg.rec.backbone), seed=run.seed)
  slim_cfg = dataclasses.replace(
      cfg.slim, modes=(run.mode,), finetune_encoder=finetune,
      fusion=given(run.fusion, cfg.slim.fusion),
      rationale_schedule=given(run.schedule, cfg.slim.rationale_schedule),
      item_text_input=given(run.item_text_input, str(cfg.slim.item_text_input).lower()) == "true")
  encoder = dataclasses.replace(cfg.encoder, kind=kind, postprocess=postprocess)
  return dataclasses.replace(cfg, rec=rec, slim=slim_cfg, encoder=encoder)


def config_hash(cfg: config_lib.Config, mode: str) -> str:
  """sha256 of a run's resolved config and mode. Resolved against a symbolic work directory, so
  that a moved work directory keeps its runs; resolved, so that a changed default (a backbone's
  settings) is a changed config."""
  resolved = cfg.resolved(pathlib.Path("<workdir>"))
  text = json.dumps({"config": dataclasses.asdict(resolved), "mode": mode}, sort_keys=True,
                    default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _stored_hash(directory: pathlib.Path) -> str | None:
  path = directory / CONFIG_HASH
  return path.read_text().strip() if path.is_file() else None


def run_directory(runs_root: pathlib.Path, name: str, digest: str) -> pathlib.Path:
  """Where the run of config hash `digest` lives: <name>/ when it is free or holds that config;
  else <name>_<digest[:12]>/, so that a directory of another config (or of none recorded: a run
  from before config hashes) is never reused nor overwritten."""
  plain, suffixed = runs_root / name, runs_root / f"{name}_{digest[:12]}"
  if _stored_hash(plain) == digest:
    return plain
  if suffixed.exists():
    if _stored_hash(suffixed) != digest:
      raise RuntimeError(f"{suffixed} holds a run of another config")
    return suffixed
  return suffixed if plain.exists() else plain


def is_complete(directory: pathlib.Path) -> bool:
  """Whether a run directory holds a finished run: its metrics and its ranked test users."""
  return (directory / layout.METRICS).is_file() and (directory / layout.RANKED_TEST).is_file()


def finished_runs(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Every finished run of any sweep in `workdir` (<out>/runs/<run>/), by config hash: a run that
  another sweep already trained with the same config is read from there, not trained twice."""
  found = {}
  for path in sorted(workdir.glob(f"*/runs/*/{CONFIG_HASH}")):
    if is_complete(path.parent):
      found.setdefault(path.read_text().strip(), path.parent)
  return found


def execute(run: Run, cfg: config_lib.Config, directory: pathlib.Path, workdir: pathlib.Path,
            prepared, encoded: Mapping, minilm, mesh) -> dict:
  """Trains one run (`cfg` is run_config's, resolved as launch.py resolves a config) into
  `directory`, first recording its config hash there; a complete run is read, not retrained."""
  if is_complete(directory):
    return json.loads((directory / layout.METRICS).read_text())
  logging.info("ablation run %s into %s", run.name, directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_HASH).write_text(config_hash(cfg, run.mode) + "\n")
  resolved = cfg.resolved(workdir)
  vectors = (None if run.encoder == NONE else
             encoded[resolved.encoder.kind, resolved.encoder.postprocess])
  return recommend.train_recommender(resolved.rec, prepared, directory, mesh, run.mode,
                                     resolved.slim, vectors,
                                     minilm if resolved.slim.finetune_encoder else None)


def complete_groups(runs: Sequence[Run], present: set[Run]) -> tuple[list[Run], list[Run]]:
  """(the runs of the groups present for every seed planned, the runs missing): the table
  averages over the same seeds in every row."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.group, []).append(run)
  kept = [run for run in runs if all(r in present for r in groups[run.group])]
  return kept, [run for run in runs if run not in present]


def complete_seeds(runs: Sequence[Run], present: set[Run]) -> list[int]:
  """The seeds whose every planned run is present: --seeds to table a stopped sweep with."""
  seeds = sorted({run.seed for run in runs})
  return [seed for seed in seeds if all(run in present for run in runs if run.seed == seed)]


def row_group(row: Mapping) -> tuple[str, ...]:
  """The Run.group a table row averages."""
  return tuple(row[name] for name in GROUP_FIELDS)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and standard deviation over seeds (ddof 1: the seeds are a sample); None for one."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def summarize(runs: Sequence[Run], results: Sequence[dict]) -> list[dict]:
  """A row per group: mean and standard deviation over seeds of METRICS under both protocols,
  and of HISTORY_SHARE when every seed's run reports it."""
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
        row[f"{protocol}/{metric}"], row[f"{protocol}/{metric}_std"] = _mean_std(
            [recommend.protocol_metrics(t, protocol)[metric] for t in tests])
    shares = [t.get(HISTORY_SHARE) for t in tests]
    if None not in shares:
      row[HISTORY_SHARE], row[f"{HISTORY_SHARE}_std"] = _mean_std(shares)
    rows.append(row)
  return rows


def reference(rows: Sequence[dict], row: Mapping, against: str) -> dict | None:
  """The `against` row `row` is compared with: the first with the same value of every setting
  both have (a setting either lacks, NONE, matches any: item_text has no schedule, and the
  backbone-free rankers meet the first backbone's plain); None when there is none. Only a row
  with a backbone is compared with shuffled."""
  if against == "shuffled" and row["backbone"] == NONE:
    return None
  return next((r for r in rows if r["variant"] == against
               and all(r[name] == row[name] or NONE in (r[name], row[name])
                       for name in SETTINGS)), None)


def setting_pairs(rows: Sequence[dict], main: Mapping[str, str]) -> list[tuple[dict, dict]]:
  """(row, base): each row under another encoder, fusion, schedule or item-text input than the
  main one against the same row under the main one: what another encoder or fusion changes, what
  the paper's leaky schedule buys, what the encoder input does."""
  pairs = []
  for row in rows:
    for name in MAIN:
      if row[name] not in (NONE, main[name]):
        pairs += [(row, base) for base in rows if base[name] == main[name] and all(
            base[other] == row[other] for other in GROUP_FIELDS if other != name)][:1]
  return pairs


def against(row: Mapping, base: Mapping) -> str:
  """What a row is compared with, as the table names it: the other variant, or the settings in
  which the same variant differs."""
  if row["variant"] != base["variant"]:
    return base["variant"]
  return ", ".join(f"{name} {base[name]}" for name in SETTINGS if base[name] != row[name])


def comparisons(runs: Sequence[Run], rows: Sequence[dict],
                users: Sequence[Mapping[str, Mapping[int, float]]],
                main: Mapping[str, str]) -> list[dict]:
  """The contrasts of the table (`stats.contrast_pairs`, `stats.contrasts`), per protocol:
  primary, the stats.PRIMARY_CONTRASTS of each backbone at the main settings (Holm within the
  backbone's family); controls, every row against plain and shuffled, the
  stats.CONTROL_CONTRASTS and the `setting_pairs` (Benjamini-Hochberg over all). `users[i]` is
  run i's {protocol: {user: TESTED}}."""
  by_group: dict[tuple, dict[int, Mapping]] = {}
  for run, per_user in zip(runs, users):
    by_group.setdefault(run.group, {})[run.seed] = per_user
  pairs = stats.contrast_pairs(rows, lambda row, variant: reference(rows, row, variant),
                               lambda row: at_main(row, main), setting_pairs(rows, main))
  out = []
  for contrast in stats.contrasts(pairs, lambda row: by_group[row_group(row)]):
    row, base = contrast.pop("row"), contrast.pop("base")
    out.append({**{name: row[name] for name in GROUP_FIELDS}, "against": against(row, base),
                "metric": TESTED, **contrast})
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


def _header(*columns: str) -> list[str]:
  return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


GROUP_HEADER = ("backbone", "variant", "fusion", "encoder", "schedule", "item text input")


def _cell(row: Mapping, name: str) -> str:
  """mean ± standard deviation over seeds; the mean alone from one seed; "" when absent."""
  if name not in row:
    return ""
  std = row[f"{name}_std"]
  return f"{row[name]:.4f}" + ("" if std is None else f" ± {std:.4f}")


def rows_table(rows: Sequence[dict], negatives: str) -> list[str]:
  """Table (i): the metrics of every row; the history share only when some run reports it."""
  share = any(HISTORY_SHARE in row for row in rows)
  lines = _header(*GROUP_HEADER, "seeds", "NDCG@10", "HR@10", f"NDCG@10 ({negatives})",
                  f"HR@10 ({negatives})", *(["history share@10"] if share else []))
  lines += [f"| {_named(r)} | {r['seeds']} | {_cell(r, 'full/ndcg@10')} | "
            f"{_cell(r, 'full/hr@10')} | {_cell(r, 'sampled/ndcg@10')} | "
            f"{_cell(r, 'sampled/hr@10')} |" + (f" {_cell(r, HISTORY_SHARE)} |" if share else "")
            for r in rows]
  teacher = [f"{_named(r)}: {count} users read the teacher's rationale instead of the "
             f"student's ({split} split)." for r in rows
             for split, count in r.get("users_with_teacher_rationale", {}).items()]
  return lines + (["", *teacher] if teacher else [])


def _tests(c: Mapping, negatives: str) -> str:
  """The cells a contrast has in both tables: protocol, change, difference, p-values."""
  protocol = "full ranking" if c["protocol"] == "full" else negatives
  return (f"{protocol} | {stats.describe_change(c['change'])} | {stats.describe_interval(c)} | "
          + " | ".join(stats.describe_p(c[name]) for name in
                       ("p_seeds", "p_seeds_adjusted", "p_users", "p_users_adjusted")))


def primary_table(compared: Sequence[dict], negatives: str, main: Mapping[str, str]) -> list[str]:
  """Table (ii): the primary contrasts, Holm-corrected per backbone and protocol."""
  primary = [c for c in compared if c["primary"]]
  if not primary:
    return []
  settings = ", ".join(f"{name} {main[name]}" for name in MAIN)
  return ["", f"Primary contrasts of {TESTED.upper()} at {settings}: {stats.PRIMARY_LEGEND}", "",
          *_header("backbone", "contrast", "seeds", "users", "MDE", "protocol", "change",
                   "difference [95% CI]", "p over seeds", "Holm", "p over users", "Holm"),
          *(f"| {c['backbone']} | {c['variant']} vs {c['against']} | {c['seeds']} | "
            f"{c['users']} | {stats.describe_mde(c)} | {_tests(c, negatives)} |"
            for c in primary)]


def controls_table(compared: Sequence[dict], negatives: str) -> list[str]:
  """Table (iii): the controls, Benjamini-Hochberg adjusted over all of them."""
  controls = [c for c in compared if not c["primary"]]
  if not controls:
    return []
  return ["", f"Controls, paired tests of {TESTED.upper()} (as above; adjusted: "
          "Benjamini-Hochberg over every control of the column):", "",
          *_header(*GROUP_HEADER, "against", "protocol", "change", "difference [95% CI]",
                   "p over seeds", "adjusted", "p over users", "adjusted"),
          *(f"| {_named(c)} | {c['against']} | {_tests(c, negatives)} |" for c in controls)]


def gains_table(gains: Sequence[dict]) -> list[str]:
  """Table (iv): the gain over plain per quintile of history length."""
  if not gains:
    return []
  groups = gains[0]["groups"]
  lines = ["", f"Full-ranking {TESTED.upper()} gain over plain per quintile of history length "
           "(users' seed means; 95% bootstrap interval):", "",
           *_header(*GROUP_HEADER, *(f"G{g['group']} ({g['min_length']}-{g['max_length']})"
                                     for g in groups))]
  lines += [f"| {_named(g)} | " + " | ".join(
      f"{q['gain']:+.4f} [{q['low']:+.4f}, {q['high']:+.4f}]" for q in g["groups"]) + " |"
            for g in gains]
  return lines + ["", "![gain per history quintile](quintiles.png)"]


def missing_note(missing: Sequence[Run], seeds: Sequence[int]) -> list[str]:
  """Section (v): the runs not there yet, whose groups the tables leave out."""
  if not missing:
    return []
  return ["", f"Not in the tables: the groups of these {len(missing)} missing runs: "
          + ", ".join(run.name for run in missing) + ". Seeds complete for every run: "
          + (", ".join(map(str, seeds)) or "none") + "."]


def markdown(rows: Sequence[dict], compared: Sequence[dict], gains: Sequence[dict],
             negatives: str, main: Mapping[str, str], missing: Sequence[Run] = (),
             seeds: Sequence[int] = ()) -> str:
  """The tables of table.md."""
  return "\n".join([*rows_table(rows, negatives), *primary_table(compared, negatives, main),
                    *controls_table(compared, negatives), *gains_table(gains),
                    *missing_note(missing, seeds)])


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


def write_tables(root: pathlib.Path, runs: Sequence[Run], directories: Mapping[Run, pathlib.Path],
                 main: Mapping[str, str], history_lengths: np.ndarray, negatives: str) -> str:
  """table.md, table.json and quintiles.png of the runs whose groups are complete (the others
  listed as missing), from their directories alone; returns table.md's text."""
  present = {run for run in runs if is_complete(directories[run])}
  kept, missing = complete_groups(runs, present)
  results = [json.loads((directories[run] / layout.METRICS).read_text()) for run in kept]
  users = []
  for run in kept:
    ranked = np.load(directories[run] / layout.RANKED_TEST)
    users.append({protocol: stats.user_metric(ranked, protocol, TESTED)
                  for protocol in stats.PROTOCOLS})
  rows = summarize(kept, results)
  compared = comparisons(kept, rows, users, main)
  gains = quintile_gains(kept, rows, users, history_lengths)
  seeds = complete_seeds(runs, present)
  if gains:
    plot_gains(root / "quintiles.png", gains)
  text = markdown(rows, compared, gains, negatives, main, missing, seeds)
  root.mkdir(parents=True, exist_ok=True)
  (root / "table.md").write_text(text + "\n")
  (root / "table.json").write_text(json.dumps(
      {"main": dict(main), "rows": rows, "comparisons": compared, "quintile_gains": gains,
       "missing": [run.name for run in missing], "complete_seeds": seeds}, indent=2))
  return text


def main(argv):
  del argv
  cfg = config_lib.from_flags(_CONFIG.value, _SET.value)
  workdir = pathlib.Path(_WORKDIR.value)
  cfg.checked()  # a bad value fails here, not runs later
  root = workdir / _OUT.value
  main_ = main_settings(_ENCODERS.value, _FUSIONS.value, _SCHEDULES.value,
                        _ITEM_TEXT_INPUTS.value)
  runs = order(plan(_BACKBONES.value, _ENCODERS.value, _FUSIONS.value,
                    [int(s) for s in _SEEDS.value], _VARIANTS.value, _SCHEDULES.value,
                    _ITEM_TEXT_INPUTS.value), _ORDER.value, main_)
  configs = {run: run_config(run, cfg) for run in runs}
  for config in configs.values():
    config.checked()
  digests = {run: config_hash(configs[run], run.mode) for run in runs}
  finished = finished_runs(workdir)
  directories = {run: finished.get(digests[run]) or run_directory(root / "runs", run.name,
                                                                   digests[run])
                 for run in runs}
  prepared = pipeline.load_prepared(workdir)
  if not _TABLE_ONLY.value:
    mesh = parallel.make_mesh(cfg.mesh.axes())
    # Each encoder as launch.py would resolve it; a fine-tuned MiniLM starts from the frozen one's.
    encoders = {kind: dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, kind=kind))
                .resolved(workdir).encoder
                for kind in sorted({configs[run].encoder.kind for run in runs
                                    if run.encoder != NONE})}
    settings = sorted({encoder_setting(run.encoder)[:2] for run in runs if run.encoder != NONE})
    encoded = {}
    for kind, encoder in encoders.items():
      out = workdir / "ablations" / f"encode_{kind}"  # shared by every sweep
      out.mkdir(parents=True, exist_ok=True)
      encode.encode_stage(encoder, prepared, pipeline.rationale_paths(workdir), out, mesh)
      encoded |= {(kind, postprocess): encode.load_encoded(out, prepared, postprocess)
                  for kind_, postprocess in settings if kind_ == kind}
    minilm = (bert.load(embed.checkpoint_dir(encoders["minilm"]), cfg.encoder.max_len)
              if any(configs[run].slim.finetune_encoder for run in runs) else None)
    for run in runs:
      execute(run, configs[run], directories[run], workdir, prepared, encoded, minilm, mesh)
  negatives = f"{cfg.rec.sampled_negatives} {cfg.rec.sampled_eval} unseen negatives"
  print(write_tables(root, runs, directories, main_,
                     np.diff(prepared.split("test").history_offsets), negatives))


if __name__ == "__main__":
  app.run(main)
