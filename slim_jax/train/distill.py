"""Step-by-step distillation: LoRA fine-tuning of the student on (student prompt -> rationale).

The student reads the same chat prompt the teacher read (cut to the student's own token budget)
and learns to write the teacher's rationale; the loss is on rationale tokens only. Only the LoRA
pytree and its AdamW state are trained and checkpointed; the frozen base is an argument of the
jitted step, never a compiled-in constant, and is sharded by the LLaMA rules like the adapters.
A seeded share of the users is held out: their rationale loss and perplexity are the evaluation,
and the adapter with the lowest held-out loss is exported in the PEFT layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from slim_jax import checkpoints, checks, layout, multihost, parallel, prompts, rationales
from slim_jax.checkpoints import peft
from slim_jax.data import loader
from slim_jax.models import llama, lora as lora_lib
from slim_jax.models.llama import Llama
from slim_jax.models.lora import LoraConfig
from slim_jax.prompts import PromptConfig
from slim_jax.train import loop

HELDOUT_METRIC = "heldout/loss"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  # student base: HF directory or .gguf; "" = the embedded SmolLM2-135M-Instruct as the convert
  # stage writes it (Config.resolved)
  checkpoint: str = ""
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  steps: int = 200  # optimizer steps
  batch_size: int = 8  # examples per optimizer step, over the whole mesh
  grad_accum: int = 1  # micro-batches per step (each batch_size / grad_accum examples)
  lr: float = 2e-4
  warmup_steps: int = 20
  end_lr_fraction: float = 0.1  # the cosine decays to lr * end_lr_fraction at `steps`
  weight_decay: float = 0.0
  clip_norm: float = 1.0  # global gradient norm; 0 = no clipping
  max_rationale_tokens: int = 512  # rationale + EOS, cut to this
  buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # padded sequence lengths
  pack: bool = False  # examples packed into rows of max(buckets); batch_size then counts rows
  heldout_fraction: float = 0.1  # of the users, whose rationales are only evaluated
  eval_every: int = 50
  eval_batch_size: int = 8
  log_every: int = 10
  checkpoint_every: int = 50
  patience: int = 0  # evaluations without a better held-out loss tolerated; 0 = never stop
  dtype: str = "bfloat16"  # activations and matmuls
  base_dtype: str = "bfloat16"  # the frozen base weights
  lora_dtype: str = "float32"  # the adapters and their AdamW moments
  remat_policy: str = ""  # a jax.checkpoint_policies name, e.g. nothing_saveable; "" = none
  scan_layers: bool = False
  seed: int = 0

  def checked(self) -> DistillConfig:
    checks.within(self, "distill", "[1, inf)", "lora_rank", "steps", "batch_size", "grad_accum",
                  "max_rationale_tokens", "buckets", "eval_batch_size", "log_every")
    checks.within(self, "distill", "(0, inf)", "lora_alpha", "lr")
    checks.within(self, "distill", "[0, inf)", "warmup_steps", "weight_decay", "clip_norm",
                  "eval_every", "checkpoint_every", "patience")
    checks.within(self, "distill", "[0, 1)", "lora_dropout")
    checks.within(self, "distill", "[0, 1]", "end_lr_fraction")
    checks.within(self, "distill", "(0, 1)", "heldout_fraction")
    for name in ("dtype", "base_dtype", "lora_dtype"):
      checks.one_of(f"distill.{name}", getattr(self, name), checks.FLOAT_DTYPES)
    if self.remat_policy:
      checks.one_of("distill.remat_policy", self.remat_policy,
                    [name for name in dir(jax.checkpoint_policies) if not name.startswith("_")])
    if self.batch_size % self.grad_accum:
      raise ValueError(f"distill.batch_size={self.batch_size} is not a multiple of "
                       f"distill.grad_accum={self.grad_accum}")
    return self

  def lora(self) -> LoraConfig:
    return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout,
                      tuple(self.lora_targets))


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar; dropout keys fold it in, so a resumed run repeats them
  lora: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------------
# Examples: teacher rationales -> (student prompt ids, rationale ids).


def read_teacher_rationales(path: pathlib.Path) -> list[dict]:
  """The teacher's accepted rationales; none is a clear error (nothing to distill)."""
  rows = rationales.read_rationales(path)
  if not rows:
    raise ValueError(f"{path}: no rationales to distill (the teacher stage accepted none; see "
                     f"its summary's rejections)")
  return rows


def training_examples(records: Sequence[Mapping], prepared, pcfg: PromptConfig, tokenizer,
                      max_rationale_tokens: int
                      ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
  """(user id, student prompt ids, rationale ids + EOS) per record.

  The prompt is rebuilt from the history visible in the record's split, so the student sees
  exactly what the teacher saw, in its own chat template and token budget. EOS is learnt too:
  the student must learn where a rationale ends.
  """
  histories = {(user, split): items for user, split, items in
               prompts.visible_histories(prepared, prompts.HISTORIES["per_split"])}
  index = {str(user_id): user for user, user_id in enumerate(prepared.user_ids)}
  render = functools.partial(rationales.chat_ids, tokenizer)
  users, prompt_ids, rationale_ids = [], [], []
  for record in records:
    items = histories.get((index.get(str(record["user_id"])), record["split"]))
    if items is None:
      raise ValueError(f"rationale of user_id={record['user_id']!r} split={record['split']!r} "
                       "has no such user and split in the prepared data")
    ids, _ = prompts.student_prompt([prepared.item_text[i] for i in items], pcfg, render)
    text = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
    users.append(str(record["user_id"]))
    prompt_ids.append(np.asarray(ids, np.int32))
    rationale_ids.append(np.asarray(
        (text + [tokenizer.eos_token_id])[:max_rationale_tokens], np.int32))
  return users, prompt_ids, rationale_ids


def heldout_users(user_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
  """A seeded `fraction` of the distinct users (at least one, never all). All of a user's
  rationales fall on one side, so the held-out loss measures generalisation to unseen users."""
  users = sorted(set(user_ids))
  if len(users) < 2 or not 0 < fraction < 1:
    raise ValueError(f"distill.heldout_fraction={fraction} must be in (0, 1), with at least two "
                     f"users to split (have {len(users)})")
  count = min(len(users) - 1, max(1, round(fraction * len(users))))
  return set(np.random.default_rng(seed).permutation(users)[:count].tolist())


# ---------------------------------------------------------------------------------------------
# The optimizer and the jitted steps.


def optimizer(cfg: DistillConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warm-up and cosine decay, after global-norm clipping; and its schedule."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.lr * cfg.end_lr_fraction)
  clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*clip, optax.adamw(schedule, weight_decay=cfg.weight_decay)), schedule


def state_rules(config: llama.LlamaConfig) -> parallel.Rules:
  """The LLaMA rules for adapters and their Adam moments; counters are replicated."""
  return (*llama.partition_rules(config), (r".*", P()))


def init_state(model: Llama, tx: optax.GradientTransformation, cfg: DistillConfig, mesh,
               abstract: bool = False) -> tuple[TrainState, Any]:
  """(fresh adapters (B = 0: the student starts as its base) in `lora_dtype` with their
  optimizer state, placed on `mesh`; its shardings). With `abstract`, ShapeDtypeStructs carrying
  those shardings: nothing is allocated."""
  def init():
    adapters = lora_lib.init_lora(model, jax.random.key(cfg.seed))
    adapters = jax.tree.map(lambda x: x.astype(cfg.lora_dtype), adapters)
    return TrainState(jnp.zeros((), jnp.int32), adapters, tx.init(adapters))
  shapes = jax.eval_shape(init)
  shardings = parallel.param_shardings(shapes, state_rules(model.config), mesh)
  if abstract:
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=sharding),
                        shapes, shardings), shardings
  return jax.jit(init, out_shardings=shardings)(), shardings


def rationale_nll(model: Llama, variables, batch, rngs=None,
                  packed: bool = False) -> tuple[jax.Array, jax.Array]:
  """(summed next-token NLL over rationale tokens, their count). Sums, not means, so that
  micro-batches and evaluation batches of any padding combine exactly. A `packed` batch's
  segment ids and positions keep each example's attention and RoPE to itself."""
  if packed:
    logits, _ = model.apply(variables, batch["tokens"], segment_ids=batch["segment_ids"],
                            positions=batch["positions"], rngs=rngs)
  else:
    logits, _ = model.apply(variables, batch["tokens"], batch["segment_ids"] > 0, rngs=rngs)
  # position t predicts token t + 1. The targets and weights are shifted, not the logits, whose
  # [B, T - 1, V] slice would be the largest copy of the step; the last position weighs nothing
  targets = jnp.roll(batch["tokens"], -1, axis=1)
  weights = jnp.roll(batch["loss_mask"], -1, axis=1).at[:, -1].set(0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def micro_batches(x: jax.Array, count: int, mesh) -> jax.Array:
  """[B, ...] -> [count, B / count, ...] taking every count-th row, so each micro-batch keeps an
  equal share of rows on every device of the batch axes (no data moves)."""
  split = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  spec = P(None, parallel.batch_axes(mesh), *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(split, NamedSharding(mesh, spec))


def make_train_step(model: Llama, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    cfg: DistillConfig, base_shardings, state_shardings, mesh) -> Callable:
  """The jitted `step(base, state, batch) -> (state, metrics)`; gradients of the adapters only,
  summed over `grad_accum` micro-batches by a scan, normalised by the batch's rationale tokens.

  Metrics include the new adapters' norm, so a step whose update is not finite is caught before
  its state is ever checkpointed.
  """
  key = jax.random.key(cfg.seed + 1)

  def step(base, state: TrainState, batch):
    step_key = jax.random.fold_in(key, state.step)

    def accumulate(carry, inputs):
      grads, total, count = carry
      index, micro = inputs
      nll = lambda adapters: rationale_nll(model, {"params": base, "lora": adapters}, micro,
                                           {"dropout": jax.random.fold_in(step_key, index)},
                                           cfg.pack)
      (part, tokens), part_grads = jax.value_and_grad(nll, has_aux=True)(state.lora)
      return (jax.tree.map(jnp.add, grads, part_grads), total + part, count + tokens), None

    micro = jax.tree.map(lambda x: micro_batches(x, cfg.grad_accum, mesh), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.lora)
    (grads, total, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(cfg.grad_accum), micro))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.lora)
    adapters = optax.apply_updates(state.lora, updates)
    metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads),
               "lora_norm": optax.tree.norm(adapters), "lr": schedule(state.step),
               "tokens": jnp.sum(batch["segment_ids"] > 0)}
    return TrainState(state.step + 1, adapters, opt_state), metrics

  return jax.jit(step, in_shardings=(base_shardings, state_shardings,
                                     parallel.batch_sharding(mesh, 2)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=1)


class TrainSetup(NamedTuple):
  model: Llama  # the student with cfg.lora()
  state: TrainState  # fresh, on the mesh (ShapeDtypeStructs when abstract)
  state_shardings: Any
  step: Callable  # make_train_step's step(base, state, batch) -> (state, metrics)


def build_step(config: llama.LlamaConfig, cfg: DistillConfig, base, mesh,
               abstract: bool = False) -> TrainSetup:
  """The set-up of every distillation step: the LoRA student of `config`, its optimizer, fresh
  state and jitted step for a base laid out as `base` (arrays, or ShapeDtypeStructs with
  shardings). `abstract` makes the state abstract too, to lower the step ahead of time."""
  model = Llama(config, cfg.lora())
  tx, schedule = optimizer(cfg)
  state, state_shardings = init_state(model, tx, cfg, mesh, abstract)
  base_shardings = jax.tree.map(lambda x: x.sharding, base)
  return TrainSetup(model, state, state_shardings, make_train_step(
      model, tx, schedule, cfg, base_shardings, state_shardings, mesh))


def make_eval_step(model: Llama, base_shardings, lora_shardings, mesh) -> Callable:
  """The jitted `eval_step(base, lora, batch) -> (summed NLL, rationale tokens)`."""
  return jax.jit(lambda base, adapters, batch: rationale_nll(
      model, {"params": base, "lora": adapters}, batch),
                 in_shardings=(base_shardings, lora_shardings, parallel.batch_sharding(mesh, 2)),
                 out_shardings=parallel.replicated(mesh))


def heldout_metrics(eval_step: Callable, base, adapters, batches) -> dict[str, float]:
  """Held-out rationale loss (mean NLL per token) and perplexity."""
  total, count = np.sum(jax.device_get([eval_step(base, adapters, b) for b in batches]), axis=0)
  loss = float(total / max(count, 1.0))
  return {HELDOUT_METRIC: loss, "heldout/perplexity": math.exp(min(loss, 700.0))}


# ---------------------------------------------------------------------------------------------
# The stage.


def check_lengths(cfg: DistillConfig, pcfg: PromptConfig) -> None:
  """The longest example (the student's whole prompt budget, then a whole rationale) fits the
  largest bucket: a rule between two config sections, which `Config.checked` runs at start-up.
  `pcfg` is the student's prompt section (`Config.student_prompt`)."""
  budget = pcfg.max_prompt_tokens
  if budget + cfg.max_rationale_tokens > max(cfg.buckets):
    raise ValueError(f"the student's prompt budget {budget} + "
                     f"distill.max_rationale_tokens={cfg.max_rationale_tokens} exceed the largest "
                     f"of distill.buckets={cfg.buckets}")


def _check(cfg: DistillConfig, pcfg: PromptConfig, mesh) -> None:
  check_lengths(cfg, pcfg)
  multiple = cfg.grad_accum * parallel.batch_size_multiple(mesh)
  if cfg.batch_size % multiple:
    raise ValueError(f"distill.batch_size={cfg.batch_size} must be a multiple of grad_accum "
                     f"({cfg.grad_accum}) x the devices on the batch axes, i.e. of {multiple}")


def run_distill(cfg: DistillConfig, pcfg: PromptConfig, prepared, rationales_path, out_dir,
                mesh=None) -> dict:
  """Distils the rationales in `rationales_path` into LoRA adapters of the student (`cfg` and
  the student's prompt section `pcfg` resolved: `Config.resolved`, `Config.student_prompt`).

  Writes out_dir/checkpoints (orbax: adapters, optimizer and loader state; a rerun resumes),
  out_dir/metrics.jsonl, and out_dir/adapter in the PEFT layout: the best adapter by held-out
  loss. Returns a summary with the held-out loss and perplexity before and after, and the
  training throughput (end to end: compilation, evaluation and checkpoints included). `mesh`
  defaults to data parallelism over every device.
  """
  mesh = mesh or parallel.make_mesh()
  _check(cfg, pcfg, mesh)
  out_dir = pathlib.Path(out_dir)
  config, base, tokenizer = checkpoints.load(
      cfg.checkpoint, mesh, dtype=cfg.dtype, param_dtype=cfg.base_dtype,
      remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers)
  users, prompt_ids, rationale_ids = training_examples(
      read_teacher_rationales(rationales_path), prepared, pcfg, tokenizer,
      cfg.max_rationale_tokens)
  held_out = heldout_users(users, cfg.heldout_fraction, cfg.seed)
  train = [i for i, user in enumerate(users) if user not in held_out]
  heldout = [i for i, user in enumerate(users) if user in held_out]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

  model, state, state_shardings, train_step = build_step(config, cfg, base, mesh)
  eval_step = make_eval_step(model, jax.tree.map(lambda x: x.sharding, base),
                             state_shardings.lora, mesh)
  train_iter, steps_per_epoch = loader.lm_training(
      [prompt_ids[i] for i in train], [rationale_ids[i] for i in train],
      batch_size=cfg.batch_size, buckets=cfg.buckets, pad_id=pad_id, seed=cfg.seed, mesh=mesh,
      pack=cfg.pack)
  evaluate = lambda state: heldout_metrics(eval_step, base, state.lora, loader.lm_eval_batches(
      [prompt_ids[i] for i in heldout], [rationale_ids[i] for i in heldout],
      batch_size=cfg.eval_batch_size, buckets=cfg.buckets, pad_id=pad_id, mesh=mesh))
  tokens = []

  def step(state, batch):
    state, metrics = train_step(base, state, batch)
    tokens.append(metrics["tokens"])
    return state, metrics

  loop_cfg = loop.LoopConfig(
      steps=cfg.steps, eval_every=cfg.eval_every, log_every=cfg.log_every,
      checkpoint_every=cfg.checkpoint_every, metric=HELDOUT_METRIC, mode="min",
      patience=cfg.patience)
  logging.info("distill: %d train and %d held-out rationales (%d steps per epoch)", len(train),
               len(heldout), steps_per_epoch)
  with jax.set_mesh(mesh):
    before = evaluate(state)
    start = time.perf_counter()
    result = loop.run(step, state, train_iter, evaluate, loop_cfg, out_dir)
    seconds = time.perf_counter() - start
  adapters = multihost_utils.process_allgather(result.state.lora, tiled=True)
  adapter = out_dir / layout.ADAPTER
  if multihost.is_writer():
    peft.save_peft(adapter, adapters, cfg.lora(), cfg.checkpoint)
  trained_tokens = int(np.sum(jax.device_get(tokens)))
  best = next(row for row in result.history if row["step"] == result.best_step)
  return {"base": cfg.checkpoint, "adapter": str(adapter), "train_examples": len(train),
          "heldout_examples": len(heldout), "steps": result.step, "best_step": result.best_step,
          "stopped_early": result.stopped_early,
          "heldout_loss_before": before[HELDOUT_METRIC],
          "heldout_perplexity_before": before["heldout/perplexity"],
          "heldout_loss": best[HELDOUT_METRIC], "heldout_perplexity": best["heldout/perplexity"],
          "train_seconds": seconds, "trained_tokens": trained_tokens,
          "tokens_per_s": trained_tokens / seconds if seconds else 0.0}
