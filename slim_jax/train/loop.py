"""The one training loop: every trainer (recommenders, distillation, encoder fine-tuning) runs it.

Trainers differ only in their jitted `step(state, batch) -> (state, metrics)`, their data and
their `evaluate(state) -> metrics`; logging, checkpointing, resuming, evaluation and early stopping
live here once. A checkpoint holds the train state, the grain iterator's position and the loop's
own counters, so a run resumed from its latest checkpoint continues exactly where it stopped: a
resumed run equals an uninterrupted one as long as `step` derives its randomness from the state.
The best checkpoint by the early-stopping metric is kept besides the latest one.

orbax and tensorboardX are imported when a loop runs, not with this module: every trainer, and
so every config section beside one, imports this module, and they are slow to import.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from slim_jax import multihost, progress

Metrics = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and when to log, evaluate, checkpoint and stop."""
  steps: int  # training steps in total (a trainer converts epochs to steps)
  eval_every: int = 0  # steps between evaluations; the last step is always evaluated
  log_every: int = 100  # steps between train-metric rows (and the non-finite check)
  checkpoint_every: int = 0  # steps between checkpoints; also at every new best and at the end
  metric: str = ""  # evaluation metric for early stopping and the best checkpoint; "" = none
  mode: str = "max"  # max | min: which direction of `metric` is better
  # Evaluations in a row without improvement that training tolerates; the next one stops it
  # (RecBole's stopping_step). 0 = never stop early.
  patience: int = 0
  progress: bool = True  # a progress bar (log lines when stderr is not a terminal)

  def __post_init__(self):
    if self.mode not in ("max", "min"):
      raise ValueError(f"LoopConfig.mode={self.mode!r}: expected max or min")
    if self.patience and not self.metric:
      raise ValueError("LoopConfig.patience needs LoopConfig.metric to know what improves")


@dataclasses.dataclass(frozen=True)
class LoopResult:
  state: Any  # the best state by `metric` when it is set and evaluated, else the last one
  step: int  # steps trained
  best_step: int | None
  best: float | None
  stopped_early: bool
  history: list[dict]  # evaluation rows, {"step": ..., metric: ...}


def improves(value: float, best: float | None, mode: str) -> bool:
  """A tie improves, as in RecBole: the later state becomes the best and patience restarts."""
  return best is None or (value >= best if mode == "max" else value <= best)


def _abstract(state):
  """ShapeDtypeStructs (with shardings) to restore `state`'s structure from a checkpoint."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def _manager(directory: pathlib.Path, cfg: LoopConfig):
  """orbax's CheckpointManager: the latest checkpoint, and the best one by `cfg.metric`."""
  import orbax.checkpoint as ocp
  policies = [ocp.checkpoint_managers.LatestN(n=1)]
  if cfg.metric:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[cfg.metric], reverse=cfg.mode == "min", n=1,
        keep_checkpoints_without_metrics=False))
  # best_fn only makes orbax write each checkpoint's metrics to disk: without them a restarted
  # manager sees no metrics on the earlier checkpoints and BestN deletes the best one.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      best_fn=(lambda metrics: metrics[cfg.metric]) if cfg.metric else None, best_mode=cfg.mode)
  return ocp.CheckpointManager(directory.absolute(), options=options,
                               item_names=("state", "loader", "loop"))


class _Log:
  """Rows to workdir/metrics.jsonl and TensorBoard event files in workdir/tensorboard (written by
  process 0 only). A resumed run drops what the interrupted one logged after its checkpoint."""

  def __init__(self, path: pathlib.Path, resume_step: int):
    self.path = path
    self.write = multihost.is_writer()
    if not self.write:
      return
    if path.exists():
      rows = [line for line in path.read_text().splitlines()
              if line and json.loads(line)["step"] <= resume_step]
      multihost.write_text(path, "".join(line + "\n" for line in rows))
    import tensorboardX
    # A file per (re)start: file names only carry the second, and a writer truncates its file;
    # the zero-padded step keeps restarts within one second in order (readers sort by name).
    self.events = tensorboardX.SummaryWriter(
        str(path.parent / "tensorboard"), purge_step=resume_step + 1 if resume_step else None,
        filename_suffix=f".from_step_{resume_step:010d}")

  def __call__(self, row: dict):
    logging.info("%s", " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()))
    if self.write:
      with self.path.open("a") as f:
        f.write(json.dumps(row) + "\n")
      for name, value in row.items():
        if name != "step":
          self.events.add_scalar(name, value, row["step"])
      self.events.flush()

  def close(self):
    if self.write:
      self.events.close()


def run(step: Callable, state, train_iter: Iterator, evaluate: Callable[[Any], Metrics],
        cfg: LoopConfig, workdir: str | pathlib.Path) -> LoopResult:
  """Trains `state` with `step` on `train_iter` under `cfg`.

  `train_iter` yields batches and has grain's `get_state()` / `set_state(state)`: a JSON-able
  dict, saved with every checkpoint by the primary process (the one loader's iterators walk the
  same global index order on every process, so their states agree).

  Resumes from the latest checkpoint in workdir/checkpoints when there is one. Stops after
  `cfg.steps`, when the iterator ends, or at the first evaluation after `cfg.patience` in a row
  that did not improve `cfg.metric`. A non-finite train metric raises FloatingPointError; the
  checkpoints written before it are kept, since every save is preceded by the finiteness check.
  """
  import orbax.checkpoint as ocp
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  manager = _manager(workdir / "checkpoints", cfg)
  abstract = _abstract(state)
  loop = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
          "history": []}
  if manager.latest_step() is not None:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        loader=ocp.args.JsonRestore(), loop=ocp.args.JsonRestore()))
    state, loop = restored.state, dict(restored.loop)
    train_iter.set_state(restored.loader)
    logging.info("resumed from step %d in %s", loop["step"], manager.directory)
  log = _Log(workdir / "metrics.jsonl", loop["step"])
  run_start = time.perf_counter()  # elapsed_seconds: this process's wall clock (time to accuracy)
  pending, window_start, window_time = [], loop["step"], time.perf_counter()

  def flush():
    """Logs the mean of the pending train metrics; raises if any is not finite."""
    nonlocal pending, window_start, window_time
    if not pending:
      return
    values = {k: np.asarray([m[k] for m in jax.device_get(pending)], np.float64)
              for k in pending[0]}
    bad = {k: v.tolist() for k, v in values.items() if not np.isfinite(v).all()}
    if bad:
      manager.wait_until_finished()  # so latest_step() names a finished checkpoint
      raise FloatingPointError(
          f"non-finite training metrics in steps {window_start + 1}..{loop['step']}: {bad}; "
          f"the last good checkpoint is step {manager.latest_step()} in {manager.directory}")
    elapsed = time.perf_counter() - window_time
    log({"step": loop["step"], **{f"train/{k}": float(v.mean()) for k, v in values.items()},
         "train/steps_per_s": len(pending) / elapsed})
    pending, window_start, window_time = [], loop["step"], time.perf_counter()

  def save(metrics: Metrics | None):
    nonlocal window_time
    flush()
    # Saving is asynchronous: hand it snapshots, not the dicts this loop goes on mutating.
    manager.save(loop["step"], metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        loader=ocp.args.JsonSave(copy.deepcopy(train_iter.get_state())),
        loop=ocp.args.JsonSave(copy.deepcopy(loop))))
    window_time = time.perf_counter()  # train speed excludes evaluation and checkpointing

  def due() -> bool:
    return bool(cfg.checkpoint_every) and loop["step"] % cfg.checkpoint_every == 0

  def evaluate_and_save(force_save: bool = False):
    """Evaluates; checkpoints a new best, a due checkpoint, or the end of training."""
    flush()
    start = time.perf_counter()
    scores = {k: float(v) for k, v in evaluate(state).items()}
    row = {"step": loop["step"], **scores, "eval_seconds": time.perf_counter() - start,
           "elapsed_seconds": time.perf_counter() - run_start}
    log(row)
    loop["history"].append(row)
    if cfg.metric:
      if improves(scores[cfg.metric], loop["best"], cfg.mode):
        loop.update(best=scores[cfg.metric], best_step=loop["step"], bad_evals=0)
      else:
        loop["bad_evals"] += 1
      loop["stopped_early"] = bool(cfg.patience) and loop["bad_evals"] > cfg.patience
      bar.set_postfix({cfg.metric: f"{loop['best']:.4f}"}, refresh=False)
    if force_save or loop["best_step"] == loop["step"] or due():
      save(scores)

  bar = progress.bar(cfg.steps, "train", "step", initial=loop["step"], disable=not cfg.progress)
  # finally: an interrupted run (Ctrl-C, preemption, an error) lets its in-flight asynchronous
  # save finish, so the restart finds a whole checkpoint rather than a half-written directory.
  try:
    while loop["step"] < cfg.steps and not loop["stopped_early"]:
      try:
        batch = next(train_iter)
      except StopIteration:
        break
      state, metrics = step(state, batch)
      pending.append(metrics)
      loop["step"] += 1
      bar.update()
      if loop["step"] % cfg.log_every == 0:
        flush()
      if cfg.eval_every and loop["step"] % cfg.eval_every == 0:
        evaluate_and_save()
      elif due():
        save(None)
    if not loop["history"] or loop["history"][-1]["step"] != loop["step"]:
      evaluate_and_save(force_save=True)
    elif manager.latest_step() != loop["step"]:
      save(loop["history"][-1])
    manager.wait_until_finished()
    if loop["best_step"] is not None and loop["best_step"] != loop["step"]:
      state = manager.restore(loop["best_step"], args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
  finally:
    bar.close()
    log.close()
    manager.close()
  return LoopResult(state=state, step=loop["step"], best_step=loop["best_step"], best=loop["best"],
                    stopped_early=loop["stopped_early"], history=list(loop["history"]))
