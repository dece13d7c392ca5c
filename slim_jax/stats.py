"""Is a variant better than another? Paired tests and intervals over seeds and over users.

Two questions, two tests, both two-sided and paired (scipy.stats, not hand-written):
- over seeds: does the variant beat the other when both train from the same seed? A paired
  t-test, because Wilcoxon's exact p over five pairs cannot go below 0.0625;
- over users: does it rank the same users' targets better? Each user's metric is first averaged
  over the seeds (so that every pair is one independent user), then Wilcoxon's signed-rank test.
A p >= ALPHA is reported as "no measurable difference", whatever the sign of the difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

from slim_jax import metrics

ALPHA = 0.05
NO_DIFFERENCE = "no measurable difference"
# Per-user ranks in ranked_test.npz of each evaluation protocol: full ranking, and the paper's
# (the target among `rec.sampled_negatives` random negatives).
PROTOCOLS = {"full": "ranks", "sampled": "sampled_ranks"}


def p_over_seeds(a: Sequence[float], b: Sequence[float]) -> float | None:
  """Two-sided p of the paired t-test of a[i] against b[i] (same seed i); None under 2 pairs."""
  difference = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if len(difference) < 2:
    return None
  if np.all(difference == difference[0]):  # no spread: t is 0 or infinite
    return 1.0 if difference[0] == 0 else 0.0
  return float(scipy.stats.ttest_rel(a, b).pvalue)


def p_over_users(a: Sequence[float], b: Sequence[float]) -> float:
  """Two-sided p of Wilcoxon's signed-rank test of paired per-user values (users who score the
  same under both drop out, as the test defines); 1 when no user differs."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.any(a != b):
    return 1.0
  return float(scipy.stats.wilcoxon(a, b).pvalue)


def adjusted(p_values: Sequence[float]) -> list[float]:
  """Benjamini-Hochberg adjusted p-values: a table testing many contrasts at once keeps the
  expected share of false discoveries among those under ALPHA at ALPHA."""
  if not p_values:
    return []
  return scipy.stats.false_discovery_control(np.asarray(p_values, np.float64)).tolist()


def user_metric(ranked: Mapping[str, np.ndarray], protocol: str = "full",
                metric: str = "ndcg@10") -> dict[int, float]:
  """user -> `metric` of one run's ranked_test.npz under `protocol` (a key of PROTOCOLS)."""
  values = metrics.per_user(ranked[PROTOCOLS[protocol]])[metric]
  return dict(zip(np.asarray(ranked["users"]).tolist(), values.tolist()))


def seed_averaged(runs: Sequence[Mapping[int, float]]) -> dict[int, float]:
  """user -> the mean of their value over `runs` (one per seed), for the users every run has."""
  users = sorted(set.intersection(*(set(run) for run in runs)))
  return {user: float(np.mean([run[user] for run in runs])) for user in users}


def paired_users(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[np.ndarray, ...]:
  """(users, a's values, b's values) over the users both have, in user order."""
  users = np.array(sorted(set(a) & set(b)), np.int64)
  return users, np.array([a[u] for u in users]), np.array([b[u] for u in users])


def mean_interval(values: Sequence[float], confidence: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float]:
  """(mean, low, high): the mean of `values` and its percentile bootstrap interval."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if np.all(values == values[0]):  # every resample has this mean
    return mean, mean, mean
  interval = scipy.stats.bootstrap((values,), np.mean, confidence_level=confidence,
                                   n_resamples=2000, method="percentile",
                                   rng=np.random.default_rng(seed)).confidence_interval
  return mean, float(interval.low), float(interval.high)


def gain_by_history(gain: Mapping[int, float], history_lengths: np.ndarray,
                    groups: int = 5) -> list[dict]:
  """Per quintile of history length (0 = sparsest; `metrics.sparsity_groups` over the users of
  `gain`): the mean per-user gain with its 95% bootstrap interval."""
  users = np.array(sorted(gain), np.int64)
  values = np.array([gain[u] for u in users])
  lengths = np.asarray(history_lengths)[users]
  group = metrics.sparsity_groups(lengths, groups)
  rows = []
  for g in range(groups):
    member = group == g
    if member.any():
      mean, low, high = mean_interval(values[member], seed=g)
      rows.append({"group": g, "users": int(member.sum()), "min_length": int(lengths[member].min()),
                   "max_length": int(lengths[member].max()), "gain": mean, "low": low,
                   "high": high})
  return rows


def describe_p(p: float | None) -> str:
  """A p-value as the tables print it: "—" when there is no test."""
  if p is None:
    return "—"
  return f"{p:.2g}" if p < ALPHA else f"{p:.2g}: {NO_DIFFERENCE}"
