"""Training and evaluating a sequential recommender: model, AdamW, jitted steps, metrics.json.

Every variant of `models/slim.py` trains here: the plain backbone, backbone+ (item text), SLIM
ID-based and its controls, SLIM ID-agnostic; the zero-shot and popularity rankings have nothing
to train and are only evaluated. Rationale and item-text vectors reach the jitted steps as a
replicated `side` argument. The train step is data parallel over the mesh's batch axes, with
the item table's rows optionally sharded over a model axis (`rec.table_axis`) for catalogues too
large to replicate. Evaluation ranks the full catalogue on the device in jitted batches; only
ranks and a top-20 list per user come back to the host.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from slim_jax import host, layout, metrics, multihost, parallel
from slim_jax.data import loader, side_inputs
from slim_jax.models import bert
from slim_jax.models import recommender
from slim_jax.models.backbone import Backbone
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import (BACKBONE_FREE_MODES, RATIONALE_MODES, SLIM, UNTRAINED_MODES,
                                  SlimConfig)
from slim_jax.train import loop

TOP_K = 20  # longest list the popularity-bias analysis reads
VALID_METRIC = "valid/ndcg@10"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar; the step's randomness folds it into the seed
  params: Any
  opt_state: Any
  ema_params: Any = None  # moving average of params (rec.ema_decay); None when it is off

  @property
  def eval_params(self):
    """What validation, model selection and the test rank with: the average when there is one."""
    return self.params if self.ema_params is None else self.ema_params


def build_model(cfg: RecConfig, num_items: int, table_multiple: int = 1, mode: str = "plain",
                slim: SlimConfig = SlimConfig(),
                encoder: bert.SentenceEncoder | None = None) -> SLIM:
  """The SLIM variant `mode` of the backbone `cfg` (resolved) names (no backbone for the
  ID-agnostic ones), with a trainable copy of `encoder` when `slim.finetune_encoder` (and the mode
  reads rationales)."""
  backbone = (None if mode in BACKBONE_FREE_MODES
              else build_backbone(cfg, num_items, table_multiple))
  finetune = slim.finetune_encoder and mode in RATIONALE_MODES and mode not in UNTRAINED_MODES
  if finetune and encoder is None:
    raise ValueError("slim.finetune_encoder needs the encoder checkpoint (a MiniLM directory)")
  return SLIM(mode, slim, num_items, cfg.spec.table_rows(num_items, table_multiple),
              cfg.hidden, backbone, encoder.config if finetune else None,
              encoder.pooling if finetune else bert.Pooling())


def build_backbone(cfg: RecConfig, num_items: int, table_multiple: int = 1) -> Backbone:
  """The backbone `cfg` (resolved: its RecBole defaults filled in) names."""
  rows = cfg.spec.table_rows(num_items, table_multiple)
  return cfg.spec.build(cfg, num_items=num_items, rows=rows, hidden=cfg.hidden, max_len=cfg.max_len)


def optimizer(cfg: RecConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with optional warm-up, cosine decay and global-norm clipping (`cfg` resolved, so its
  schedule is one of recommender.SCHEDULES)."""
  if cfg.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(total_steps, 1))
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                               optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*clip, optax.adamw(lr, weight_decay=cfg.weight_decay))


def init_state(model: SLIM, tx: optax.GradientTransformation, cfg: RecConfig,
               mesh: jax.sharding.Mesh, side, encoder_params=None) -> tuple[TrainState, Any]:
  """A TrainState placed on `mesh` by the sharding rules, and its shardings; a fine-tuned
  encoder starts from `encoder_params` (the checkpoint's)."""
  def init(encoder_params):
    params = model.init(jax.random.key(cfg.seed), jnp.zeros((1, cfg.max_len), jnp.int32),
                        jnp.zeros((1,), jnp.int32), side)
    if model.encoder is not None:
      params = {"params": {**params["params"], "rationale_encoder": encoder_params}}
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      params if cfg.ema_decay else None)
  encoder_params = encoder_params if model.encoder is not None else None
  shardings = parallel.param_shardings(jax.eval_shape(init, encoder_params),
                                       cfg.spec.sharding_rules(cfg), mesh)
  return jax.jit(init, out_shardings=shardings)(encoder_params), shardings


def make_train_step(model: SLIM, tx: optax.GradientTransformation, cfg: RecConfig,
                    state_shardings, mesh: jax.sharding.Mesh) -> Callable:
  """The jitted `step(state, batch, side) -> (state, {"loss", "grad_norm"})` of `cfg` (resolved)
  on the backbone's training task."""
  key = jax.random.key(cfg.seed)
  task = cfg.spec.task
  targets_per_row = task.targets_per_row(cfg)

  def step(state: TrainState, batch, side):
    dropout_rng, mask_rng, negative_rng = jax.random.split(jax.random.fold_in(key, state.step), 3)

    def loss_of(params, inputs, targets):
      columns, scored = recommender.scored_columns(inputs, targets, targets_per_row)
      states, table = model.apply(params, inputs, batch["users"], side, train=True,
                                  columns=columns, positions=batch["positions"],
                                  rngs={"dropout": dropout_rng})
      return recommender.loss(states.reshape(-1, states.shape[-1]), table, scored.reshape(-1),
                              negative_rng, cfg, model.num_items)

    def gradient(inputs, targets):
      return jax.value_and_grad(loss_of)(state.params, inputs, targets)

    value, grads = task.gradient(gradient, batch, mask_rng, cfg, model.num_items)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (None if state.ema_params is None else
           optax.incremental_update(params, state.ema_params, 1.0 - cfg.ema_decay))
    state = TrainState(state.step + 1, params, opt_state, ema)
    return state, {"loss": value, "grad_norm": optax.tree.norm(grads)}

  batch_shardings = {"inputs": parallel.batch_sharding(mesh, 2),
                     "targets": parallel.batch_sharding(mesh, 2 if cfg.train_mode ==
                                                        "per_position" else 1),
                     "users": parallel.batch_sharding(mesh, 1),
                     "positions": parallel.batch_sharding(mesh, 1)}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings, parallel.replicated(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)))


def make_eval_step(model: SLIM, cfg: RecConfig, popularity: np.ndarray | None = None,
                   sequences: np.ndarray | None = None) -> Callable:
  """The jitted `eval_step(params, batch, side) -> {"ranks": int32[B], ...}`: full-ranking ranks.

  Full ranking over the catalogue (padding excluded; the visible history too when
  `rec.exclude_history`). Given the training `popularity` and every user's whole sequence
  (`sequences` int32[U, N], right-padded with 0) it also returns each user's "top" 20 items, the
  share of their top 10 that the user already interacted with before the target
  ("history_share"), and "sampled_ranks", the rank among `rec.sampled_negatives` "negatives"
  drawn from the items the user never interacted with (the protocol's), fixed per (seed, user)
  so that every variant of a seed ranks the same ones. `cfg` is resolved.
  """
  key = jax.random.key(cfg.seed + 1)
  weights = jnp.asarray(popularity) if cfg.sampled_eval == "popularity" else None
  k = min(TOP_K, model.num_items)

  @jax.jit
  def eval_step(params, batch, side):
    inputs, targets, users = batch["inputs"], batch["targets"], batch["users"]
    state, table = model.apply(params, inputs, users, side, batch["positions"], method="predict")
    sequence = None if sequences is None else jnp.asarray(sequences)[jnp.maximum(users, 0)]
    seen = (inputs if sequence is None else  # the items before the target
            jnp.where(jnp.arange(sequence.shape[1]) < batch["positions"][:, None], sequence, 0))
    scores = metrics.rankable(state @ table.T, model.num_items, targets,
                              seen if cfg.exclude_history else None)
    out = {"ranks": metrics.target_ranks(scores, targets)}
    if popularity is None:
      return out
    keys = jax.vmap(lambda user: jax.random.fold_in(key, user))(users)
    negatives = metrics.sample_candidates(keys, targets, model.num_items, cfg.sampled_negatives,
                                          weights, exclude=sequence)
    top = metrics.top_items(scores, k)
    return {**out, "top": top, "history_share": metrics.seen_share(top[:, :10], seen),
            "negatives": negatives,
            "sampled_ranks": metrics.sampled_ranks(scores, targets, negatives)}

  return eval_step


def rank_users(eval_step: Callable, params, side, batches: Iterable[dict]) -> dict[str, np.ndarray]:
  """eval_step's outputs for every valid row of `batches`, plus "users", on the host."""
  parts = []
  for batch in batches:
    out = multihost_utils.process_allgather(
        {"users": batch["users"], "valid": batch["valid"], **eval_step(params, batch, side)},
        tiled=True)
    valid = out.pop("valid")
    parts.append({name: value[valid] for name, value in out.items()})
  return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def report(ranked: dict[str, np.ndarray], popularity: np.ndarray, history_lengths: np.ndarray,
           cfg: RecConfig) -> dict:
  """Full-ranking metrics, popularity bias @10/@20, sparsity groups, sampled metrics (labelled)."""
  out = metrics.ranking_metrics(ranked["ranks"])
  for k in (10, TOP_K):
    out.update(metrics.popularity_bias(ranked["top"], popularity, k))
  out["history_share@10"] = float(ranked["history_share"].mean())
  sampled = f"sampled{cfg.sampled_negatives}_{cfg.sampled_eval}"
  return {**out,
          "groups": metrics.grouped_metrics(ranked["ranks"], history_lengths[ranked["users"]]),
          sampled: metrics.ranking_metrics(ranked["sampled_ranks"])}


def sampled_metrics(split_metrics: Mapping[str, Any]) -> Mapping[str, float]:
  """The sampled evaluation's metrics in one split of metrics.json (`report` keys them by their
  negatives, e.g. "sampled100_uniform")."""
  return next(value for key, value in split_metrics.items() if key.startswith("sampled"))


def protocol_metrics(split_metrics: Mapping[str, Any], protocol: str) -> Mapping[str, float]:
  """One split's metrics under `protocol`: "full" ranking or "sampled" negatives."""
  return split_metrics if protocol == "full" else sampled_metrics(split_metrics)


def popularity_ranks(popularity: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Ranks of the targets when every user gets the same list: items by training popularity."""
  scores = jnp.broadcast_to(jnp.asarray(popularity, jnp.float32), (len(targets), len(popularity)))
  scores = metrics.rankable(scores, len(popularity) - 1, jnp.asarray(targets))
  return np.asarray(metrics.target_ranks(scores, jnp.asarray(targets)))


def device_sides(sides: dict | None, mesh: jax.sharding.Mesh) -> dict[str, dict]:
  """Each split's side inputs (`side_inputs.side_inputs`) replicated on `mesh` (None: the plain
  backbone's, {} per split)."""
  sides = sides or {split: {} for split in side_inputs.SPLITS}
  return jax.device_put(sides, parallel.replicated(mesh))


def training_phases(cfg: RecConfig) -> list[RecConfig]:
  """The configs trained one after the other (`cfg` resolved, so are they), each from the best
  state so far (metrics.json's "phase" says whose state it reports; its history rows say which
  phase they come from)."""
  if not cfg.finish_on_prefixes:
    return [cfg]
  return [cfg, dataclasses.replace(cfg, train_mode="last_position", batch=recommender.PREFIX_BATCH,
                                   finish_on_prefixes=False)]


def train_recommender(cfg: RecConfig, prepared, workdir: str | pathlib.Path,
                      mesh: jax.sharding.Mesh | None = None, mode: str = "plain",
                      slim_cfg: SlimConfig = SlimConfig(), encoded=None,
                      encoder: bert.SentenceEncoder | None = None) -> dict:
  """Trains the `mode` variant of `cfg.backbone` on `prepared` with early stopping on valid
  NDCG@10, evaluates the best state on the valid and test splits, and writes
  workdir/metrics.json (also returned) and workdir/ranked_test.npz (each test user's ranks, full
  and among the sampled negatives, and top-20 list: the per-user paired tests read them).

  `encoded` is what `encode.load_encoded` returns (the teacher's rationales too, for
  teacher_rationales), needed by every mode but "plain" and "popularity"; `encoder`
  the MiniLM that `slim.finetune_encoder` trains (from encoder.checkpoint). Resumes
  from workdir/checkpoints when a previous run was interrupted (and from
  workdir/prefixes/checkpoints in the prefix finish, `rec.finish_on_prefixes`). `mesh` defaults
  to data parallelism over every device. `cfg` is resolved here, once (a resolved config stays as
  it is); the functions above take it resolved.
  """
  cfg = cfg.resolved()
  host.keep_freed_memory()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or parallel.make_mesh({"data": -1})
  table_multiple = mesh.shape[cfg.table_axis] if cfg.table_axis else 1
  model = build_model(cfg, prepared.num_items, table_multiple, mode, slim_cfg, encoder)
  popularity = prepared.item_popularity()
  sequences = loader.padded_sequences(prepared)
  # Before training: a catalogue too small for the negatives fails now, not after the last epoch.
  metrics.check_negatives(sequences, prepared.num_items, cfg.sampled_negatives)
  sides = device_sides(side_inputs.side_inputs(encoded, prepared, model.rows, slim_cfg, mode,
                                               cfg.seed), mesh)
  training_data = lambda phase: loader.next_item_training(
      prepared, max_len=cfg.max_len, batch_size=phase.batch, seed=cfg.seed, mesh=mesh,
      per_position=phase.train_mode == "per_position", stride=phase.stride)
  first_data = training_data(cfg)
  # One optimizer for every phase: a finishing phase carries on with the moments (and the
  # schedule's step, the schedule spanning the first phase) where the first left them.
  tx = optimizer(cfg, cfg.epochs * first_data[1])
  state, shardings = init_state(model, tx, cfg, mesh, sides["train"],
                                encoder and encoder.params)
  eval_step = make_eval_step(model, cfg, sequences=sequences)  # the same history exclusion
  batches = lambda split: loader.next_item_eval(prepared, split, max_len=cfg.max_len,
                                                batch_size=cfg.eval_batch, mesh=mesh)

  def validate(state: TrainState) -> dict[str, float]:
    scores = {}
    for split in ("valid", "test") if cfg.track_test else ("valid",):
      ranked = rank_users(eval_step, state.eval_params, sides[split], batches(split))
      scores.update(metrics.prefixed(metrics.ranking_metrics(ranked["ranks"]), split))
    return scores

  def train(phase: RecConfig, train_iter, steps_per_epoch: int, state: TrainState,
            directory: pathlib.Path) -> loop.LoopResult:
    step = make_train_step(model, tx, phase, shardings, mesh)
    loop_cfg = loop.LoopConfig(steps=cfg.epochs * steps_per_epoch,
                               eval_every=cfg.eval_every * steps_per_epoch,
                               log_every=steps_per_epoch, metric=VALID_METRIC,
                               patience=cfg.patience)
    return loop.run(lambda state, batch: step(state, batch, sides["train"]), state, train_iter,
                    validate, loop_cfg, directory)

  start = time.perf_counter()
  result = loop.LoopResult(state=state, step=0, best_step=None, best=None, stopped_early=False,
                           history=[])  # what the untrained modes rank with
  chosen, steps_per_epoch, history = 0, first_data[1], []
  trains = mode not in UNTRAINED_MODES
  for index, phase in enumerate(training_phases(cfg) if trains else []):
    train_iter, phase_steps = training_data(phase) if index else first_data
    phase_result = train(phase, train_iter, phase_steps, result.state,
                         workdir / "prefixes" if index else workdir)
    offset = history[-1]["elapsed_seconds"] if history else 0.0
    history += [{**row, "phase": index, "elapsed_seconds": row["elapsed_seconds"] + offset}
                for row in phase_result.history]
    if loop.improves(phase_result.best, result.best, "max"):
      chosen, steps_per_epoch, result = index, phase_steps, phase_result
  train_seconds = time.perf_counter() - start
  results = {}
  analyse = make_eval_step(model, cfg, popularity, sequences)
  for split in ("valid", "test"):
    data = prepared.split(split)
    ranked = rank_users(analyse, result.state.eval_params, sides[split], batches(split))
    results[split] = report(ranked, popularity, np.diff(data.history_offsets), cfg)
    results[f"popularity_{split}"] = metrics.ranking_metrics(
        popularity_ranks(popularity, data.targets))
  multihost.write(workdir / layout.RANKED_TEST, lambda staged: np.savez(
      staged, users=ranked["users"], ranks=ranked["ranks"],
      sampled_ranks=ranked["sampled_ranks"], negatives=ranked["negatives"], top=ranked["top"]))
  teacher = ({"users_with_teacher_rationale": side_inputs.teacher_users(encoded)}
             if mode == "teacher_rationales" else {})
  summary = {"backbone": cfg.backbone, "mode": mode, "config": dataclasses.asdict(cfg),
             "slim": dataclasses.asdict(slim_cfg),
             "phase": chosen, "steps_per_epoch": steps_per_epoch, "steps": result.step,
             "best_step": result.best_step, "best_epoch": (result.best_step or 0) / steps_per_epoch,
             "stopped_early": result.stopped_early, "train_seconds": train_seconds,
             "history": history, **teacher, **results}
  multihost.write_text(workdir / layout.METRICS, json.dumps(summary, indent=2))
  return summary
