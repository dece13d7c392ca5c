"""RecBole's trained model evaluated by slim-jax: same model, same split, same metrics, as JSON.

  /work/recbole-venv/bin/python -m experiments.reference.recbole_train --model=SASRec \
      --export_from=<run>_recbole/saved/SASRec-<date>.pth --out=runs/recbole/sasrec.weights.npz
  python -m experiments.reference.recbole_weights --weights=runs/recbole/sasrec.weights.npz \
      --recbole=runs/recbole/sasrec.json --workdir=<a work directory with the prepare stage>

Loads the tensors of a RecBole 1.2.1 SASRec, GRU4Rec or SRGNN (RecBole's names, item rows in
RecBole's id order) into our backbone, our item order (slim_jax/checkpoints/recbole.py), and
ranks the validation and test users with our loader and metrics. Equal metrics show that our
backbone computes RecBole's function and that our split and full-ranking evaluation are
RecBole's: an accuracy gap between the two trainings then comes from training, not from the
model or the protocol.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax import metrics, parallel, pipeline
from slim_jax.checkpoints import recbole
from slim_jax.data import loader
from slim_jax.models.recommender import RecConfig
from slim_jax.train import recommend

_WEIGHTS = flags.DEFINE_string("weights", None, "recbole_reference.py's .weights.npz.",
                               required=True)
_RECBOLE = flags.DEFINE_string("recbole", None, "recbole_reference.py's JSON of the same run.",
                               required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory holding the prepare stage.",
                               required=True)


def evaluate(weights_path: str, recbole_path: str, workdir: str) -> dict:
  reference = json.loads(pathlib.Path(recbole_path).read_text())
  backbone = reference["model"].lower()
  config = reference["config"]
  with np.load(weights_path) as f:
    tensors = {k: f[k] for k in f.files}
  prepared = pipeline.load_prepared(pathlib.Path(workdir))
  items = recbole.item_rows(tensors.pop("item_tokens"), prepared.item_ids, weights_path)
  if backbone == "sasrec":
    cfg = RecConfig(backbone="sasrec", hidden=config["hidden_size"], layers=config["n_layers"],
                    heads=config["n_heads"], inner=config["inner_size"],
                    max_len=config["MAX_ITEM_LIST_LENGTH"])
    params = recbole.sasrec_params(tensors, items, cfg.heads)
  elif backbone == "gru4rec":
    cfg = RecConfig(backbone="gru4rec", hidden=config["embedding_size"],
                    gru_hidden=config["hidden_size"], layers=config["num_layers"],
                    max_len=config["MAX_ITEM_LIST_LENGTH"])
    params = recbole.gru4rec_params(tensors, items)
  elif backbone == "srgnn":
    cfg = RecConfig(backbone="srgnn", hidden=config["embedding_size"], layers=config["step"],
                    max_len=config["MAX_ITEM_LIST_LENGTH"])
    params = recbole.srgnn_params(tensors, items)
  else:
    raise ValueError(f"{recbole_path}: model {reference['model']!r}; expected SASRec, GRU4Rec "
                     "or SRGNN")
  cfg = cfg.resolved()
  mesh = parallel.make_mesh({"data": -1})
  model = recommend.build_model(cfg, prepared.num_items)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32),
                                           jnp.zeros((1,), jnp.int32), {}))
  params = {"params": {"backbone": jax.tree.map(jnp.asarray, params)}}
  if jax.tree.structure(params) != jax.tree.structure(init):
    raise ValueError(f"{weights_path}: the converted tensors do not form our {backbone}'s params")
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(init),
                                  jax.tree.leaves(params)):
    if ours.shape != theirs.shape:
      raise ValueError(f"{weights_path}: {jax.tree_util.keystr(path)} has shape {theirs.shape}, "
                       f"ours {ours.shape}")
  eval_step = recommend.make_eval_step(model, cfg)
  sides = recommend.device_sides(None, mesh)
  out = {"backbone": backbone, "weights": weights_path, "recbole_best_epoch": reference["best_epoch"]}
  for split in ("valid", "test"):
    batches = loader.next_item_eval(prepared, split, max_len=cfg.max_len,
                                    batch_size=cfg.eval_batch, mesh=mesh)
    ranked = recommend.rank_users(eval_step, params, sides[split], batches)
    ours = metrics.ranking_metrics(ranked["ranks"])
    theirs = {k.replace("hit@", "hr@"): v for k, v in reference[split].items()}
    shared = sorted(set(ours) & set(theirs))
    lengths = np.diff(prepared.split(split).history_offsets)[ranked["users"]]
    out[split] = {"ours": {k: float(ours[k]) for k in shared}, "recbole": {k: theirs[k] for k in shared},
                  "max_abs_difference": max(abs(float(ours[k]) - theirs[k]) for k in shared),
                  "users": int(len(ranked["ranks"])),
                  # as in our metrics.json: where in the history lengths two trainings differ
                  "groups": metrics.grouped_metrics(ranked["ranks"], lengths)}
  return out


def main(argv):
  del argv
  print(json.dumps(evaluate(_WEIGHTS.value, _RECBOLE.value, _WORKDIR.value), indent=1))


if __name__ == "__main__":
  app.run(main)
