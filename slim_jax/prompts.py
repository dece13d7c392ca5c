"""SLIM's chain-of-thought prompt and the history it shows (`answers` reads the answers).

The teacher and the student read the same chat messages: the user's ordered history and a
request to reason in three steps, from macro to micro (preferences, then the categories or
brands likely next, then concrete items). Only the tokenizer differs, so the history is cut to a
token budget measured by whichever tokenizer will read it, dropping the oldest items first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from slim_jax import checks

STEPS = 3
# Which split's visible history a rationale is written from. "valid" sees seq[:-2], the training
# prefix; "test" sees seq[:-1]; a cut-off split "cut<f>" sees the first f of the training prefix
# (`history_end`). A rationale never sees the item it helps to predict. "causal" (the default)
# writes, beside valid and test, one per `prompt.rationale_cutoffs`, so that training rows can
# read a rationale as old as it would be in use (slim.rationale_schedule=causal); the teacher
# writes the valid one only (what distillation trains on).
HISTORIES = {"prefix": ("valid",), "per_split": ("valid", "test"), "causal": ("valid", "test")}
CUTOFF = "cut"  # the prefix of a cut-off split's name
# The paper's schedule (slim.rationale_schedule=paper): the rationale the rows of each split
# read, the first one written. Training rows and validation read the one written from seq[:-2]
# ("valid"), whose history holds every training target; the test its own (seq[:-1]) when one was
# written.
RATIONALE_OF_SPLIT = {"train": ("valid",), "valid": ("valid",), "test": ("test", "valid")}
TRAINING_RATIONALES = RATIONALE_OF_SPLIT["train"][0]


def cutoff_split(fraction: float) -> str:
  """The split name of the rationale written from the first `fraction` of the training prefix."""
  return f"{CUTOFF}{fraction:g}"


def history_end(split: str, length: int) -> int:
  """How many of a user's `length` items the history of `split`'s rationale holds (seq[:end])."""
  if split == "valid":
    return length - 2
  if split == "test":
    return length - 1
  return int(float(split.removeprefix(CUTOFF)) * (length - 2))


def slot_order(split: str) -> float:
  """Sorts rationale splits by cut-off, which is the same order for every sequence length."""
  return {"valid": 1.0, "test": 2.0}.get(split) or float(split.removeprefix(CUTOFF))


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  domain: str = "movies"  # a key of DOMAINS
  # prefix: one rationale per user from seq[:-2]; per_split: + seq[:-1]; causal: + cut-offs
  history: str = "causal"
  rationale_cutoffs: tuple[float, ...] = (0.5, 0.75)  # causal: shares of the training prefix
  max_prompt_tokens: int = 1024  # whole prompt, counted by the tokenizer that reads it
  recommend: int = 3  # concrete items asked for in step 3 (the exemplars name three)
  max_words: int = 0  # asks for an answer under this many words (0 = no limit): small models ramble
  # Local models: the answer opens with "Step 1:" and every line end opens the next step, so
  # the model writes content instead of restating the instructions (OpenAI requests are plain).
  guided: bool = True
  # One-shot: a hand-written, fictional user and rationale as an earlier chat turn, the domain's
  # own unless exemplar_history / exemplar_rationale give another.
  exemplar: bool = True
  exemplar_history: tuple[str, ...] = ()
  exemplar_rationale: str = ""
  instruction: str = ""  # a template in INSTRUCTION's placeholders; "" = INSTRUCTION
  # The student's prompt budget (0 = max_prompt_tokens): it has no exemplar to fit, and every
  # user's prompt is prefilled at generation, so a smaller one buys throughput.
  student_max_prompt_tokens: int = 0

  def checked(self) -> PromptConfig:
    """This config, or a clear error for a value that would fail (or mislead) a run."""
    domain(self)
    checks.one_of("prompt.history", self.history, HISTORIES)
    checks.within(self, "prompt", "(0, 1)", "rationale_cutoffs")
    checks.within(self, "prompt", "[1, inf)", "max_prompt_tokens", "recommend")
    checks.within(self, "prompt", "[0, inf)", "max_words", "student_max_prompt_tokens")
    if self.instruction:
      missing = [marker for marker in ("{history}", *step_markers(self))
                 if marker not in self.instruction]
      if missing:
        raise ValueError(f"prompt.instruction lacks {', '.join(missing)}: a template must show "
                         "the history and ask for the three steps by their markers")
    if self.exemplar_rationale and not self.exemplar_history:
      raise ValueError("prompt.exemplar_rationale is set without prompt.exemplar_history")
    if self.exemplar:
      _, rationale = exemplar(self)
      if not _writes_steps(rationale, self):
        raise ValueError(f"prompt exemplar rationale {rationale[:60]!r}...: it must have the "
                         f"three steps {', '.join(step_markers(self))}, in order")
    return self


@dataclasses.dataclass(frozen=True)
class Domain:
  """The words that make one template read naturally for a kind of catalogue, and a one-shot
  exemplar: a fictional user (history lines shaped like the catalogue's item texts) and the
  rationale a good teacher would write, each step on one line."""
  items: str  # plural noun for the catalogue's items
  verb: str  # what the user did with them
  kinds: str  # the coarse attributes step 2 asks about
  exemplar_history: tuple[str, ...]
  exemplar_rationale: str


DOMAINS = {
    "movies": Domain(
        "movies", "watched", "genres",
        ("Starfall Station (1989) | Genres: Sci-Fi, Thriller",
         "The Quiet Orchard (1994) | Genres: Drama",
         "Neon Harbor (1991) | Genres: Action, Sci-Fi"),
        "Step 1: The user likes tense science fiction with action, and sometimes a quiet drama.\n"
        "Step 2: Sci-Fi, Action and Thriller are the most likely genres next.\n"
        "Step 3: Orbit Zero, a sci-fi thriller on a failing space station; Iron Tide, an action "
        "chase in a flooded city; Cold Signal, a thriller about a message from space."),
    "games": Domain(
        "video games", "played", "genres, platforms or publishers",
        ("Dungeon Lantern | Categories: Video Games, PC, Role-Playing | Brand: Owlbright",
         "Rally Comet 2 | Categories: Video Games, Racing | Brand: Tarmac Works",
         "Dungeon Lantern: Ember Keep | Categories: Video Games, PC, Role-Playing"),
        "Step 1: The user plays role-playing games on PC and follows a series they enjoy.\n"
        "Step 2: Role-Playing games on PC, perhaps from Owlbright, are the most likely next.\n"
        "Step 3: Dungeon Lantern 3, the next game of the series; Hollow Crown, a PC role-playing "
        "game; a PC game controller for long sessions."),
    "food": Domain(
        "grocery and gourmet food products", "bought", "categories or brands",
        ("Green Hill Sencha Tea, 20 bags | Categories: Grocery, Beverages, Tea | Brand: Kumo",
         "Wildflower Honey, 12 oz | Categories: Grocery, Honey | Brand: Meadowcomb",
         "Jasmine Green Tea, 50 bags | Categories: Grocery, Beverages, Tea | Brand: Kumo"),
        "Step 1: The user drinks green tea, mostly from Kumo, and sweetens it with honey.\n"
        "Step 2: Tea and Honey, especially the Kumo brand, are the most likely categories next.\n"
        "Step 3: Kumo Genmaicha Tea, a green tea of the same brand; Meadowcomb Clover Honey, a "
        "milder honey; a glass tea infuser."),
    "home": Domain(
        "home and kitchen products", "bought", "categories or brands",
        ("Cast Iron Skillet, 10 inch | Categories: Kitchen, Cookware | Brand: Emberforge",
         "Chef Knife, 8 inch | Categories: Kitchen, Cutlery | Brand: Keenline",
         "Cast Iron Dutch Oven | Categories: Kitchen, Cookware | Brand: Emberforge"),
        "Step 1: The user is equipping a kitchen with durable cast iron cookware and good knives.\n"
        "Step 2: Cookware and Cutlery, especially from Emberforge, are the most likely next.\n"
        "Step 3: Emberforge Cast Iron Griddle, to complete the set; Keenline Paring Knife, to go "
        "with the chef knife; a cast iron care kit."),
    "books": Domain(
        "books", "read", "genres or authors",
        ("The Salt Archive | Categories: Books, Mystery | Brand: Ida Marren",
         "Lanterns at Low Tide | Categories: Books, Mystery, Historical",
         "The Salt Archive II | Categories: Books, Mystery | Brand: Ida Marren"),
        "Step 1: The user reads mysteries, often historical ones, and follows Ida Marren.\n"
        "Step 2: Mystery and Historical fiction, especially by Ida Marren, are the most likely "
        "next.\n"
        "Step 3: The Salt Archive III, the next of the series; The Tin Lighthouse, a historical "
        "mystery; a mystery anthology."),
    "generic": Domain(
        "items", "interacted with", "categories or brands",
        ("Trail Bottle, 1 l | Categories: Outdoors, Hydration | Brand: Ridgeway",
         "Headlamp 300 | Categories: Outdoors, Lighting | Brand: Ridgeway",
         "Trekking Poles | Categories: Outdoors, Hiking"),
        "Step 1: The user is getting ready for hiking, with Ridgeway gear for long days out.\n"
        "Step 2: Outdoors and Hiking items, especially from Ridgeway, are the most likely next.\n"
        "Step 3: Ridgeway Daypack, for the gear; a trail first-aid kit; Ridgeway Rain Shell, "
        "for bad weather."),
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
Answer in these three steps, each on a single line."""


def domain(cfg: PromptConfig) -> Domain:
  checks.one_of("prompt.domain", cfg.domain, DOMAINS)
  return DOMAINS[cfg.domain]


def step_markers(cfg: PromptConfig) -> tuple[str, ...]:
  del cfg  # one wording for every domain
  return tuple(f"Step {k}:" for k in range(1, STEPS + 1))


def _writes_steps(text: str, cfg: PromptConfig) -> bool:
  """Whether `text` answers in the form the prompt asks for: each step's marker opens a line, in
  order, with the step's text after it (`answers.split_steps` also reads looser forms)."""
  lines = (line.strip() for line in text.splitlines())
  return all(any(line.startswith(marker) and line[len(marker):].strip() for line in lines)
             for marker in step_markers(cfg))


def prefill(cfg: PromptConfig) -> str:
  """How a local model's answer opens: the first step's marker when steps are guided."""
  return step_markers(cfg)[0] if cfg.guided else ""


def exemplar(cfg: PromptConfig) -> tuple[tuple[str, ...], str]:
  """(history, rationale) of the one-shot exemplar."""
  if cfg.exemplar_history:
    return cfg.exemplar_history, cfg.exemplar_rationale
  words = domain(cfg)
  return words.exemplar_history, words.exemplar_rationale


def request_text(item_texts: Sequence[str], cfg: PromptConfig, history_only: bool = False) -> str:
  """The user message asking for a three-step rationale about this (oldest-first) history; with
  `history_only`, the template up to and including the history."""
  words = domain(cfg)
  template = cfg.instruction or INSTRUCTION
  if history_only:
    template = template.split("{history}")[0] + "{history}"
  history = "\n".join(f"{i}. {text}" for i, text in enumerate(item_texts, 1))
  user = template.format(verb=words.verb, items=words.items, kinds=words.kinds,
                         recommend=cfg.recommend, history=history)
  if cfg.max_words and not history_only:
    user += f" Keep the whole answer under {cfg.max_words} words."
  return user


def cot_messages(item_texts: Sequence[str], cfg: PromptConfig) -> list[dict[str, str]]:
  """The chat messages asking for a three-step rationale about this (oldest-first) history,
  after the exemplar when the config has one: a turn with its history alone (the instructions
  once, in the question that matters, keep the prompt short) and the answer it deserves."""
  messages = [{"role": "system", "content": SYSTEM}]
  if cfg.exemplar:
    history, rationale = exemplar(cfg)
    messages += [{"role": "user", "content": request_text(history, cfg, history_only=True)},
                 {"role": "assistant", "content": rationale}]
  return messages + [{"role": "user", "content": request_text(item_texts, cfg)}]


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


def student_config(cfg: PromptConfig) -> PromptConfig:
  """The student's prompt: the teacher's without the exemplar (the paper's simplified student
  template). Distillation teaches the student the answer's form, and every user's prompt is
  then a shorter, cheaper prefill."""
  return dataclasses.replace(cfg, exemplar=False, max_prompt_tokens=(
      cfg.student_max_prompt_tokens or cfg.max_prompt_tokens))


def student_prompt(item_texts: Sequence[str], cfg: PromptConfig,
                   render: Callable[[list[dict[str, str]]], Sequence[int]]
                   ) -> tuple[Sequence[int], int]:
  """(token ids, items kept): the student's messages through its chat template `render`
  (e.g. apply_chat_template with the generation prompt), cut to the student's own budget; `cfg`
  is the student's prompt section (`student_config`)."""
  return fit_history(item_texts, lambda texts: render(cot_messages(texts, cfg)), len,
                     cfg.max_prompt_tokens)


def history_splits(cfg: PromptConfig, writer: str = "student") -> tuple[str, ...]:
  """The splits whose histories `writer` writes rationales from (see HISTORIES)."""
  checks.one_of("prompt.history", cfg.history, HISTORIES)
  if cfg.history != "causal":
    return HISTORIES[cfg.history]
  if writer == "teacher":
    return HISTORIES["prefix"]
  return (*HISTORIES["causal"], *(cutoff_split(f) for f in cfg.rationale_cutoffs))


def visible_histories(prepared, splits: Sequence[str]) -> Iterator[tuple[int, str, np.ndarray]]:
  """(user, split, item ids oldest first) for every rationale of `splits`; a cut-off that leaves
  a user no item is skipped (`skipped_histories` counts them)."""
  for split in splits:
    for user in range(prepared.num_users):
      sequence = prepared.sequence(user)
      end = history_end(split, len(sequence))
      if end >= 1:
        yield user, split, sequence[:end]


def skipped_histories(prepared, splits: Sequence[str]) -> int:
  """How many (user, split) histories `visible_histories` skips for holding no item."""
  lengths = np.diff(prepared.seq_offsets)
  return int(sum((np.array([history_end(s, n) for n in lengths]) < 1).sum() for s in splits))
