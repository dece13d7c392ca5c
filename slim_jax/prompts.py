"""SLIM's chain-of-thought prompt, the history it shows, and the parser of its three steps.

The teacher and the student read the same chat messages: the user's ordered history and a
request to reason in three steps, from macro to micro (preferences, then the categories or
brands likely next, then concrete items). Only the tokenizer differs, so the history is cut to a
token budget measured by whichever tokenizer will read it, dropping the oldest items first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

STEPS = 3
# Which split's visible history a rationale is written from. "valid" sees seq[:-2], the training
# prefix; "test" sees seq[:-1]. A rationale never sees the item it helps to predict.
HISTORIES = {"prefix": ("valid",), "per_split": ("valid", "test")}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  domain: str = "movies"  # a key of DOMAINS
  history: str = "prefix"  # prefix: one rationale per user from seq[:-2]; per_split: + seq[:-1]
  max_prompt_tokens: int = 1024  # whole prompt, counted by the tokenizer that reads it
  recommend: int = 5  # concrete items asked for in step 3
  max_words: int = 0  # asks for an answer under this many words (0 = no limit): small models ramble


@dataclasses.dataclass(frozen=True)
class Domain:
  """The words that make one template read naturally for a kind of catalogue."""
  items: str  # plural noun for the catalogue's items
  verb: str  # what the user did with them
  kinds: str  # the coarse attributes step 2 asks about


DOMAINS = {
    "movies": Domain("movies", "watched", "genres"),
    "games": Domain("video games", "played", "genres, platforms or publishers"),
    "food": Domain("grocery and gourmet food products", "bought", "categories or brands"),
    "home": Domain("home and kitchen products", "bought", "categories or brands"),
    "books": Domain("books", "read", "genres or authors"),
    "generic": Domain("items", "interacted with", "categories or brands"),
}

SYSTEM = ("You are an expert in recommender systems. You explain a user's behaviour step by "
          "step before recommending anything.")
INSTRUCTION = """\
A user has {verb} the following {items}, in chronological order (oldest first):
{history}

Let's think step by step about what the user will want next.
Step 1: Summarize the user's preferences from this history.
Step 2: Based on these preferences, infer the {kinds} the user is most likely to want next.
Step 3: Recommend {recommend} concrete {items} that fit these preferences and {kinds}, each \
with a short reason.
Answer in exactly these three steps, each starting with "Step N:"."""


def domain(cfg: PromptConfig) -> Domain:
  if cfg.domain not in DOMAINS:
    raise ValueError(f"prompt.domain={cfg.domain!r}; expected one of {tuple(DOMAINS)}")
  return DOMAINS[cfg.domain]


def cot_messages(item_texts: Sequence[str], cfg: PromptConfig) -> list[dict[str, str]]:
  """The chat messages asking for a three-step rationale about this (oldest-first) history."""
  words = domain(cfg)
  history = "\n".join(f"{i}. {text}" for i, text in enumerate(item_texts, 1))
  user = INSTRUCTION.format(verb=words.verb, items=words.items, kinds=words.kinds,
                            recommend=cfg.recommend, history=history)
  if cfg.max_words:
    user += f" Keep the whole answer under {cfg.max_words} words."
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


Prompt = TypeVar("Prompt")


def fit_history(item_texts: Sequence[str], build: Callable[[Sequence[str]], Prompt],
                length: Callable[[Prompt], int], budget: int) -> tuple[Prompt, int]:
  """(prompt, items kept) for the longest run of newest items whose prompt fits `budget`.

  Recent behaviour says most about the next item, so the oldest items go first. A prompt only
  grows with its history, so a binary search needs O(log n) token counts.
  """
  if not len(item_texts):
    raise ValueError("cannot build a prompt from an empty history")
  fits = lambda k: length(build(item_texts[-k:])) <= budget
  if not fits(1):
    raise ValueError(f"max_prompt_tokens={budget} is too small for the prompt with a single "
                     f"history item ({length(build(item_texts[-1:]))} tokens)")
  low, high = 1, len(item_texts)
  while low < high:
    middle = (low + high + 1) // 2
    low, high = (middle, high) if fits(middle) else (low, middle - 1)
  return build(item_texts[-low:]), low


def teacher_prompt(item_texts: Sequence[str], cfg: PromptConfig,
                   count_tokens: Callable[[list[dict[str, str]]], int]
                   ) -> tuple[list[dict[str, str]], int]:
  """(messages, items kept) for a teacher whose tokenizer `count_tokens` measures messages."""
  return fit_history(item_texts, lambda texts: cot_messages(texts, cfg), count_tokens,
                     cfg.max_prompt_tokens)


def student_prompt(item_texts: Sequence[str], cfg: PromptConfig,
                   render: Callable[[list[dict[str, str]]], Sequence[int]]
                   ) -> tuple[Sequence[int], int]:
  """(token ids, items kept): the same messages through the student's chat template `render`
  (e.g. apply_chat_template with the generation prompt), cut to the student's own budget."""
  return fit_history(item_texts, lambda texts: render(cot_messages(texts, cfg)), len,
                     cfg.max_prompt_tokens)


def visible_histories(prepared, history: str) -> Iterator[tuple[int, str, np.ndarray]]:
  """(user, split, item ids oldest first) for every rationale `history` asks for."""
  if history not in HISTORIES:
    raise ValueError(f"prompt.history={history!r}; expected one of {tuple(HISTORIES)}")
  for split_name in HISTORIES[history]:
    split = prepared.split(split_name)
    for row, user in enumerate(split.users):
      yield int(user), split_name, split.history(row)


# ---------------------------------------------------------------------------------------------
# Parsing a rationale into its steps. Models mark steps in many ways; the most explicit style
# found in a text decides, so a numbered list of items inside step 3 is not taken for steps.

_DECORATION = r"[\s#*_>|-]*"
_NUMBER = {"1": 1, "2": 2, "3": 3, "one": 1, "two": 2, "three": 3, "first": 1, "second": 2,
           "third": 3}
_STEP_WORD = re.compile(
    rf"^{_DECORATION}(?:step|part)\s*(1|2|3|one|two|three)\b[\s*_:.)\-–—]*(.*)$", re.I)
_ORDINAL = re.compile(rf"^{_DECORATION}(first|second|third)(?:ly)?\b[\s*_:,.)\-–—]*(.*)$", re.I)
_NUMBERED = re.compile(r"^(?:[#*_]+\s*)?\(?([1-3])[.):]\**\s+(.*)$")  # top level only: no indent
_HEADER = re.compile(r"^\s*(?:#+\s*(?P<title>.+?)[\s#]*$"
                     r"|[*_]*(?P<label>[^:*_]{1,40}?)[*_]*\s*:[*_]*\s*(?P<rest>.*)$)")
_HEADER_TOPICS = ((1, re.compile(r"prefer|summar|profile|taste", re.I)),
                  (2, re.compile(r"categor|genre|brand|author|platform", re.I)),
                  (3, re.compile(r"recommend|suggest", re.I)))


def _step_word(line: str) -> tuple[int, str] | None:
  match = _STEP_WORD.match(line) or _ORDINAL.match(line)
  return (_NUMBER[match[1].lower()], match[2]) if match else None


def _numbered(line: str) -> tuple[int, str] | None:
  match = _NUMBERED.match(line)
  return (int(match[1]), match[2]) if match else None


def _header(line: str) -> tuple[int, str] | None:
  match = _HEADER.match(line)
  if not match:
    return None
  title, rest = (match["title"], "") if match["title"] else (match["label"], match["rest"])
  step = next((step for step, topic in _HEADER_TOPICS if topic.search(title)), None)
  return (step, rest) if step else None


_STYLES = (_step_word, _header, _numbered)


def _sections(lines: Sequence[str], marker) -> list[str] | None:
  """Text of each step under one marker style, or None if the style marks no step. Markers must
  come in increasing order; anything else is content of the current step."""
  sections, current = [[] for _ in range(STEPS)], 0
  for line in lines:
    mark = marker(line)
    if mark and mark[0] > current:
      current, line = mark[0], mark[1].strip(" *_:")
    if current:
      sections[current - 1].append(line)
  return ["\n".join(part).strip() for part in sections] if current else None


def split_steps(text: str) -> tuple[str, str, str]:
  """The three steps of a rationale; a step that is missing or empty is ""."""
  lines = text.strip().splitlines()
  for marker in _STYLES:
    sections = _sections(lines, marker)
    if sections is not None:
      return tuple(sections)
  return ("", "", "")


_WORD = re.compile(r"[a-z0-9']+")
# Each step's instruction as words (placeholders dropped), plus every domain's words: a step whose
# text is mostly these words restates its instruction instead of answering it.
_INSTRUCTION_WORDS = [
    set(_WORD.findall(re.sub(r"\{\w+\}", " ", line.lower())))
    for line in re.findall(r"^Step \d: (.*)$", INSTRUCTION, re.M)]
_DOMAIN_WORDS = {word for d in DOMAINS.values()
                 for word in _WORD.findall(f"{d.items} {d.verb} {d.kinds}")}


def echoes_instruction(step: str, number: int) -> bool:
  """Whether a step's first line only restates the prompt's instruction for step `number`."""
  words = _WORD.findall(step.strip().split("\n", 1)[0].lower()) if step.strip() else []
  known = _INSTRUCTION_WORDS[number - 1] | _DOMAIN_WORDS
  return len(words) >= 4 and sum(w in known or w.isdigit() for w in words) >= 0.8 * len(words)


def missing_steps(texts: Sequence[str]) -> dict[str, int]:
  """How many rationales lack a step, overall and per step, and how many merely restate a step's
  instruction ("echoed", which small students do): distillation quality signals."""
  steps = [split_steps(text) for text in texts]
  present = np.array([[bool(step) for step in row] for row in steps], bool).reshape(-1, STEPS)
  echoed = np.array([[echoes_instruction(step, k + 1) for k, step in enumerate(row)]
                     for row in steps], bool).reshape(-1, STEPS)
  return {"rationales": len(present), "missing_any": int((~present).any(axis=1).sum()),
          **{f"missing_step_{k + 1}": int((~present[:, k]).sum()) for k in range(STEPS)},
          "echoed_any": int(echoed.any(axis=1).sum()),
          **{f"echoed_step_{k + 1}": int(echoed[:, k].sum()) for k in range(STEPS)}}
