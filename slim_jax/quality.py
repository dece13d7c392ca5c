"""Rationale quality: the filter every generated rationale passes, and how good a set of them is.

The filter (`rejection`) keeps a rationale only if it is whole (not cut at the token budget),
has its three steps in order, restates no step's instruction, repeats nothing verbatim, does not
copy the one-shot exemplar, and names in step 1 or 2 at least one attribute (category, genre,
brand) of the user's visible history: what a rationale must do to say something about this user.

The measures (`measure`) say whether the kept rationales carry information: how many users got
one, how many distinct texts there are, and a predictive check, the share of users whose step 2
names an attribute of the held-out next item against the same share with the rationales paired
with other users' next items (its expectation over every shuffle), with a bootstrap interval of
their ratio, the lift.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from slim_jax import answers, prompts

REASONS = ("truncated", "missing_step", "echo", "repetition", "copies_exemplar",
           "no_history_attribute")

_WORD = re.compile(r"[a-z0-9']+")
_CLAUSE = re.compile(r"[.;!?\n]+")


def _singular(word: str) -> str:
  """A crude singular, enough to match "comedies" with Comedy and "thrillers" with Thriller."""
  if len(word) > 4 and word.endswith("ies"):
    return word[:-3] + "y"
  if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "'s")):
    return word[:-1]
  return word


def words(text: str) -> tuple[str, ...]:
  return tuple(_singular(w) for w in _WORD.findall(text.lower()))


def item_attributes(meta) -> tuple[str, ...]:
  """An item's categories and brand: the attributes a rationale can name."""
  return tuple(a for a in (*meta.categories, meta.brand) if a.strip())


def attributes_of(prepared, items: Iterable[int]) -> tuple[str, ...]:
  """The distinct attributes of `items`, sorted."""
  return tuple(sorted({a for i in items for a in item_attributes(prepared.item_meta[i])}))


def catalogue_attributes(prepared) -> tuple[str, ...]:
  """Every attribute of the catalogue, sorted: what a rationale's step 2 can name."""
  return tuple(sorted({a for meta in prepared.item_meta for a in item_attributes(meta)}))


@functools.lru_cache(maxsize=4096)
def _index(attributes: tuple[str, ...]) -> dict[tuple[str, ...], str]:
  """Each attribute by its normalised words (attributes without a word are left out)."""
  return {words(a): a for a in attributes if words(a)}


def named_attributes(text: str, attributes: tuple[str, ...]) -> set[str]:
  """The attributes among `attributes` that `text` names (as whole words, either number)."""
  index = _index(attributes)
  if not index:
    return set()
  longest = max(map(len, index))
  tokens = words(text)
  return {index[gram] for n in range(1, longest + 1)
          for gram in zip(*(tokens[k:] for k in range(n))) if gram in index}


def _normalized(text: str) -> str:
  return " ".join(_WORD.findall(text.lower()))


_ARTICLE = re.compile(r"^(.*), (the|a|an)$", re.IGNORECASE)


def names_title(text: str, title: str) -> bool:
  """Whether `text` names `title` as whole words: MovieLens' "Usual Suspects, The (1995)" is
  matched as "the usual suspects"; a title without a word never matches."""
  title = _ARTICLE.sub(r"\2 \1", re.sub(r"\s*\([^)]*\)", "", title).strip())
  title = _normalized(title)
  return bool(title) and f" {title} " in f" {_normalized(text)} "


def repeats(steps: Sequence[str], min_words: int = 4) -> bool:
  """Whether two steps are the same text, or a clause of `min_words` or more words recurs."""
  normalized = [_normalized(step) for step in steps]
  if len(set(normalized)) < len(normalized):
    return True
  clauses = [_normalized(c) for step in steps for c in _CLAUSE.split(step)]
  clauses = [c for c in clauses if len(c.split()) >= min_words]
  return len(set(clauses)) < len(clauses)


def copies_exemplar(steps: Sequence[str], pcfg: prompts.PromptConfig) -> bool:
  """Whether a step is the exemplar's step verbatim (small models copy their one-shot)."""
  if not pcfg.exemplar:
    return False
  _, rationale = prompts.exemplar(pcfg)
  theirs = {_normalized(step) for step in answers.split_steps(rationale)}
  return any(_normalized(step) in theirs for step in steps)


def rejection(text: str, truncated: bool, history_attributes: tuple[str, ...],
              pcfg: prompts.PromptConfig) -> str | None:
  """Why a rationale is rejected (the first rule of REASONS it breaks), or None to keep it.

  History without attributes (a catalogue without metadata) passes the last rule.
  """
  if truncated:
    return "truncated"
  steps = answers.split_steps(text)
  if not all(steps):
    return "missing_step"
  if any(answers.echoes_instruction(step, k + 1) for k, step in enumerate(steps)):
    return "echo"
  if repeats(steps):
    return "repetition"
  if copies_exemplar(steps, pcfg):
    return "copies_exemplar"
  if history_attributes and not named_attributes(f"{steps[0]}\n{steps[1]}", history_attributes):
    return "no_history_attribute"
  return None


# ---------------------------------------------------------------------------------------------
# Measures of a set of rationales.


def bootstrap_ratio(own: np.ndarray, other: np.ndarray, seed: int = 0, resamples: int = 2000,
                    level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of mean(own) / mean(other), resampling users (rows paired)."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(own), (resamples, len(own)))
  ratios = own[picks].mean(axis=1) / np.maximum(other[picks].mean(axis=1), 1e-12)
  low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def predictive_lift(named: Sequence[set[str]], next_attributes: Sequence[set[str]],
                    seed: int = 0) -> dict:
  """How often a rationale's step-2 attributes (`named`) include one of its user's next item's,
  against the same rate paired with every other user's next item (the expectation of a random
  shuffle, so no shuffle's luck enters), over users whose next item has attributes."""
  keep = [k for k, attrs in enumerate(next_attributes) if attrs]
  if len(keep) < 2:
    return {"users": len(keep), "hit": 0.0, "shuffled_hit": 0.0, "lift": 0.0,
            "lift_interval": [0.0, 0.0]}
  vocabulary = sorted(set().union(*(named[k] for k in keep), *(next_attributes[k] for k in keep)))
  column = {a: j for j, a in enumerate(vocabulary)}
  said = np.zeros((len(keep), len(vocabulary)), np.float32)
  truth = np.zeros_like(said)
  for row, k in enumerate(keep):
    said[row, [column[a] for a in named[k]]] = 1
    truth[row, [column[a] for a in next_attributes[k]]] = 1
  hits = (said @ truth.T) > 0  # [rationale, next item]
  own = np.diag(hits).astype(np.float64)
  other = (hits.sum(axis=1) - own) / (len(keep) - 1)
  hit, shuffled = own.mean(), other.mean()
  return {"users": len(keep), "hit": float(hit), "shuffled_hit": float(shuffled),
          "lift": float(hit / shuffled) if shuffled else 0.0,
          "lift_interval": list(bootstrap_ratio(own, other, seed))}


def next_items(prepared, rows: Iterable[Mapping]) -> list[int]:
  """The item each rationale row is meant to help predict: the one right after the history it
  was written from (`prompts.history_end`: a split's target, or the item after a cut-off)."""
  rows = list(rows)
  users = prepared.rows_of([row["user_id"] for row in rows])
  if (users < 0).any():
    unknown = rows[int(np.argmax(users < 0))]["user_id"]
    raise ValueError(f"a rationale of user_id={unknown!r} names no user of the prepared data")
  sequences = [prepared.sequence(user) for user in users]
  return [int(sequence[prompts.history_end(row["split"], len(sequence))])
          for row, sequence in zip(rows, sequences)]


def measure(rows: Sequence[Mapping], requests: int, prepared, seed: int = 0) -> dict:
  """The quality of accepted rationale `rows` (rationales.jsonl's) out of `requests` asked."""
  texts = [row["text"] for row in rows]
  vocabulary = catalogue_attributes(prepared)
  step_two = [named_attributes(answers.split_steps(text)[1], vocabulary) for text in texts]
  following = [set(item_attributes(prepared.item_meta[i])) for i in next_items(prepared, rows)]
  return {"accepted_share": len(rows) / requests if requests else 0.0,
          "distinct_share": len(set(texts)) / len(texts) if texts else 0.0,
          "predictive": predictive_lift(step_two, following, seed)}


def centered_cosine(vectors: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """Mean pairwise cosine of `vectors` [N, D], raw and after subtracting `reference` (the mean
  item-text vector: what every text of the domain shares). Centering on the rationales' own
  mean would drive the mean pairwise cosine to about -1/(N-1) whatever they say."""
  def mean_pairwise(x):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    total = np.square(x.sum(axis=0)).sum()
    return float((total - n) / (n * (n - 1))) if n > 1 else 0.0
  vectors = np.asarray(vectors, np.float64)
  return {"mean_cosine": mean_pairwise(vectors),
          "mean_cosine_centered": mean_pairwise(vectors - np.asarray(reference, np.float64))}
