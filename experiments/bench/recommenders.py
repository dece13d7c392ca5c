"""Recommender speed on ml-100k, per backbone, as JSON: training examples/s, seconds per epoch,
full-ranking evaluation users/s (all after compilation).

  python -m experiments.bench.recommenders [--backbones=sasrec,gru4rec] [--steps=30] \
      [--set rec.train_mode=last_position]

A training example is one next-item target with a loss (RecBole trains on 97,171 prefixes per
epoch, one target each; a per-position window holds up to max_len of them). Each backbone uses
its ml-100k experiment config (experiments/configs/ml100k_<backbone>.py). Evaluation ranks all 1,682
items for each of the 943 validation users on the device, as training's validation does.
"""

import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags

from slim_jax import assets, config, host, parallel
from slim_jax.data import formats, loader, preprocess
from slim_jax.models.backbones import BACKBONES
from slim_jax.train import recommend

_BACKBONES = flags.DEFINE_list("backbones", list(BACKBONES), "Backbones to time.")
_STEPS = flags.DEFINE_integer("steps", 30, "Training steps to time per backbone.")
_EVALS = flags.DEFINE_integer("evals", 10, "Full evaluations to time per backbone.")
_SET = flags.DEFINE_multi_string("set", [], "Config override key.sub=value, as in launch.py.")

_CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def bench(cfg, prepared, mesh, steps: int, evals: int) -> dict:
  rec = cfg.rec.resolved()
  model = recommend.build_model(rec, prepared.num_items)
  batches, steps_per_epoch = loader.next_item_training(
      prepared, max_len=rec.max_len, batch_size=rec.batch, seed=rec.seed, mesh=mesh,
      per_position=rec.train_mode == "per_position", stride=rec.stride)
  tx = recommend.optimizer(rec, steps)
  side = recommend.device_sides(None, mesh)["train"]  # the plain backbone reads none
  state, shardings = recommend.init_state(model, tx, rec, mesh, side)
  train_step = recommend.make_train_step(model, tx, rec, shardings, mesh)
  step = lambda state, batch: train_step(state, batch, side)
  state, metrics = step(state, next(batches))  # compile
  jax.block_until_ready(metrics)
  targets, start = 0, time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
    targets += int(np.count_nonzero(np.asarray(batch["targets"])))
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_seconds = (time.perf_counter() - start) / steps

  eval_step = recommend.make_eval_step(model, rec)
  valid = list(loader.next_item_eval(prepared, "valid", max_len=rec.max_len,
                                     batch_size=rec.eval_batch, mesh=mesh))
  recommend.rank_users(eval_step, state.params, side, valid)  # compile
  start = time.perf_counter()
  for _ in range(evals):
    ranked = recommend.rank_users(eval_step, state.params, side, valid)
  eval_seconds = (time.perf_counter() - start) / evals
  return {"train_mode": rec.train_mode, "batch": rec.batch,
          "train_examples_per_s": targets / steps / step_seconds,
          "steps_per_epoch": steps_per_epoch, "seconds_per_epoch": step_seconds * steps_per_epoch,
          "eval_seconds": eval_seconds, "eval_users_per_s": len(ranked["ranks"]) / eval_seconds}


def main(argv):
  del argv
  prepared = preprocess.prepare(formats.read_dataset("recbole", assets.path("ml-100k")),
                                preprocess.DataConfig())
  mesh = parallel.make_mesh({"data": -1})
  results = {"devices": mesh.size, "backend": jax.default_backend(),
             "host_keeps_freed_memory": host.keep_freed_memory()}  # as training does
  for backbone in _BACKBONES.value:
    cfg = config.from_flags(_CONFIGS / f"ml100k_{backbone}.py", _SET.value)
    results[backbone] = bench(cfg, prepared, mesh, _STEPS.value, _EVALS.value)
    print(json.dumps({backbone: results[backbone]}), flush=True)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
