"""Ranking metrics, popularity bias of recommendation lists, and metrics per user-sparsity group.

Ranks are computed on the device from a batch of scores: only a rank per user and a short top-K
list ever reach the host, never a users x items matrix. A target's 0-based rank is the number of
items scoring strictly higher plus the number scoring equal with a smaller item id, i.e. its
position in a stable descending sort, the same order `jax.lax.top_k` lists items in. This tie
rule is deterministic and neither optimistic nor pessimistic about the target. The padding item
(id 0) and table rows past the catalogue never rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KS = (5, 10, 20)


def rankable(scores: jax.Array, num_items: int, targets: jax.Array,
             exclude: jax.Array | None = None) -> jax.Array:
  """Scores with padding, rows past `num_items` and the `exclude`d items int32[B, H] set to -inf.

  Excluded items (the visible history, when configured) never hide the target itself.
  """
  ids = jnp.arange(scores.shape[1])
  keep = (ids >= 1) & (ids <= num_items)
  scores = jnp.where(keep, scores, -jnp.inf)
  if exclude is None:
    return scores
  rows = jnp.arange(scores.shape[0])[:, None]
  hidden = jnp.zeros(scores.shape, bool).at[rows, exclude].set(True)
  return jnp.where(hidden & (ids != targets[:, None]), -jnp.inf, scores)


def target_ranks(scores: jax.Array, targets: jax.Array, ids: jax.Array | None = None) -> jax.Array:
  """0-based rank int32[B] of each target among the scored candidates (see the module tie rule).

  `scores` float[B, C] over candidate item `ids` int32[B, C] (default: column index = item id);
  `targets` are item ids whose score sits in the candidates.
  """
  if ids is None:
    ids = jnp.broadcast_to(jnp.arange(scores.shape[1]), scores.shape)
  target_score = jnp.max(jnp.where(ids == targets[:, None], scores, -jnp.inf), axis=1)
  ahead = (scores > target_score[:, None]) | ((scores == target_score[:, None])
                                              & (ids < targets[:, None]))
  return ahead.sum(1).astype(jnp.int32)


def top_items(scores: jax.Array, k: int) -> jax.Array:
  """The k best item ids int32[B, k], best first, ties to the smaller id."""
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def sample_candidates(keys: jax.Array, targets: jax.Array, num_items: int, n: int,
                      popularity: jax.Array | None = None,
                      exclude: jax.Array | None = None) -> jax.Array:
  """n distinct negatives int32[B, n] per target, uniform or proportional to `popularity` [I+1],
  among the items not in `exclude` int32[B, N] (the user's own items, 0 = none).

  Sampling without replacement by Gumbel top-n with one key per row (e.g. folded from the user
  id, so a user's negatives do not depend on the batch it is in); the target and padding are
  never drawn. A row needs n items it may draw (`check_negatives`).
  """
  if n >= num_items:
    raise ValueError(f"{n} sampled negatives need more than {n} items, have {num_items}")
  weights = jnp.ones(num_items + 1) if popularity is None else jnp.asarray(popularity, jnp.float32)
  ids = jnp.arange(num_items + 1)
  blocked = (ids == 0) | (ids == targets[:, None])
  if exclude is not None:
    rows = jnp.arange(len(targets))[:, None]
    blocked = blocked | jnp.zeros(blocked.shape, bool).at[rows, exclude].set(True)
  logits = jnp.where(blocked, -jnp.inf, jnp.log(weights))
  noise = jax.vmap(lambda key: jax.random.gumbel(key, (num_items + 1,)))(keys)
  return jax.lax.top_k(logits + noise, n)[1].astype(jnp.int32)


def check_negatives(sequences: np.ndarray, num_items: int, n: int) -> None:
  """A clear error when some user has fewer than n items they never interacted with."""
  unseen = num_items - np.array([len(np.unique(row[row > 0])) for row in sequences])
  if unseen.min() < n:
    user = int(unseen.argmin())
    raise ValueError(f"rec.sampled_negatives={n}: user row {user} interacted with all but "
                     f"{unseen[user]} of the {num_items} items, too few to draw negatives from")


def seen_share(top: jax.Array, seen: jax.Array) -> jax.Array:
  """float[B]: the share of each row's `top` items int32[B, K] that are among its `seen` items
  int32[B, N] (0 = none): how much of a list recommends what the user already had."""
  hit = (top[:, :, None] == seen[:, None, :]) & (seen[:, None, :] > 0)
  return hit.any(-1).mean(-1)


def sampled_ranks(scores: jax.Array, targets: jax.Array, negatives: jax.Array) -> jax.Array:
  """0-based rank of the target among itself and its sampled negatives (sampled evaluation)."""
  ids = jnp.concatenate([targets[:, None], negatives], 1)
  return target_ranks(jnp.take_along_axis(scores, ids, 1), targets, ids)


def per_user(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
  """HR@K, NDCG@K (one relevant item: 1/log2(rank+2)) and MRR@K per user from 0-based ranks."""
  ranks = np.asarray(ranks, np.float64)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f"hr@{k}"] = hit.astype(np.float64)
    out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    out[f"mrr@{k}"] = np.where(hit, 1.0 / (ranks + 1.0), 0.0)
  return out


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
  """Means over users of `per_user`."""
  return {name: float(values.mean()) for name, values in per_user(ranks, ks).items()}


def head_items(popularity: np.ndarray, share: float = 0.2) -> np.ndarray:
  """bool[I+1]: the `share` most popular items (ties to the smaller id); padding never."""
  popularity = np.asarray(popularity)
  num_items = len(popularity) - 1
  order = np.argsort(-popularity[1:], kind="stable") + 1
  head = np.zeros(num_items + 1, bool)
  head[order[:int(np.ceil(share * num_items))]] = True
  return head


def popularity_bias(top: np.ndarray, popularity: np.ndarray, k: int) -> dict[str, float]:
  """Popularity bias of the top-k lists top int32[U, >=k] given training counts popularity [I+1].

  mean_popularity: mean training interaction count of a recommended item; long_tail: share of
  recommendations outside the 20% most popular items; coverage: share of the catalogue that
  appears in some list.
  """
  top = np.asarray(top)[:, :k]
  popularity = np.asarray(popularity)
  return {f"mean_popularity@{k}": float(popularity[top].mean()),
          f"long_tail@{k}": float((~head_items(popularity)[top]).mean()),
          f"coverage@{k}": len(np.unique(top)) / (len(popularity) - 1)}


def sparsity_groups(lengths: np.ndarray, groups: int = 5) -> np.ndarray:
  """Group int[U] of each user, 0 = sparsest: equal-sized groups by history length (quintiles).

  Users are ordered by length with ties kept in user order, so groups have equal sizes (within
  one) and the assignment is deterministic.
  """
  order = np.argsort(np.asarray(lengths), kind="stable")
  group = np.empty(len(order), np.int64)
  group[order] = np.arange(len(order)) * groups // max(len(order), 1)
  return group


def grouped_metrics(ranks: np.ndarray, lengths: np.ndarray, groups: int = 5,
                    ks: Sequence[int] = KS) -> list[dict[str, float]]:
  """Ranking metrics of each sparsity group, with its size and history-length range."""
  ranks, lengths = np.asarray(ranks), np.asarray(lengths)
  group = sparsity_groups(lengths, groups)
  rows = []
  for g in range(groups):
    member = group == g
    if not member.any():
      continue
    rows.append({"group": g, "users": int(member.sum()), "min_length": int(lengths[member].min()),
                 "max_length": int(lengths[member].max()), **ranking_metrics(ranks[member], ks)})
  return rows


def prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
  return {f"{prefix}/{name}": value for name, value in metrics.items()}
