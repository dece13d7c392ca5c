"""RecBole's trained model evaluated by slim-jax: same model, same split, same metrics, as JSON.

  /work/recbole-venv/bin/python -m experiments.recbole_reference --model=SASRec \
      --export_from=<run>_recbole/saved/SASRec-<date>.pth --out=runs/recbole/sasrec.weights.npz
  python -m experiments.recbole_weights --weights=runs/recbole/sasrec.weights.npz \
      --recbole=runs/recbole/sasrec.json --workdir=<a work directory with the prepare stage>

Loads the tensors of a RecBole 1.2.1 SASRec, GRU4Rec or SRGNN (RecBole's names, item rows in RecBole's
id order) into our backbone, our item order, and ranks the validation and test users with our
loader and metrics. Equal metrics show that our backbone computes RecBole's function and that
our split and full-ranking evaluation are RecBole's: an accuracy gap between the two trainings
then comes from training, not from the model or the protocol.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from slim_jax import metrics, parallel, pipeline
from slim_jax.data import loader
from slim_jax.models.recommender import RecConfig
from slim_jax.train import recommend

_WEIGHTS = flags.DEFINE_string("weights", None, "recbole_reference.py's .weights.npz.",
                               required=True)
_RECBOLE = flags.DEFINE_string("recbole", None, "recbole_reference.py's JSON of the same run.",
                               required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory holding the prepare stage.",
                               required=True)


def _dense(w, b=None) -> dict:
  """A torch Linear (weight [out, in]) as a flax Dense."""
  return {"kernel": w.T, **({} if b is None else {"bias": b})}


def _layer_norm(t: dict, prefix: str) -> dict:
  return {"scale": t[f"{prefix}.weight"], "bias": t[f"{prefix}.bias"]}


def sasrec_params(t: dict, items: np.ndarray, heads: int) -> dict:
  """RecBole's SASRec tensors as our SASRec's params (items: RecBole row of each of our rows)."""
  hidden = t["position_embedding.weight"].shape[1]
  split = lambda x: x.reshape(*x.shape[:-1], heads, hidden // heads)  # torch's head reshape

  def block(i):
    p = f"trm_encoder.layer.{i}"
    attn = {name: {"kernel": split(t[f"{p}.multi_head_attention.{name}.weight"].T),
                   "bias": split(t[f"{p}.multi_head_attention.{name}.bias"])}
            for name in ("query", "key", "value")}
    attn["out"] = {"kernel": t[f"{p}.multi_head_attention.dense.weight"].T.reshape(
        heads, hidden // heads, hidden), "bias": t[f"{p}.multi_head_attention.dense.bias"]}
    return {"attn": attn,
            "ln_attn": _layer_norm(t, f"{p}.multi_head_attention.LayerNorm"),
            "ffn_in": _dense(t[f"{p}.feed_forward.dense_1.weight"],
                             t[f"{p}.feed_forward.dense_1.bias"]),
            "ffn_out": _dense(t[f"{p}.feed_forward.dense_2.weight"],
                              t[f"{p}.feed_forward.dense_2.bias"]),
            "ln_ffn": _layer_norm(t, f"{p}.feed_forward.LayerNorm")}

  layers = len({k.split(".")[2] for k in t if k.startswith("trm_encoder.layer.")})
  return {"encoder": {"item_emb": {"embedding": t["item_embedding.weight"][items]},
                      "pos_emb": {"embedding": t["position_embedding.weight"]},
                      "ln": _layer_norm(t, "LayerNorm"),
                      **{f"blocks_{i}": block(i) for i in range(layers)}}}


def gru4rec_params(t: dict, items: np.ndarray) -> dict:
  """RecBole's GRU4Rec (torch.nn.GRU without biases) as ours, whose GRU cell's biases are 0."""
  def cell(i):
    ih, hh = (np.split(t[f"gru_layers.weight_{side}_l{i}"], 3) for side in ("ih", "hh"))
    gates = dict(zip("rzn", zip(ih, hh)))  # torch stacks the reset, update and new gates' rows
    zero = np.zeros(hh[0].shape[0], np.float32)
    return {"cell": {**{f"i{g}": _dense(w_i, zero) for g, (w_i, _) in gates.items()},
                     "hr": _dense(gates["r"][1]), "hz": _dense(gates["z"][1]),
                     "hn": _dense(gates["n"][1], zero)}}

  layers = len([k for k in t if k.startswith("gru_layers.weight_ih_l")])
  return {"item_emb": {"embedding": t["item_embedding.weight"][items]},
          **{f"gru_{i}": cell(i) for i in range(layers)},
          "proj": _dense(t["dense.weight"], t["dense.bias"])}


def srgnn_params(t: dict, items: np.ndarray) -> dict:
  """RecBole's SRGNN tensors as ours (its GNN's parameter names, torch's [out, in] transposed)."""
  gnn = {name: t[f"gnn.{name}"].T for name in ("w_ih", "w_hh")}
  gnn.update({name: t[f"gnn.{name}"] for name in ("b_ih", "b_hh", "b_iah", "b_ioh")})
  for side in ("in", "out"):
    gnn[f"edge_{side}"] = _dense(t[f"gnn.linear_edge_{side}.weight"],
                                 t[f"gnn.linear_edge_{side}.bias"])
  return {"item_emb": {"embedding": t["item_embedding.weight"][items]}, "gnn": gnn,
          "attn_last": _dense(t["linear_one.weight"], t["linear_one.bias"]),
          "attn_seq": _dense(t["linear_two.weight"], t["linear_two.bias"]),
          "attn_out": _dense(t["linear_three.weight"]),
          "combine": _dense(t["linear_transform.weight"], t["linear_transform.bias"])}


def recbole_rows(recbole_tokens: np.ndarray, item_ids: np.ndarray, source: str) -> np.ndarray:
  """For each of our item rows (raw ids; row 0 padding), RecBole's row of the same item."""
  index = {token: row for row, token in enumerate(recbole_tokens)}
  missing = [i for i in item_ids[1:] if i not in index]
  if missing:
    raise ValueError(f"{source}: {len(missing)} of our items are not in RecBole's item_tokens, "
                     f"e.g. {missing[:3]}: the weights come from another dataset")
  return np.asarray([0] + [index[i] for i in item_ids[1:]])


def evaluate(weights_path: str, recbole_path: str, workdir: str) -> dict:
  reference = json.loads(pathlib.Path(recbole_path).read_text())
  backbone = reference["model"].lower()
  config = reference["config"]
  with np.load(weights_path) as f:
    tensors = {k: f[k] for k in f.files}
  prepared = pipeline.load_prepared(pathlib.Path(workdir))
  items = recbole_rows(tensors.pop("item_tokens"), prepared.item_ids, weights_path)
  if backbone == "sasrec":
    cfg = RecConfig(backbone="sasrec", hidden=config["hidden_size"], layers=config["n_layers"],
                    heads=config["n_heads"], inner=config["inner_size"],
                    max_len=config["MAX_ITEM_LIST_LENGTH"])
    params = sasrec_params(tensors, items, cfg.heads)
  elif backbone == "gru4rec":
    cfg = RecConfig(backbone="gru4rec", hidden=config["embedding_size"],
                    gru_hidden=config["hidden_size"], layers=config["num_layers"],
                    max_len=config["MAX_ITEM_LIST_LENGTH"])
    params = gru4rec_params(tensors, items)
  elif backbone == "srgnn":
    cfg = RecConfig(backbone="srgnn", hidden=config["embedding_size"], layers=config["step"],
                    max_len=config["MAX_ITEM_LIST_LENGTH"])
    params = srgnn_params(tensors, items)
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
    out[split] = {"ours": {k: float(ours[k]) for k in shared}, "recbole": {k: theirs[k] for k in shared},
                  "max_abs_difference": max(abs(float(ours[k]) - theirs[k]) for k in shared),
                  "users": int(len(ranked["ranks"]))}
  return out


def main(argv):
  del argv
  print(json.dumps(evaluate(_WEIGHTS.value, _RECBOLE.value, _WORKDIR.value), indent=1))


if __name__ == "__main__":
  app.run(main)
