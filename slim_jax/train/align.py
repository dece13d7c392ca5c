"""Aligning MiniLM with the task before it encodes (encoder.kind=minilm_aligned).

The fine-tuned encoder a CPU can afford. Fine-tuning inside the recommender's step
(slim.finetune_encoder) encodes every rationale slot of every user of a batch at each of
thousands of steps; here MiniLM is trained once, before the encode stage, so that a rationale
lands next to the text of the item that followed the history it was written from (InfoNCE over
the batch's items, as sentence-transformers' MultipleNegativesRankingLoss), and then encodes items
and rationales as the frozen one does: every recommender reads it at frozen-encoder speed.

No leak: the training pairs are the student's cut-off rationales (written from seq[:c]) with
seq[c], a training target. The validation rationale (seq[:-2]) with seq[-2] picks the epoch by
NDCG@10 of ranking every item text, the unaligned MiniLM (step 0) among the candidates; nothing
reads a test rationale or target. The result is a Hugging Face directory, reloaded and served like
any other sentence-transformers model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from slim_jax import embed, metrics, multihost, parallel, prompts
from slim_jax.data import loader
from slim_jax.models import bert
from slim_jax.train import loop

ALIGNED = "aligned_minilm"  # encode/: the aligned encoder, a Hugging Face directory
RECORD = "alignment.json"  # in it: what it was trained on and how it did
VALID_METRIC = "valid/ndcg@10"


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """The alignment's budget, fixed for encoder.kind=minilm_aligned so its name says what ran."""
  epochs: int = 3
  batch: int = 32  # pairs; a multiple of the devices on the mesh's batch axes
  lr: float = 2e-5
  warmup_share: float = 0.1  # of the steps, then cosine decay to zero
  temperature: float = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale of 20
  seed: int = 0


@flax.struct.dataclass
class AlignState:
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Rationales and the item each one's history was followed by."""
  rationales: list[str]
  items: np.ndarray  # int32 item ids

  def digest(self) -> str:
    return hashlib.sha256((embed.texts_digest(self.rationales) + str(self.items.tolist()))
                          .encode()).hexdigest()


def next_items(rows: Sequence[Mapping], prepared) -> np.ndarray:
  """seq[end] for each rationale row written from seq[:end] (`prompts.history_end`): the item
  that followed its history; 0 for rows of users this preparation does not hold."""
  users = prepared.rows_of([str(row["user_id"]) for row in rows])
  lengths = np.diff(prepared.seq_offsets)
  items = np.zeros(len(rows), np.int32)
  for i, (row, user) in enumerate(zip(rows, users)):
    if user >= 0:
      end = prompts.history_end(row["split"], int(lengths[user]))
      items[i] = prepared.seq_items[prepared.seq_offsets[user] + end]
  return items


def split_pairs(rows: Sequence[Mapping], prepared) -> dict[str, Pairs]:
  """{"train": the cut-off rationales' pairs, "valid": the validation rationale's}, each pair's
  item a prepared one with text. Test rows never enter."""
  items = next_items(rows, prepared)
  has_text = embed.items_with_text(prepared.item_text)
  chosen = {"train": lambda split: split.startswith(prompts.CUTOFF),
            "valid": lambda split: split == "valid"}
  out = {}
  for name, wanted in chosen.items():
    keep = [i for i, row in enumerate(rows) if wanted(row["split"]) and has_text[items[i]]]
    out[name] = Pairs([rows[i]["text"] for i in keep], items[keep])
  if not len(out["train"].items) or not len(out["valid"].items):
    raise ValueError(
        "encoder.kind=minilm_aligned trains on the student's cut-off rationales and picks its "
        f"epoch on the validation ones; the student wrote {len(out['train'].items)} and "
        f"{len(out['valid'].items)} usable: run --stages=generate with prompt.history=causal")
  return out


def padded_length(token_ids: Sequence[np.ndarray]) -> int:
  """The longest, rounded up to a multiple of 8: one shape for every batch, one compilation."""
  return -(-max(len(ids) for ids in token_ids) // 8) * 8


def loss(params, batch, config: bert.BertConfig, pooling: bert.Pooling, temperature: float):
  """InfoNCE of each rationale against the batch's items; a repeated item is no negative."""
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  rationales = unit(bert.apply(params, batch["rationale_ids"], batch["rationale_mask"], config,
                               pooling))
  items = unit(bert.apply(params, batch["item_ids"], batch["item_mask"], config, pooling))
  logits = rationales @ items.T / temperature
  n = logits.shape[0]
  repeated = (batch["items"][:, None] == batch["items"][None, :]) & ~jnp.eye(n, dtype=bool)
  logits = jnp.where(repeated, -jnp.inf, logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(n)).mean()


def optimizer(cfg: AlignConfig, steps: int) -> optax.GradientTransformation:
  warmup = int(cfg.warmup_share * steps)
  return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(steps, 1)))


BATCH_NDIMS = {"rationale_ids": 2, "rationale_mask": 2, "item_ids": 2, "item_mask": 2, "items": 1}


def training_batches(pairs: Pairs, encoder: bert.SentenceEncoder, item_texts: Sequence[str],
                     cfg: AlignConfig, mesh: jax.sharding.Mesh
                     ) -> tuple[loader.BatchIterator, int]:
  """Shuffled batches of pairs, every text padded to one length per side; batches per epoch."""
  rationales = encoder.tokenize(pairs.rationales)
  targets = encoder.tokenize([item_texts[item] for item in pairs.items])
  lengths = ((padded_length(rationales),), (padded_length(targets),))
  pad_id = encoder.pad_id

  def make_batch(rows):
    rationale = loader.text_batch(rationales, rows, lengths[0], pad_id)
    item = loader.text_batch(targets, rows, lengths[1], pad_id)
    return {"rationale_ids": rationale["input_ids"], "rationale_mask": rationale["attention_mask"],
            "item_ids": item["input_ids"], "item_mask": item["attention_mask"],
            "items": pairs.items[rows]}

  batches = loader.training_batches(len(pairs.items), make_batch, batch_size=cfg.batch,
                                    seed=cfg.seed, mesh=mesh, num_epochs=cfg.epochs)
  return batches, max(len(pairs.items) // cfg.batch, 1)


def validation(encoder: bert.SentenceEncoder, valid: Pairs, item_texts: Sequence[str],
               encoder_cfg: embed.EncoderConfig, mesh: jax.sharding.Mesh):
  """evaluate(state) -> {VALID_METRIC}: each validation rationale ranks every item with text."""
  embedder = embed.sentence_embedder(encoder)
  step, _ = embed.embed_step(embedder, mesh)
  embed_with = lambda params, texts: embed.embed_texts(
      texts, embedder, step, params, batch_size=encoder_cfg.batch_size,
      buckets=encoder_cfg.buckets, mesh=mesh)
  with_text = np.flatnonzero(embed.items_with_text(item_texts))
  texts = [item_texts[i] for i in with_text]
  column = np.full(len(item_texts), -1)
  column[with_text] = np.arange(len(with_text))
  targets = column[valid.items]

  def evaluate(state: AlignState) -> dict[str, float]:
    scores = embed_with(state.params, valid.rationales) @ embed_with(state.params, texts).T
    ranks = np.asarray(metrics.target_ranks(scores, targets))
    return {VALID_METRIC: metrics.ranking_metrics(ranks, (10,))["ndcg@10"]}

  return evaluate


def manifest(source: pathlib.Path, cfg: AlignConfig, pairs: Mapping[str, Pairs], max_len: int,
             item_texts: Sequence[str]) -> dict:
  """What an aligned directory was trained from: a rerun with the same one reuses it."""
  return {"source": str(source.resolve()), "align": dataclasses.asdict(cfg), "max_len": max_len,
          "pairs": {name: p.digest() for name, p in pairs.items()},
          "item_texts_sha256": embed.texts_digest(item_texts)}


def _recorded(directory: pathlib.Path) -> dict | None:
  path = directory / RECORD
  return json.loads(path.read_text()) if path.is_file() else None


def align(encoder_cfg: embed.EncoderConfig, prepared, rows: Sequence[Mapping], out: pathlib.Path,
          mesh: jax.sharding.Mesh | None = None, cfg: AlignConfig = AlignConfig()) -> dict:
  """Aligns the MiniLM of `encoder_cfg` on the student's rationale `rows` (a rationales.jsonl's)
  into out/ALIGNED and returns its record; a directory of the same manifest is reused. Training
  checkpoints (out/align/) resume an interrupted run and are removed once the directory is
  written."""
  out, mesh = pathlib.Path(out), mesh or parallel.make_mesh()
  source = embed.checkpoint_dir(encoder_cfg)
  encoder = bert.load(source, encoder_cfg.max_len)
  pairs = split_pairs(rows, prepared)
  wanted = manifest(source, cfg, pairs, encoder.max_len, prepared.item_text)
  directory, workdir = out / ALIGNED, out / "align"
  recorded = _recorded(directory)
  if recorded is not None and recorded["manifest"] == wanted:
    logging.info("align: %s holds this alignment, reused", directory)
    return recorded
  if multihost.is_writer():
    started = workdir / "manifest.json"
    if started.is_file() and json.loads(started.read_text()) != wanted:
      shutil.rmtree(workdir)  # checkpoints of another alignment: resuming them would mix two
    workdir.mkdir(parents=True, exist_ok=True)
    multihost.write_text(started, json.dumps(wanted, indent=2))
  multihost.barrier("align_start")

  batches, per_epoch = training_batches(pairs["train"], encoder, prepared.item_text, cfg, mesh)
  steps = cfg.epochs * per_epoch
  tx = optimizer(cfg, steps)
  init = lambda params: AlignState(params, tx.init(params))
  rules = (*bert.PARTITION_RULES, (r".*", P()))  # the optimizer's step count
  shardings = parallel.param_shardings(jax.eval_shape(init, encoder.params), rules, mesh)
  state = jax.jit(init, out_shardings=shardings)(encoder.params)
  objective = lambda params, batch: loss(params, batch, encoder.config, encoder.pooling,
                                         cfg.temperature)

  def step(state, batch):
    value, grads = jax.value_and_grad(objective)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return AlignState(optax.apply_updates(state.params, updates), opt_state), {"loss": value}

  batch_shardings = {name: parallel.batch_sharding(mesh, ndim) for name, ndim in BATCH_NDIMS.items()}
  step = jax.jit(step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  evaluate = validation(encoder, pairs["valid"], prepared.item_text, encoder_cfg, mesh)
  unaligned = evaluate(state)[VALID_METRIC]
  result = loop.run(step, state, batches, evaluate,
                    loop.LoopConfig(steps=steps, eval_every=per_epoch, log_every=per_epoch,
                                    metric=VALID_METRIC), workdir)
  improved = result.best is not None and result.best > unaligned
  params = (jax.tree.map(parallel.to_host, result.state.params) if improved
            else encoder.params)
  record = {"manifest": wanted, "train_pairs": len(pairs["train"].items),
            "valid_pairs": len(pairs["valid"].items), "steps": result.step,
            "chosen_step": result.best_step if improved else 0,
            "valid_ndcg@10_unaligned": unaligned, "valid_ndcg@10": max(result.best or 0, unaligned),
            "history": result.history}
  if multihost.is_writer():
    staged = out / f".{ALIGNED}.{os.getpid()}.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    bert.save(staged, params, source)
    (staged / RECORD).write_text(json.dumps(record, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staged, directory)
    shutil.rmtree(workdir)
  multihost.barrier("align_written")
  return record
