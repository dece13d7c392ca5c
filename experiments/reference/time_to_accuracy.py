"""Wall-clock time to reach RecBole's best validation NDCG@10, ours against RecBole's, as JSON.

  python -m experiments.reference.time_to_accuracy \
      --ours=runs/gru4rec/train/gru4rec_plain/metrics.json \
      --recbole=runs/recbole/gru4rec.json

`--ours` is a recommender run's metrics.json (its `history` holds every validation with the
run's elapsed seconds, compilation included); `--recbole` is what experiments/reference/recbole_train.py
wrote (its `curve` holds each epoch's cumulative seconds, validation included). The target is
RecBole's best validation NDCG@10; each side's time is that of its first validation reaching it.
Both runs should have had the machine to themselves: the script compares the clocks they logged.
"""

import json
import pathlib

from absl import app, flags

_OURS = flags.DEFINE_string("ours", None, "Our run's metrics.json.", required=True)
_RECBOLE = flags.DEFINE_string("recbole", None, "recbole_reference.py's JSON.", required=True)


def first_reaching(curve: list[tuple[float, float]], target: float) -> float | None:
  """Seconds of the first (seconds, score) point whose score reaches target; None if none does."""
  return next((seconds for seconds, score in curve if score >= target), None)


def compare(ours: dict, recbole: dict) -> dict:
  target = recbole["best_valid_ndcg@10"]
  recbole_curve = [(r["cumulative_seconds"], r["valid_ndcg@10"]) for r in recbole["curve"]]
  ours_curve = [(r["elapsed_seconds"], r["valid/ndcg@10"]) for r in ours["history"]]
  ours_seconds = first_reaching(ours_curve, target)
  recbole_seconds = first_reaching(recbole_curve, target)
  return {
      "backbone": ours["backbone"], "target_valid_ndcg@10": target,
      "recbole_seconds": recbole_seconds, "ours_seconds": ours_seconds,
      "speedup": recbole_seconds / ours_seconds if ours_seconds else None,
      "ours_best_valid_ndcg@10": max(score for _, score in ours_curve),
      "ours_test": {k: ours["test"][k] for k in ("ndcg@10", "hr@10", "mrr@10")},
      "recbole_test": {k: recbole["test"][k] for k in ("ndcg@10", "hit@10", "mrr@10")},
      "recbole_converged": recbole.get("converged"),
  }


def main(argv):
  del argv
  ours = json.loads(pathlib.Path(_OURS.value).read_text())
  recbole = json.loads(pathlib.Path(_RECBOLE.value).read_text())
  print(json.dumps(compare(ours, recbole), indent=2))


if __name__ == "__main__":
  app.run(main)
