"""report.md: what SLIM bought on this dataset, from the artifacts the earlier stages wrote.

Sections: (i) accuracy of each trained variant, metrics only; (ii) the paired tests, both
protocols: the primary contrasts (`stats.PRIMARY_CONTRASTS`, Holm-corrected, with the effect each
could detect), then the controls (against plain and shuffled, `stats.CONTROL_CONTRASTS`); (iii)
popularity bias (table and popularity.png); (iv) user-sparsity groups (table and sparsity.png);
(v) rationale quality, and the leak audit: how many training rows read a rationale that names
their own target under each `slim.rationale_schedule`; (vi) cost: teacher tokens and dollars against student throughput and
hardware; (vii) example users: history, the student's rationale, the top-10 list and the true
next item. Everything is read from what the earlier stages left: their summaries and files
(train/*/metrics.json, ranked_test.npz, the encode stage's vectors, the student's
rationales.jsonl for the examples), which the pipeline hands over, so a report can be rewritten
without retraining or encoding anything.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from slim_jax import (answers, encode, layout, multihost, prompts, quality, rationales, stats,
                      teacher)
from slim_jax.config import Config
from slim_jax.data import loader, side_inputs
from slim_jax.models import slim
from slim_jax.models.slim import MODES, variant_name
from slim_jax.train import recommend

KS = (10, 20)
ACCURACY = [f"{m}@{k}" for k in KS for m in ("hr", "ndcg", "mrr")]
SAMPLED = ["ndcg@10", "hr@10", "hr@20"]  # of the sampled protocol, the paper's metrics
# Popularity bias, and how much of a top-10 recommends items the user already interacted with.
BIAS = [f"{m}@{k}" for k in KS for m in ("mean_popularity", "long_tail", "coverage")] + [
    "history_share@10"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  def cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def label(variant: Mapping) -> str:
  """The variant by its mode's exact name (slim.MODES), after its backbone where it has one."""
  return variant_name(variant["backbone"], variant["mode"])


def load_variants(train_dir: pathlib.Path) -> dict[str, dict]:
  """Each variant's full metrics.json, by directory name, in the order the stage trained them."""
  index = json.loads((train_dir / layout.METRICS).read_text())
  return {name: json.loads((train_dir / name / layout.METRICS).read_text()) for name in index}


def accuracy_section(variants: Mapping[str, dict]) -> str:
  """Test metrics per variant under full ranking and among sampled negatives (the paper's
  protocol): metrics only, the paired tests are `tests_section`'s."""
  rows = [[label(v), *[v["test"][m] for m in ACCURACY],
           *[recommend.sampled_metrics(v["test"])[m] for m in SAMPLED]]
          for v in variants.values()]
  header = ["model", *[m.upper() for m in ACCURACY], *[f"sampled {m.upper()}" for m in SAMPLED]]
  config = next(iter(variants.values()))["config"]
  notes = [f"Sampled: each test target among {config['sampled_negatives']} "
           f"{config['sampled_eval']} negatives drawn from the items the user never interacted "
           "with."]
  notes += [f"{label(v)}: {count} users read the teacher's rationale instead of the student's "
            f"({split} split)." for v in variants.values()
            for split, count in v.get("users_with_teacher_rationale", {}).items()]
  legend = [f"- `{mode}`: {MODES[mode]}" for mode in dict.fromkeys(v["mode"]
                                                                   for v in variants.values())]
  return "\n\n".join([markdown_table(header, rows), *notes, "\n".join(legend)])


def contrasts(variants: Mapping[str, dict], train_dir: pathlib.Path) -> list[dict]:
  """The report's contrasts on its one seed (`stats.contrast_pairs`, `stats.contrasts`), per
  protocol: the stats.PRIMARY_CONTRASTS of each backbone, Holm-corrected within its family; as
  controls every variant against plain and against shuffled and the stats.CONTROL_CONTRASTS,
  Benjamini-Hochberg adjusted together. Each holds the change of NDCG@10, the mean per-user
  difference with its 95% bootstrap interval and minimum detectable effect, and Wilcoxon's p
  over users ("variant" and "against": the two variants' names)."""
  users = {name: {protocol: stats.user_metric(np.load(train_dir / name / layout.RANKED_TEST),
                                              protocol) for protocol in stats.PROTOCOLS}
           for name in variants}
  rows = [{"name": name, "backbone": v["backbone"], "variant": v["mode"]}
          for name, v in variants.items()]

  def reference(row: Mapping, variant: str) -> Mapping | None:
    """The first `variant` of the row's backbone, else of any."""
    candidates = [r for r in rows if r["variant"] == variant]
    return next((r for r in candidates if r["backbone"] == row["backbone"]),
                next(iter(candidates), None))

  pairs = stats.contrast_pairs(rows, reference, lambda row: True)
  out = []
  for contrast in stats.contrasts(pairs, lambda row: {0: users[row["name"]]}):
    row, base = contrast.pop("row"), contrast.pop("base")
    out.append({"variant": row["name"], "against": base["name"], **contrast})
  return out


def tests_section(variants: Mapping[str, dict], train_dir: pathlib.Path) -> str:
  """The paired tests of `contrasts`: the primary ones, then the controls, a row per contrast."""
  negatives = next(iter(variants.values()))["config"]["sampled_negatives"]
  protocols = {"full": "full ranking", "sampled": f"{negatives} negatives"}
  compared = contrasts(variants, train_dir)
  if not compared:
    return "No plain or shuffled variant to compare with."
  cells = lambda c: [label(variants[c["variant"]]), label(variants[c["against"]]),
                     protocols[c["protocol"]], stats.describe_change(c["change"]),
                     stats.describe_interval(c)]
  primary = [[*cells(c), stats.describe_mde(c), stats.describe_p(c["p_users"]),
              stats.describe_p(c["p_users_adjusted"])] for c in compared if c["primary"]]
  controls = [[*cells(c), stats.describe_p(c["p_users"]), stats.describe_p(c["p_users_adjusted"])]
              for c in compared if not c["primary"]]
  header = ["variant", "against", "protocol", "NDCG@10 change", "per-user difference [95% CI]"]
  parts = []
  if primary:
    parts += [f"Primary contrasts: {stats.PRIMARY_LEGEND}",
              markdown_table([*header, "MDE", "p over users", "p (Holm)"], primary)]
  if controls:
    parts += ["Controls (adjusted: Benjamini-Hochberg over the "
              f"{len(controls)} rows of this table):",
              markdown_table([*header, "p over users", "p adjusted"], controls)]
  parts.append("One seed: p is Wilcoxon's signed-rank test over users, two-sided. "
               f"p >= {stats.ALPHA} reads \"{stats.NO_DIFFERENCE}\". Tests over seeds: "
               "experiments/analysis/ablate.py.")
  return "\n\n".join(parts)


def popularity_section(variants: Mapping[str, dict], out: pathlib.Path) -> str:
  rows = [[label(v), *[v["test"][m] for m in BIAS]] for v in variants.values()]
  names = [label(v) for v in variants.values()]
  _bar_plot(out / "popularity.png", names,
            {"long-tail share@10": [v["test"]["long_tail@10"] for v in variants.values()],
             "coverage@10": [v["test"]["coverage@10"] for v in variants.values()]},
            "Popularity bias of the test top-10 lists")
  return (markdown_table(["model", *BIAS], rows) + "\n\nLong tail: items outside the 20% most "
          "popular in training; history share: of the top 10, items the user had interacted with "
          "before the test item. ![popularity bias](popularity.png)")


def sparsity_section(variants: Mapping[str, dict], out: pathlib.Path) -> str:
  groups = next(iter(variants.values()))["test"]["groups"]
  header = ["model", *[f"G{g['group']} ({g['min_length']}-{g['max_length']})" for g in groups]]
  rows = [[label(v), *[g["ndcg@10"] for g in v["test"]["groups"]]] for v in variants.values()]
  _line_plot(out / "sparsity.png", [h for h in header[1:]],
             {label(v): [g["ndcg@10"] for g in v["test"]["groups"]] for v in variants.values()},
             "Test NDCG@10 by user history length (quintiles, G0 sparsest)")
  return (f"Test NDCG@10 per quintile of history length ({groups[0]['users']} users each).\n\n"
          + markdown_table(header, rows) + "\n\n![sparsity groups](sparsity.png)")


def cost_section(cfg: Config, summaries: Mapping[str, dict], prepared) -> str:
  """What the teacher cost (or would cost on ChatGPT) against what the student costs to run."""
  spent = summaries.get(layout.TEACHER, {})
  student = summaries.get(layout.GENERATE, {})
  distill = summaries.get(layout.DISTILL, {})
  whole = teacher.estimate_cost(dataclasses.replace(cfg.teacher, max_users=0), cfg.prompt,
                                prepared)
  rows = [
      ["teacher", spent.get("model", "?"), spent.get("requests", 0),
       spent.get("prompt_tokens", 0), spent.get("completion_tokens", 0),
       f"${spent.get('cost_usd', 0.0):.2f}"],
      ["ChatGPT for every user (dry run)", whole["model"], whole["requests"],
       whole["prompt_tokens"], whole["completion_tokens"], f"${whole['cost_usd']:.2f}"],
  ]
  device = jax.devices()[0]
  lines = [markdown_table(["", "model", "requests", "prompt tokens", "completion tokens",
                           "dollars"], rows), "",
           f"Dry-run prices: ${cfg.teacher.input_usd_per_1k}/1K input, "
           f"${cfg.teacher.output_usd_per_1k}/1K output tokens; completions counted at "
           f"{whole['completion_assumption']}.", ""]
  if distill:
    lines.append(f"- Distillation: {distill['trained_tokens']} tokens at "
                 f"{distill['tokens_per_s']:.1f} tokens/s; held-out perplexity "
                 f"{distill['heldout_perplexity_before']:.3f} -> "
                 f"{distill['heldout_perplexity']:.3f}.")
  if student:
    lines.append(f"- Student: {student['ok']} rationales, {student['generated_tokens']} tokens "
                 f"generated at {student['tokens_per_s']:.1f} tokens/s, $0 per token.")
  lines.append(f"- Hardware: {jax.device_count()} x {device.device_kind} "
               f"({jax.default_backend()}).")
  return "\n".join(lines)


def _share(part: float, whole: float) -> str:
  return f"{100 * part / whole:.1f}%" if whole else ""


def rationale_cosines(encode_dir: pathlib.Path, writer: str) -> dict[str, float]:
  """Mean pairwise cosine of a writer's encoded rationales, raw and centred on the mean of the
  item-text vectors (see quality.centered_cosine), as the encode stage stored them; {} when it
  stored none."""
  stored = encode.load_rationales(encode_dir, writer)
  if stored is None or len(stored["vectors"]) < 2:
    return {}
  item_vectors = np.load(encode_dir / layout.ITEM_VECTORS)
  reference = item_vectors[np.abs(item_vectors).sum(axis=1) > 0].mean(axis=0)
  return quality.centered_cosine(stored["vectors"], reference)


def quality_section(directories: Mapping[str, pathlib.Path],
                    summaries: Mapping[str, dict]) -> str:
  """The teacher's and the student's rationales: how many passed the quality filter, why the
  others did not, how alike they are, and whether step 2 predicts the next item's attributes."""
  writers = {writer: encode.WRITERS[writer] for writer in ("teacher", "student")}
  rows, reasons = [], sorted({r for stage in writers.values()
                              for r in summaries.get(stage, {}).get("rejections", {})})
  for name, stage in writers.items():
    summary = summaries.get(stage, {})
    if not summary.get("quality"):
      continue
    cosine = rationale_cosines(directories[layout.ENCODE], name)
    predictive = summary["quality"]["predictive"]
    low, high = predictive["lift_interval"]
    candidates = summary["candidates"]
    rows.append([
        name, summary["model"], summary["requests"], _share(summary["ok"], summary["requests"]),
        f"{candidates / max(summary['requests'], 1):.2f}",
        *[_share(summary["rejections"].get(reason, 0), candidates) for reason in reasons],
        f"{summary['quality']['distinct_share']:.3f}",
        *(f"{cosine[k]:.3f}" if cosine else "" for k in ("mean_cosine", "mean_cosine_centered")),
        f"{predictive['hit']:.3f} / {predictive['shuffled_hit']:.3f}",
        f"{predictive['lift']:.2f} [{low:.2f}, {high:.2f}]"])
  if not rows:
    return "No rationales were generated."
  header = ["", "model", "requests", "accepted", "candidates per request",
            *[f"rejected: {reason}" for reason in reasons], "distinct texts / accepted",
            "mean cosine", "mean cosine, centred", "step-2 hit / shuffled", "lift [95% CI]"]
  return (markdown_table(header, rows) + "\n\nRejections are shares of all candidates drawn "
          "(the first rule a candidate broke). Cosines are between the encoded accepted "
          "rationales, raw and after subtracting the mean item-text vector. Step-2 hit: share "
          "of users whose step 2 names an attribute of their held-out next item; shuffled: the "
          "same with every other user's next item; lift: their ratio, with a bootstrap interval "
          "over users.")


def examples_section(prepared, directories: Mapping[str, pathlib.Path],
                     variants: Mapping[str, dict], count: int = 5) -> str:
  """`count` users with a student rationale: history, rationale, what its step 2 named against
  the attributes of the held-out item it was written for, top-10 and the true test item."""
  path = directories[layout.GENERATE] / layout.RATIONALES
  if not path.is_file():
    return "No student rationales were generated."
  rows = [row for row in rationales.read_rationales(path)
          if row["split"] == prompts.TRAINING_RATIONALES and row["text"]]
  written = dict(zip(prepared.rows_of([row["user_id"] for row in rows]).tolist(), rows))
  name = next((n for n, v in variants.items() if v["mode"] == "id_based"), next(iter(variants)))
  ranked = np.load(directories[layout.TRAIN] / name / layout.RANKED_TEST)
  test = prepared.split("test")
  vocabulary = quality.catalogue_attributes(prepared)
  title = lambda item: prepared.item_text[item].split(" | ")[0]
  parts = [f"Top-10 lists of **{label(variants[name])}**."]
  for row, user in enumerate(ranked["users"]):
    if len(parts) > count or user not in written:
      continue
    top = [title(i) + (" **(hit)**" if i == test.targets[user] else "")
           for i in ranked["top"][row][:10]]
    history = [title(i) for i in test.history(user)[-10:]]
    text = written[user]["text"]
    named = quality.named_attributes(answers.split_steps(text)[1], vocabulary)
    (following,) = quality.next_items(prepared, [written[user]])
    expected = set(quality.item_attributes(prepared.item_meta[following]))
    parts.append(f"### User {prepared.user_ids[user]}\n\n"
                 f"- Last {len(history)} items: {'; '.join(history)}\n"
                 f"- Step 2 names {', '.join(sorted(named)) or 'no attribute'}; the validation "
                 f"item ({title(following)}) has {', '.join(sorted(expected)) or 'none'}: "
                 f"{'hit' if named & expected else 'miss'}\n"
                 f"- True test item: {title(test.targets[user])} "
                 f"(rank {int(ranked['ranks'][row]) + 1})\n"
                 f"- Top 10: {'; '.join(top)}\n\n"
                 f"Student rationale:\n\n> " + text.strip().replace("\n", "\n> "))
  return "\n\n".join(parts)


def leak_audit(prepared, encoded: encode.Encoded,
               texts: Mapping[tuple[int, str], str]) -> list[dict]:
  """Per schedule the student's rationales allow: how many training rows (every prefix target of
  seq[:-2]) read a rationale, and how many of those read one that names the row's own target
  (`quality.names_title`), by the rule the model reads them with (`slim.rationale_slot`). Under
  the paper's schedule such a row reads its answer; under the causal one the rationale was
  written before the target and named it as a step-3 guess that came true: the difference is
  how often the paper's leak is literal."""
  train = loader.training_part(prepared)
  users, targets = loader.last_position_examples(train)
  positions = (targets - train.starts[users])[:, None]
  rows = []
  for schedule in slim.SCHEDULES:
    cfg = slim.SlimConfig(rationale_schedule=schedule)
    try:
      side = side_inputs.side_inputs(encoded, prepared, len(encoded.item_vectors), cfg,
                                     "id_based")["train"]
    except ValueError:  # no cut-off rationales: the causal schedule has nothing to read
      continue
    splits = (side_inputs.causal_splits(encoded) if schedule == "causal"
              else [side_inputs.paper_split(encoded, "train")])
    slot, keep = (np.asarray(a)[:, 0] for a in slim.rationale_slot(
        side["rationale_cutoff"][users], positions))
    naming = sum(quality.names_title(texts[user, splits[s]], prepared.item_meta[item].title)
                 for user, s, item in zip(users[keep], slot[keep], train.items[targets[keep]]))
    rows.append({"schedule": schedule, "training_rows": len(users), "reading": int(keep.sum()),
                 "naming_target": int(naming)})
  return rows


def leak_section(prepared, directories: Mapping[str, pathlib.Path]) -> str:
  path = directories[layout.GENERATE] / layout.RATIONALES
  encoded_dir = directories[layout.ENCODE]
  if not path.is_file() or not encode.rationales_file(encoded_dir, "student").is_file():
    return "No student rationales were encoded."
  written = rationales.read_rationales(path)
  users = prepared.rows_of([row["user_id"] for row in written])
  texts = {(int(user), row["split"]): row["text"] for user, row in zip(users, written)
           if user >= 0}
  audit = leak_audit(prepared, encode.load_encoded(encoded_dir, prepared), texts)
  table = markdown_table(
      ["schedule", "training rows", "reading a rationale", "whose rationale names the target",
       "share"],
      [[r["schedule"], r["training_rows"], r["reading"], r["naming_target"],
        _share(r["naming_target"], r["reading"])] for r in audit])
  return (table + "\n\nEvery prefix target of each user's training sequence; `paper`: every row "
          "reads the rationale written from seq[:-2], which holds the row's target; `causal` "
          "(slim.rationale_schedule): the latest written from a history that ends before it.")


def write_report(cfg: Config, prepared, directories: Mapping[str, pathlib.Path],
                 summaries: Mapping[str, dict], out: pathlib.Path) -> pathlib.Path:
  """Writes out/report.md and its PNG plots; returns the report's path. `directories` holds every
  stage's directory and `summaries` the summaries of those complete, by stage name."""
  variants = load_variants(directories[layout.TRAIN])
  sections = [
      f"# SLIM report: {cfg.name} ({cfg.preset or 'default'})",
      f"Dataset {cfg.data.name}: {prepared.num_users} users, {prepared.num_items} items; "
      "leave-one-out by time, full ranking over all items"
      f"{', history excluded' if cfg.rec.exclude_history else ''}. Encoder: "
      f"{cfg.encoder.kind}; fusion: {cfg.slim.fusion}"
      f"; postprocess: {cfg.encoder.postprocess}.",
      "## Accuracy (test)", accuracy_section(variants),
      "## Paired tests (test NDCG@10)", tests_section(variants, directories[layout.TRAIN]),
      "## Popularity bias (test)", popularity_section(variants, out),
      "## User sparsity groups (test)", sparsity_section(variants, out),
      "## Rationale quality", quality_section(directories, summaries),
      "## Leak audit (training rows)", leak_section(prepared, directories),
      "## Cost", cost_section(cfg, summaries, prepared),
      "## Example users", examples_section(prepared, directories, variants),
  ]
  path = out / "report.md"
  multihost.write_text(path, "\n\n".join(sections) + "\n")
  return path


def _figure():
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  return plt


def _bar_plot(path: pathlib.Path, names: Sequence[str], series: Mapping[str, Sequence[float]],
              title: str) -> None:
  plt = _figure()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.8 / len(series)
  for i, (name, values) in enumerate(series.items()):
    ax.bar(np.arange(len(names)) + i * width, values, width, label=name)
  ax.set_xticks(np.arange(len(names)) + width * (len(series) - 1) / 2, names, rotation=20,
                ha="right")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  multihost.write(path, lambda staged: fig.savefig(staged, dpi=100))
  plt.close(fig)


def _line_plot(path: pathlib.Path, groups: Sequence[str], series: Mapping[str, Sequence[float]],
               title: str) -> None:
  plt = _figure()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for name, values in series.items():
    ax.plot(groups, values, marker="o", label=name)
  ax.set_ylabel("NDCG@10")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  multihost.write(path, lambda staged: fig.savefig(staged, dpi=100))
  plt.close(fig)
