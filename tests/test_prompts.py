"""Prompts: the three-step CoT messages, history truncation to a token budget, the step parser."""

from absl.testing import absltest, parameterized
import numpy as np

from slim_jax import answers, prompts
from slim_jax.config import DataConfig
from slim_jax.data import preprocess
from slim_jax.data.formats import RawDataset
from slim_jax.prompts import PromptConfig

ITEMS = [f"Movie {i} ({1990 + i}) | Genres: Drama" for i in range(40)]


def _words(messages) -> int:
  """A stand-in tokenizer: one token per whitespace-separated word."""
  return sum(len(m["content"].split()) for m in messages)


class MessagesTest(parameterized.TestCase):

  @parameterized.parameters(*prompts.DOMAINS)
  def test_every_domain_lists_history_in_order_and_asks_three_steps(self, domain):
    messages = prompts.cot_messages(ITEMS[:3], PromptConfig(domain=domain, recommend=7))
    self.assertEqual([m["role"] for m in messages], ["system", "user", "assistant", "user"])
    self.assertEqual(messages[2]["content"], prompts.DOMAINS[domain].exemplar_rationale)
    user = messages[3]["content"]
    self.assertLess(user.index("1. Movie 0"), user.index("2. Movie 1"))
    self.assertLess(user.index("2. Movie 1"), user.index("3. Movie 2"))
    for step in ("Step 1:", "Step 2:", "Step 3:"):
      self.assertIn(step, user)
    self.assertIn("Recommend 7 concrete " + prompts.DOMAINS[domain].items, user)

  @parameterized.parameters(*prompts.DOMAINS)
  def test_every_exemplar_has_three_steps_that_answer_rather_than_echo(self, domain):
    steps = answers.split_steps(prompts.DOMAINS[domain].exemplar_rationale)
    self.assertTrue(all(steps))
    self.assertFalse(any(answers.echoes_instruction(step, k + 1) for k, step in enumerate(steps)))
    self.assertTrue(all("\n" not in step for step in steps))  # one line each, as asked
    PromptConfig(domain=domain).checked()

  def test_without_exemplar_only_the_question(self):
    messages = prompts.cot_messages(ITEMS[:3], PromptConfig(exemplar=False))
    self.assertEqual([m["role"] for m in messages], ["system", "user"])

  def test_a_custom_exemplar_replaces_the_domains(self):
    cfg = PromptConfig(exemplar_history=("Gizmo 1",), exemplar_rationale=(
        "Step 1: likes gizmos.\nStep 2: Gadgets next.\nStep 3: Gizmo 2, the sequel."))
    messages = prompts.cot_messages(ITEMS[:2], cfg.checked())
    self.assertIn("1. Gizmo 1", messages[1]["content"])
    self.assertEqual(messages[2]["content"], cfg.exemplar_rationale)

  @parameterized.named_parameters(
      ("exemplar_without_steps", dict(exemplar_history=("Gizmo",),
                                      exemplar_rationale="The user likes gizmos."),
       "must have the three steps"),
      ("exemplar_without_history", dict(exemplar_rationale="Step 1: a\nStep 2: b\nStep 3: c"),
       "without prompt.exemplar_history"),
      ("template_without_steps", dict(instruction="History:\n{history}\nWhat next?"),
       "lacks Step 1:, Step 2:, Step 3:"),
      ("template_without_history", dict(instruction="Step 1: a Step 2: b Step 3: c"),
       "lacks {history}"),
      ("unknown_history", dict(history="all"), "prompt.history='all'"),
  )
  def test_bad_templates_fail_at_start_up(self, changes, message):
    with self.assertRaisesRegex(ValueError, message):
      PromptConfig(**changes).checked()

  def test_unknown_domain_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "prompt.domain='cars'"):
      prompts.cot_messages(ITEMS[:1], PromptConfig(domain="cars"))


class TruncationTest(parameterized.TestCase):

  @parameterized.parameters(270, 300, 400, 500, 10_000)
  def test_keeps_the_newest_items_that_fit(self, budget):
    cfg = PromptConfig(max_prompt_tokens=budget)
    messages, kept = prompts.teacher_prompt(ITEMS, cfg, _words)
    self.assertLessEqual(_words(messages), budget)
    self.assertEqual(messages, prompts.cot_messages(ITEMS[-kept:], cfg))
    if kept < len(ITEMS):  # one more (older) item would not have fit
      self.assertGreater(_words(prompts.cot_messages(ITEMS[-kept - 1:], cfg)), budget)
    self.assertIn(f"{kept}. {ITEMS[-1]}", messages[-1]["content"])

  def test_student_prompt_counts_the_student_tokenizer(self):
    render = lambda messages: list(" ".join(m["content"] for m in messages).encode())  # bytes
    student = prompts.student_config(PromptConfig(max_prompt_tokens=900))
    ids, kept = prompts.student_prompt(ITEMS, student, render)
    self.assertLessEqual(len(ids), 900)
    self.assertEqual(ids, render(prompts.cot_messages(ITEMS[-kept:], PromptConfig(exemplar=False))))
    self.assertLess(kept, len(ITEMS))

  def test_budget_below_one_item_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "max_prompt_tokens=10 is too small"):
      prompts.teacher_prompt(ITEMS, PromptConfig(max_prompt_tokens=10), _words)


class VisibleHistoryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rows = [("a", f"i{k}", k) for k in range(6)] + [("b", f"i{k}", 10 + k) for k in range(3)]
    users, items, times = zip(*rows)
    raw = RawDataset("toy", np.asarray(users, str), np.asarray(items, str),
                     np.asarray(times, float), np.full(len(rows), np.nan, np.float32), {}, {})
    self.prepared = preprocess.prepare(raw, DataConfig())

  def test_prefix_never_sees_validation_or_test_items(self):
    histories = list(prompts.visible_histories(self.prepared, prompts.HISTORIES["prefix"]))
    self.assertEqual([(u, s) for u, s, _ in histories], [(0, "valid"), (1, "valid")])
    for user, _, items in histories:
      np.testing.assert_array_equal(items, self.prepared.sequence(user)[:-2])

  def test_per_split_adds_the_test_history(self):
    histories = list(prompts.visible_histories(self.prepared, prompts.HISTORIES["per_split"]))
    test = [(u, items) for u, s, items in histories if s == "test"]
    self.assertLen(histories, 4)
    for user, items in test:
      np.testing.assert_array_equal(items, self.prepared.sequence(user)[:-1])

  def test_unknown_history_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "prompt.history='all'"):
      prompts.history_splits(PromptConfig(history="all"))


FORMATS = {
    "step_colon": "Step 1: Likes dramas.\nStep 2: Drama, Crime\nStep 3:\n1. Heat\n2. Fargo",
    "bold_step_headers": ("**Step 1 - Preferences**\nLikes dramas.\n\n**Step 2 - Genres**\n"
                          "Drama, Crime\n**Step 3 - Recommendations**\n1. Heat\n2. Fargo"),
    "markdown_step_headers": ("### Step 1: Preferences\nLikes dramas.\n### Step 2: Genres\n"
                              "Drama, Crime\n### Step 3: Items\n1. Heat\n2. Fargo"),
    "numbered_list": "1. Likes dramas.\n2. Drama, Crime\n3. Heat, Fargo",
    "parenthesised": "(1) Likes dramas.\n(2) Drama, Crime\n(3) Heat, Fargo",
    "topic_headers": ("## User preferences\nLikes dramas.\n## Likely genres\nDrama, Crime\n"
                      "## Recommended movies\n1. Heat\n2. Fargo"),
    "bold_labels": ("**Preferences:** Likes dramas.\n**Categories and brands:** Drama, Crime\n"
                    "**Recommendations:** Heat, Fargo"),
    "words": "Step one: Likes dramas.\nStep two: Drama, Crime\nStep three: Heat, Fargo",
    "ordinals": "Firstly, likes dramas.\nSecondly, Drama, Crime.\nThirdly, Heat, Fargo.",
}


class ParserTest(parameterized.TestCase):

  @parameterized.named_parameters(*FORMATS.items())
  def test_finds_three_steps(self, text):
    steps = answers.split_steps(text)
    self.assertIn("dramas", steps[0].lower())
    self.assertIn("Crime", steps[1])
    self.assertIn("Heat", steps[2])
    self.assertIn("Fargo", steps[2])

  def test_numbered_items_inside_step_three_are_not_steps(self):
    steps = answers.split_steps(FORMATS["step_colon"])
    self.assertEqual(steps, ("Likes dramas.", "Drama, Crime", "1. Heat\n2. Fargo"))

  def test_missing_steps_are_reported(self):
    texts = [FORMATS["step_colon"], "Step 1: Likes dramas.\nStep 3: Heat", "Step 2:\nStep 3: x",
             "I think they like dramas.", ""]
    self.assertEqual(answers.split_steps(texts[1]), ("Likes dramas.", "", "Heat"))
    self.assertEqual(answers.missing_steps(texts), {
        "rationales": 5, "missing_any": 4, "missing_step_1": 3, "missing_step_2": 4,
        "missing_step_3": 2, "echoed_any": 0, "echoed_step_1": 0, "echoed_step_2": 0,
        "echoed_step_3": 0})
    self.assertEqual(answers.missing_steps([])["rationales"], 0)

  def test_restated_instructions_are_counted_as_echoes(self):
    echo = ("Step 1: Summarize the user's preferences from this history.\n"
            "Step 2: Based on these preferences, infer the genres the user is most likely to "
            "want next.\nStep 3: Recommend 5 concrete movies that fit these preferences and "
            "genres.\n\nAnswer:")
    answer = ("Step 1: The user enjoys gritty crime dramas from the nineties.\n"
              "Step 2: Crime, Thriller\nStep 3: 1. Heat - a crime epic")
    counts = answers.missing_steps([echo, answer])
    self.assertEqual((counts["missing_any"], counts["echoed_any"]), (0, 1))
    self.assertEqual([counts[f"echoed_step_{k}"] for k in (1, 2, 3)], [1, 1, 1])


if __name__ == "__main__":
  absltest.main()
