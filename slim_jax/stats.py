"""Is a variant better than another? Paired tests and intervals over seeds and over users.

Two questions, two tests, both two-sided and paired (scipy.stats, not hand-written):
- over seeds: does the variant beat the other when both train from the same seed? A paired
  t-test, because Wilcoxon's exact p over five pairs cannot go below 0.0625;
- over users: does it rank the same users' targets better? Each user's metric is first averaged
  over the seeds (so that every pair is one independent user), then Wilcoxon's signed-rank test.
A p >= ALPHA is reported as "no measurable difference", whatever the sign of the difference, and
always beside the 95% interval of the per-user difference and the minimum effect that interval
could have detected: "no difference" from a wide interval is no evidence of absence.

Which contrasts are asked, and how their p-values are corrected, is declared here, once, for the
report (one seed) and the ablation table (several): the PRIMARY_CONTRASTS, the paper's claims,
taken at the main settings of a sweep, are a small family per backbone and protocol whose
p-values are Holm-corrected (the chance of any false claim among them stays at ALPHA); every
other contrast (those at other settings too) is a control, Benjamini-Hochberg adjusted over all
of them (`contrasts`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import scipy.stats

from slim_jax import metrics

ALPHA = 0.05
NO_DIFFERENCE = "no measurable difference"
# Per-user ranks in ranked_test.npz of each evaluation protocol: full ranking, and the paper's
# (the target among `rec.sampled_negatives` random negatives).
PROTOCOLS = {"full": "ranks", "sampled": "sampled_ranks"}
POWER = 0.8  # of `minimum_detectable_effect`
# (variant, against): the paper's claims, tested as one family per backbone and protocol.
PRIMARY_CONTRASTS = (
    ("item_text", "plain"),  # item text helps the backbone
    ("id_based", "item_text"),  # the rationale helps beyond item text: "over backbone+"
    ("id_based", "shuffled"),  # it is the user's own rationale that helps
    ("id_based", "history_text"),  # the rationale adds to the text of the history it was read from
)
# What the columns of a table of primary contrasts hold (the report's and the ablation table's).
PRIMARY_LEGEND = (
    "the change of the mean; the mean per-user difference with its 95% paired bootstrap "
    "interval over users (each user's value averaged over the seeds); MDE, the smallest true "
    f"difference that interval could detect (power {POWER:.0%}, two-sided alpha {ALPHA}; in % of "
    "the other's mean); p over seeds (paired t) and over users (Wilcoxon), Holm-corrected within "
    "the primary family of the backbone and protocol. A p >= "
    f"{ALPHA} reads \"{NO_DIFFERENCE}\": an effect as large as the MDE would likely have "
    "shown; smaller ones are not ruled out.")
# Every variant is also compared with these (controls, not claims).
BASELINES = ("plain", "shuffled")
# (variant, against) controls of what the primary contrasts would credit to text or rationale:
# the text or the extra map of item vectors? The fusion layer or the rationale's content?
CONTROL_CONTRASTS = (("item_text", "item_text_permuted"), ("id_based", "constant_rationale"))


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
  if len(p_values) == 0:
    return []
  return scipy.stats.false_discovery_control(np.asarray(p_values, np.float64)).tolist()


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values (Holm 1979), for the primary family: the i-th smallest of
  m p-values (i from 0) is multiplied by m - i, the products are made non-decreasing in that order
  and capped at 1. Rejecting where the adjusted p < ALPHA keeps the chance of any false claim in
  the family at ALPHA, whatever the dependence between the tests. scipy.stats has
  Benjamini-Hochberg (`adjusted`) but not Holm."""
  p = np.asarray(p_values, np.float64)
  order = np.argsort(p, kind="stable")
  stepped = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
  out = np.empty(len(p))
  out[order] = np.minimum(stepped, 1.0)
  return out.tolist()


def adjusted_within(p_values: Sequence[float | None], families: Sequence[Hashable],
                    method: Callable[[Sequence[float]], list[float]]) -> list[float | None]:
  """Each p adjusted by `method` (holm, adjusted) among the p-values of its own family; None (no
  test) stays None and counts in no family."""
  out: list[float | None] = [None] * len(p_values)
  for family in dict.fromkeys(families):
    members = [i for i, (p, f) in enumerate(zip(p_values, families))
               if f == family and p is not None]
    if not members:
      continue
    for i, p in zip(members, method([p_values[i] for i in members])):
      out[i] = p
  return out


def minimum_detectable_effect(low: float, high: float, confidence: float = 0.95,
                              power: float = POWER, alpha: float = ALPHA) -> float:
  """The smallest true mean difference a two-sided test at `alpha` would detect with `power`,
  given the `confidence` interval [low, high] of the estimate: with the standard error taken
  from the interval's width, SE = (high - low) / (2 z_{(1 + confidence) / 2}),

    MDE = (z_{1 - alpha / 2} + z_{power}) x SE   (about 2.80 SE at alpha 0.05, power 0.8).

  A contrast reported as "no measurable difference" rules out effects about this large, not
  smaller ones."""
  z = scipy.stats.norm.ppf
  standard_error = (high - low) / (2 * z((1 + confidence) / 2))
  return float((z(1 - alpha / 2) + z(power)) * standard_error)


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


def contrast(mine: Mapping[int, Mapping[int, float]],
             theirs: Mapping[int, Mapping[int, float]], seed: int = 0) -> dict:
  """One variant against another on the seeds both have; `mine[seed][user]` is a run's per-user
  metric (one protocol). The effect two ways, the relative change of the mean ("change") and
  the mean per-user difference with its 95% paired bootstrap interval over users of their
  seed-averaged values and its `minimum_detectable_effect` ("mde"; "mde_relative" of the other's
  mean, "base_mean"); p over seeds (paired t on each seed's mean over the users both runs have,
  None under two seeds) and over users (Wilcoxon on the seed-averaged values)."""
  seeds = sorted(set(mine) & set(theirs))
  if not seeds:
    raise ValueError("the two variants share no seed")
  _, a, b = paired_users(seed_averaged([mine[s] for s in seeds]),
                         seed_averaged([theirs[s] for s in seeds]))
  difference, low, high = mean_interval(a - b, seed=seed)
  per_seed = [paired_users(mine[s], theirs[s])[1:] for s in seeds]
  base = float(b.mean())
  mde = minimum_detectable_effect(low, high)
  return {"seeds": len(seeds), "users": len(a), "mean": float(a.mean()), "base_mean": base,
          "change": float(a.mean()) / base - 1 if base else None,
          "difference": difference, "low": low, "high": high,
          "mde": mde, "mde_relative": mde / base if base else None,
          "p_seeds": p_over_seeds([x.mean() for x, _ in per_seed],
                                  [y.mean() for _, y in per_seed]),
          "p_users": p_over_users(a, b)}


def contrast_pairs(rows: Sequence[Mapping], reference: Callable[[Mapping, str], Mapping | None],
                   is_main: Callable[[Mapping], bool],
                   extra: Sequence[tuple[Mapping, Mapping]] = ()) -> list[tuple[bool, Mapping,
                                                                                  Mapping]]:
  """(primary, row, base) for every contrast to test among `rows` (each with a "variant"):
  first the PRIMARY_CONTRASTS of the rows `is_main` accepts (the sweep's main settings), then,
  as controls, each row against the BASELINES, the PRIMARY_CONTRASTS at the other settings (an
  encoder, a fusion, a schedule), the CONTROL_CONTRASTS and the `extra` pairs, each pair once
  and in its first direction (shuffled against plain, not plain against shuffled too).
  `reference(row, variant)` is the `variant` row `row` is compared with, or None."""
  primary = [(row, base) for variant, against in PRIMARY_CONTRASTS for row in rows
             if row["variant"] == variant and is_main(row)
             for base in [reference(row, against)] if base is not None]
  controls = [(row, base) for against in BASELINES for row in rows
              for base in [reference(row, against)] if base is not None]
  controls += [(row, base) for variant, against in (*PRIMARY_CONTRASTS, *CONTROL_CONTRASTS)
               for row in rows if row["variant"] == variant
               for base in [reference(row, against)] if base is not None]
  out, seen = [], set()
  for is_primary, pairs in ((True, primary), (False, [*controls, *extra])):
    for row, base in pairs:
      if row is not base and frozenset((id(row), id(base))) not in seen:
        seen.add(frozenset((id(row), id(base))))
        out.append((is_primary, row, base))
  return out


def contrasts(pairs: Sequence[tuple[bool, Mapping, Mapping]],
              users_of: Callable[[Mapping], Mapping[int, Mapping[str, Mapping[int, float]]]]
              ) -> list[dict]:
  """Each pair of `contrast_pairs` under each of the PROTOCOLS: its `contrast` (users_of(row) is
  {seed: {protocol: {user: value}}}) with "primary", "row", "base" and "protocol", and both
  p-values adjusted ("p_seeds_adjusted", "p_users_adjusted"): Holm within the primary family of
  the row's backbone and protocol, Benjamini-Hochberg over all the controls together."""
  out = []
  for primary, row, base in pairs:
    for protocol in PROTOCOLS:
      per_protocol = lambda r: {s: users[protocol] for s, users in users_of(r).items()}
      out.append({"primary": primary, "row": row, "base": base, "protocol": protocol,
                  **contrast(per_protocol(row), per_protocol(base))})
  families = [(c["row"].get("backbone"), c["protocol"]) if c["primary"] else "controls"
              for c in out]
  for kind in ("seeds", "users"):
    p_values = [c[f"p_{kind}"] for c in out]
    held = adjusted_within([p if c["primary"] else None for p, c in zip(p_values, out)],
                           families, holm)
    controlled = adjusted_within([None if c["primary"] else p for p, c in zip(p_values, out)],
                                 families, adjusted)
    for c, h, b in zip(out, held, controlled):
      c[f"p_{kind}_adjusted"] = h if c["primary"] else b
  return out


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


def describe_change(change: float | None) -> str:
  """A relative change as the tables print it: "+3.1%", "" without a base to be relative to."""
  return "" if change is None else f"{100 * change:+.1f}%"


def describe_interval(contrast_: Mapping) -> str:
  """A contrast's mean per-user difference with its 95% interval, as the tables print it."""
  return f"{contrast_['difference']:+.4f} [{contrast_['low']:+.4f}, {contrast_['high']:+.4f}]"


def describe_mde(contrast_: Mapping) -> str:
  """A contrast's minimum detectable effect, absolute and relative to the other's mean."""
  relative = contrast_.get("mde_relative")
  return f"{contrast_['mde']:.4f}" + ("" if relative is None else f" ({100 * relative:.1f}%)")
