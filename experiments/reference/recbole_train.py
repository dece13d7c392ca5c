"""RecBole 1.2.1 (PyTorch) reference runs on the slim-jax ml-100k protocol: accuracy and time-to-accuracy.

Runs in its own virtualenv (RecBole pins old numpy / ray; never install it into the project's python):

  python3.11 -m venv /work/recbole-venv
  /work/recbole-venv/bin/pip install -r experiments/reference/requirements-recbole.txt
  /work/recbole-venv/bin/python -m experiments.reference.recbole_train --model=GRU4Rec --out=/work/runs/recbole/gru4rec.json
  /work/recbole-venv/bin/python experiments/reference/recbole_train.py --model=SASRec --max_minutes=75 --out=...

Besides the JSON it writes the best model's weights to `<out>.weights.npz` (RecBole's tensor names and
its item-id order), which experiments/reference/recbole_weights.py loads into our backbone; --export_from writes
them for a checkpoint of an earlier run.

Imports neither jax nor slim_jax. The data are the RecBole atomic files that slim-jax's asset fetcher
unpacked from the pinned `recbole==1.2.1` wheel (`python launch.py --stages=fetch`), found in
`$SLIM_JAX_CACHE` (default ~/.cache/slim_jax) or given with --data_dir; they are symlinked into a
temporary `<tmp>/ml-100k/` and RecBole's downloader is disabled, so nothing is fetched at run time.

Protocol (docs/protocol.md): every interaction, no filtering; leave-one-out by time (RecBole's own order:
float32 min-max-scaled timestamp, stable sort, i.e. ties keep file order); full ranking over all
items, seen items not masked; MAX_ITEM_LIST_LENGTH 50; CE loss over the whole item table; batch 256;
Adam lr 1e-3; early stopping with patience 10 on valid NDCG@10; seed 2020. The training loop is
RecBole's `Trainer.fit`, unrolled here only to time each epoch and to honour --max_minutes; it calls
RecBole's own `_train_epoch`, `_valid_epoch`, `early_stopping`, `_save_checkpoint` and `evaluate`,
in the same order and with the same seeding as `recbole.quick_start.run_recbole`.

Compatibility shims (this file only, site-packages untouched):
  * torch.load: torch>=2.6 defaults to weights_only=True, which refuses RecBole's own checkpoint (it
    pickles the Config object), so reloading the best model for the test evaluation fails. The
    shim restores weights_only=False; it only loads the checkpoint this run just wrote, or the
    RecBole checkpoint --export_from names.
  * numpy aliases (np.float, np.bool, ...): RecBole's Config already re-adds them, using np.float_
    and friends, which exist only in numpy<2: hence numpy<2 in the requirements, no shim.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

DEFAULT_THREADS = 1


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="GRU4Rec", choices=["GRU4Rec", "SASRec", "SRGNN", "BERT4Rec"])
  p.add_argument("--out", required=True, help="JSON summary path")
  p.add_argument("--max_minutes", type=float, default=None,
                 help="wall-clock budget for training (train + validation epochs); an epoch is "
                      "not started if the last one suggests it would end past the budget")
  p.add_argument("--epochs", type=int, default=300)
  p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
  p.add_argument("--data_dir", default=None,
                 help="directory holding ml-100k.inter (default: the slim-jax asset cache)")
  p.add_argument("--seed", type=int, default=2020)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra RecBole config entry; VALUE parsed as JSON when possible")
  p.add_argument("--track_test", action="store_true",
                 help="also evaluate the test split after every epoch (logged in the curve, never "
                      "used for selection; torch's RNG is restored so training is unchanged)")
  p.add_argument("--export_from", default=None, metavar="PTH",
                 help="no training: write the weights of this RecBole checkpoint of --model to "
                      "--out (.npz) for experiments/reference/recbole_weights.py")
  return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
_THREADS = str(ARGS.threads if ARGS else DEFAULT_THREADS)
# Must precede the first import of numpy / torch.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ[_var] = _THREADS

import numpy as np  # noqa: E402
import torch  # noqa: E402

# The slim-jax asset of the ml-100k atomic files: `<cache>/ml-100k-<sha256[:12] of the wheel>/<main>`
# (slim_jax/assets.py; duplicated here because this venv has no jax).
ASSET_DIR = "ml-100k-9c9948202011"
ASSET_MAIN = "recbole/dataset_example/ml-100k"

EXPECTED = {"users": 943, "items": 1682, "interactions": 100000, "train_prefixes": 97171,
            "valid_rows": 943, "test_rows": 943}

TOPK = [5, 10, 20]
METRICS = ["Recall", "NDCG", "MRR", "Hit"]

MODEL_CONFIG = {
    # RecBole's defaults, spelled out.
    "GRU4Rec": {"embedding_size": 64, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.3},
    "SASRec": {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256,
               "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
               "layer_norm_eps": 1e-12, "initializer_range": 0.02},
    "SRGNN": {"embedding_size": 64, "step": 1},
    "BERT4Rec": {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256,
                 "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "gelu",
                 "layer_norm_eps": 1e-12, "initializer_range": 0.02, "mask_ratio": 0.2,
                 "transform": "mask_itemseq", "ft_ratio": 0.5},
}


def recbole_config(model: str, data_path: str, checkpoint_dir: str, epochs: int, seed: int) -> dict:
  cfg = {
      "data_path": data_path,
      "checkpoint_dir": checkpoint_dir,
      "use_gpu": False,
      "seed": seed,
      "reproducibility": True,
      "show_progress": False,
      "state": "INFO",
      # data: all interactions, no filtering
      "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
      "user_inter_num_interval": "[0,inf)",
      "item_inter_num_interval": "[0,inf)",
      "val_interval": None,
      "rm_dup_inter": None,
      "MAX_ITEM_LIST_LENGTH": 50,
      # split and evaluation
      "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                    "mode": "full"},
      "repeatable": True,
      "metrics": METRICS,
      "topk": TOPK,
      "valid_metric": "NDCG@10",
      "valid_metric_bigger": True,
      "eval_batch_size": 4096,
      "metric_decimal_place": 6,
      # training
      "loss_type": "CE",
      "train_neg_sample_args": None,
      "train_batch_size": 256,
      "learner": "adam",
      "learning_rate": 1e-3,
      "weight_decay": 0.0,
      "epochs": epochs,
      "eval_step": 1,
      "stopping_step": 10,
  }
  cfg.update(MODEL_CONFIG[model])
  return cfg


def _find_inter(data_dir: str | None) -> pathlib.Path:
  if data_dir:
    base = pathlib.Path(data_dir).expanduser()
  else:
    cache = pathlib.Path(os.environ.get("SLIM_JAX_CACHE", "~/.cache/slim_jax")).expanduser()
    base = cache / ASSET_DIR / ASSET_MAIN
  inter = base / "ml-100k.inter"
  if not inter.is_file():
    raise SystemExit(f"{inter} not found: run `python launch.py --stages=fetch --workdir=/tmp/fetch` "
                     "with the project's python first, or pass --data_dir")
  return inter


def _shim_torch_load():
  """torch>=2.6: weights_only=True by default refuses RecBole's checkpoint (it pickles Config)."""
  original = torch.load
  if getattr(original, "_recbole_reference_shim", False):
    return

  def load(*args, **kwargs):
    kwargs.setdefault("weights_only", False)
    return original(*args, **kwargs)

  load._recbole_reference_shim = True
  torch.load = load


def _no_download(self):
  raise RuntimeError(f"RecBole wanted to download {self.dataset_name}; the atomic files must be local")


def save_weights(state_dict, dataset, path: pathlib.Path):
  """The model's tensors under RecBole's names, plus item_tokens (RecBole's item id -> raw item
  id), so that experiments/reference/recbole_weights.py can evaluate RecBole's trained model in slim-jax."""
  arrays = {name: tensor.detach().cpu().numpy() for name, tensor in state_dict.items()}
  np.savez(path, item_tokens=np.asarray(dataset.field2id_token["item_id"], dtype=str), **arrays)


def _evaluate_keeping_rng(trainer, data) -> dict:
  """The current model's metrics on `data`, leaving torch's global RNG (which iterating a
  DataLoader draws from) as it was, so that tracking the test split leaves training unchanged."""
  rng = torch.get_rng_state()
  result = trainer.evaluate(data, load_best_model=False, show_progress=False)
  torch.set_rng_state(rng)
  return result


def _pick(result: dict, keys=None) -> dict:
  return {k: float(v) for k, v in result.items() if keys is None or k in keys}


def main(args) -> dict:
  torch.set_num_threads(args.threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:
    pass
  _shim_torch_load()

  import recbole
  from recbole.config import Config
  from recbole.data import create_dataset, data_preparation
  from recbole.data.dataset import dataset as rb_dataset
  from recbole.data.transform import construct_transform
  from recbole.utils import (early_stopping, get_flops, get_model, get_trainer, init_logger,
                             init_seed)
  from recbole.utils.utils import calculate_valid_score
  from logging import getLogger

  rb_dataset.Dataset._download = _no_download

  out = pathlib.Path(args.out).resolve()
  out.parent.mkdir(parents=True, exist_ok=True)
  # RecBole writes ./log/, ./log_tensorboard/ and the checkpoint relative to the working directory.
  work = out.parent / f"{out.stem}_recbole"
  work.mkdir(parents=True, exist_ok=True)
  os.chdir(work)

  inter = _find_inter(args.data_dir)
  tmp = tempfile.TemporaryDirectory(prefix="recbole_ml100k_")
  (pathlib.Path(tmp.name) / "ml-100k").mkdir()
  os.symlink(inter, pathlib.Path(tmp.name) / "ml-100k" / "ml-100k.inter")

  cfg_dict = recbole_config(args.model, tmp.name, str(work / "saved"), args.epochs, args.seed)
  for item in args.set:
    key, _, value = item.partition("=")
    try:
      cfg_dict[key] = json.loads(value)
    except json.JSONDecodeError:
      cfg_dict[key] = value

  t0 = time.time()
  # Same sequence as recbole.quick_start.run_recbole.
  config = Config(model=args.model, dataset="ml-100k", config_dict=cfg_dict)
  # RecBole 1.2.1 hard-wires dataset "ml-100k" to the copy bundled in its package
  # (Config._set_default_parameters); point it at the slim-jax asset instead. The name stays
  # "ml-100k" so RecBole's ml-100k.yaml field settings still apply.
  config["data_path"] = str(pathlib.Path(tmp.name) / "ml-100k")
  init_seed(config["seed"], config["reproducibility"])
  init_logger(config)
  logger = getLogger()
  logger.info(sys.argv)
  logger.info(config)
  dataset = create_dataset(config)
  logger.info(dataset)
  if args.export_from:
    save_weights(torch.load(args.export_from, map_location="cpu")["state_dict"], dataset, out)
    return {"model": args.model, "checkpoint": args.export_from, "weights": str(out)}
  n_interactions = dataset.inter_num  # before the split (the dataset object drops the test rows)
  train_data, valid_data, test_data = data_preparation(config, dataset)
  init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
  model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
  logger.info(model)
  try:
    flops = float(get_flops(model, dataset, config["device"], logger, construct_transform(config)))
  except Exception as e:  # FLOPs are informative only
    logger.warning(f"get_flops failed: {e!r}")
    flops = None
  trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
  setup_seconds = time.time() - t0

  stats = {
      "users": dataset.user_num - 1,  # minus the padding id 0
      "items": dataset.item_num - 1,
      "interactions": n_interactions,
      "train_prefixes": train_data._dataset.inter_num,
      "valid_rows": valid_data._dataset.inter_num,
      "test_rows": test_data._dataset.inter_num,
  }
  stats_ok = stats == EXPECTED
  logger.info(f"protocol statistics {stats} {'match' if stats_ok else 'DO NOT MATCH'} {EXPECTED}")

  # ---- Trainer.fit, unrolled (RecBole 1.2.1 trainer.py), with timing and a wall-clock budget ----
  budget = None if args.max_minutes is None else 60.0 * args.max_minutes
  trainer.eval_collector.data_collect(train_data)
  if config["train_neg_sample_args"].get("dynamic", False):
    train_data.get_model(trainer.model)
  curve = []
  stopped_early = False
  budget_hit = False
  best_epoch = None
  train_start = time.time()
  for epoch_idx in range(trainer.start_epoch, trainer.epochs):
    elapsed = time.time() - train_start
    if budget is not None and curve:
      last = curve[-1]["train_seconds"] + curve[-1]["valid_seconds"]
      if elapsed + last > budget:
        budget_hit = True
        logger.info(f"budget: {elapsed:.0f}s used, next epoch (~{last:.0f}s) would pass "
                    f"{budget:.0f}s; stopping")
        break
    ts = time.time()
    train_loss = trainer._train_epoch(train_data, epoch_idx, show_progress=False)
    train_loss = sum(train_loss) if isinstance(train_loss, tuple) else train_loss
    trainer.train_loss_dict[epoch_idx] = train_loss
    te = time.time()
    valid_score, valid_result = trainer._valid_epoch(valid_data, show_progress=False)
    ve = time.time()
    if args.track_test:
      test_now = _evaluate_keeping_rng(trainer, test_data)
    (trainer.best_valid_score, trainer.cur_step, stop_flag, update_flag) = early_stopping(
        valid_score, trainer.best_valid_score, trainer.cur_step,
        max_step=trainer.stopping_step, bigger=trainer.valid_metric_bigger)
    if update_flag:
      trainer._save_checkpoint(epoch_idx, verbose=False)
      trainer.best_valid_result = valid_result
      best_epoch = epoch_idx
    row = {
        "epoch": epoch_idx,
        "train_loss": float(train_loss),
        "train_seconds": round(te - ts, 3),
        "valid_seconds": round(ve - te, 3),
        "cumulative_seconds": round(time.time() - train_start, 3),
        "valid_ndcg@10": float(valid_result["ndcg@10"]),
        "valid_hit@10": float(valid_result["hit@10"]),
        "valid_mrr@10": float(valid_result["mrr@10"]),
        "best": bool(update_flag),
    }
    if args.track_test:
      row.update({f"test_{k}": float(test_now[k]) for k in ("ndcg@10", "hit@10", "mrr@10")})
    curve.append(row)
    logger.info("epoch {epoch:3d} loss {train_loss:.4f} train {train_seconds:.1f}s valid "
                "{valid_seconds:.1f}s cum {cumulative_seconds:.1f}s valid NDCG@10 "
                "{valid_ndcg@10:.4f} HR@10 {valid_hit@10:.4f}{star}".format(
                    **row, star=" *" if update_flag else ""))
    sys.stdout.flush()
    if stop_flag:
      stopped_early = True
      logger.info(f"early stop: best valid at epoch {best_epoch}")
      break
  train_total = time.time() - train_start

  # ---- test with the best model (RecBole reloads its checkpoint: needs the torch.load shim) ----
  ts = time.time()
  test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
  test_seconds = time.time() - ts
  # one more full validation of the best model, timed alone (943 users)
  ts = time.time()
  valid_best = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
  valid_seconds_best = time.time() - ts
  save_weights(trainer.model.state_dict(), dataset, out.with_suffix(".weights.npz"))
  revalid = calculate_valid_score(valid_best, trainer.valid_metric)
  if abs(revalid - trainer.best_valid_score) > 1e-6:
    logger.warning(f"best model re-validated at {revalid}, recorded {trainer.best_valid_score}")

  best_row = next(r for r in curve if r["epoch"] == best_epoch)
  keys = [f"{m.lower()}@{k}" for m in METRICS for k in TOPK]
  summary = {
      "model": args.model,
      "recbole_version": recbole.__version__,
      "torch_version": torch.__version__,
      "numpy_version": np.__version__,
      "torch_threads": torch.get_num_threads(),
      "torch_interop_threads": torch.get_num_interop_threads(),
      "shared_machine_note": "2-core CPU shared with other jobs; times are wall-clock",
      "config": {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v))
                 for k, v in cfg_dict.items() if k not in ("data_path", "checkpoint_dir")},
      "data_file": str(inter),
      "recbole_dataset_path": str(dataset.dataset_path),
      "dataset_stats": stats,
      "dataset_stats_match_protocol": stats_ok,
      "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
      "flops": flops,
      "max_minutes": args.max_minutes,
      "epochs_run": len(curve),
      "converged": stopped_early,
      "budget_exhausted": budget_hit,
      "best_epoch": best_epoch,
      "best_valid_ndcg@10": float(trainer.best_valid_score),
      "seconds_to_best": best_row["cumulative_seconds"],
      "setup_seconds": round(setup_seconds, 3),
      "total_train_seconds": round(train_total, 3),
      "mean_train_epoch_seconds": round(float(np.mean([r["train_seconds"] for r in curve])), 3),
      "mean_valid_seconds": round(float(np.mean([r["valid_seconds"] for r in curve])), 3),
      "test_eval_seconds_943_users": round(test_seconds, 3),
      "valid_eval_seconds_943_users": round(valid_seconds_best, 3),
      "valid": _pick(trainer.best_valid_result, keys),
      "test": _pick(test_result, keys),
      "curve": curve,
  }
  out.write_text(json.dumps(summary, indent=1) + "\n")
  logger.info(f"wrote {out}")
  tmp.cleanup()
  return summary


if __name__ == "__main__":
  result = main(ARGS)
  brief = {k: v for k, v in result.items() if k not in ("curve", "config")}
  print(json.dumps(brief, indent=1))
