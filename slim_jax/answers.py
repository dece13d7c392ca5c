"""Reading a rationale: its three steps, and whether a step only restates its instruction.

Apart from `prompts` because models answer in more forms than the prompt asks for: this is the
parser of what comes back, which the quality filter, the summaries and the report read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from slim_jax.prompts import DOMAINS, INSTRUCTION, STEPS


# Models mark steps in many ways; the most explicit style found in a text decides, so a numbered
# list of items inside step 3 is not taken for steps.
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
