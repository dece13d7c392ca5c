"""RecBole 1.2.1 model tensors (`experiments/reference/recbole_train.py`'s .weights.npz) as our params.

RecBole names its tensors after its torch modules and orders item rows by its own item ids; these
functions rename, transpose (torch Linear weights are [out, in]) and reorder them into our
backbones' param trees, so a model trained by RecBole is ranked by slim-jax.
"""

from __future__ import annotations

import numpy as np


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


def item_rows(recbole_tokens: np.ndarray, item_ids: np.ndarray, source: str) -> np.ndarray:
  """For each of our item rows (raw ids; row 0 padding), RecBole's row of the same item."""
  index = {token: row for row, token in enumerate(recbole_tokens)}
  missing = [i for i in item_ids[1:] if i not in index]
  if missing:
    raise ValueError(f"{source}: {len(missing)} of our items are not in RecBole's item_tokens, "
                     f"e.g. {missing[:3]}: the weights come from another dataset")
  return np.asarray([0] + [index[i] for i in item_ids[1:]])
