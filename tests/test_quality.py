"""The rationale quality filter, rule by rule on constructed texts, and the quality measures on
constructed rationales whose values are known."""

import dataclasses

import numpy as np
from absl.testing import absltest, parameterized

from slim_jax import quality
from slim_jax.data.formats import ItemMeta
from slim_jax.prompts import PromptConfig
from tests import fixtures

PCFG = PromptConfig(domain="movies")
HISTORY = ("Comedy", "Drama", "Sci-Fi")
GOOD = ("Step 1: The user likes comedies and light drama from the nineties.\n"
        "Step 2: Comedy and Romance are the most likely genres next.\n"
        "Step 3: Sunny Days, a comedy about a road trip; Paper Hearts, a romance.")


class RejectionTest(parameterized.TestCase):

  def test_a_good_rationale_is_kept(self):
    self.assertIsNone(quality.rejection(GOOD, False, HISTORY, PCFG))

  @parameterized.named_parameters(
      ("truncated", GOOD, True, "truncated"),
      ("missing_step", GOOD.split("\nStep 3")[0], False, "missing_step"),
      ("steps_out_of_order", "Step 2: Comedy next.\nStep 1: likes comedy.\nStep 3: Sunny Days.",
       False, "missing_step"),
      ("echo", GOOD.replace("The user likes comedies and light drama from the nineties.",
                            "Summarize the user's preferences from this history."), False,
       "echo"),
      ("same_step_twice", "Step 1: The user likes comedy films a lot.\nStep 2: The user likes "
       "comedy films a lot.\nStep 3: Sunny Days, a comedy.", False, "repetition"),
      ("clause_repeated", GOOD.replace("a romance.", "a romance. Sunny Days, a comedy about a "
                                                     "road trip"), False, "repetition"),
      ("copies_exemplar", GOOD.replace("Comedy and Romance are the most likely genres next.",
                                       "Sci-Fi, Action and Thriller are the most likely genres "
                                       "next."), False, "copies_exemplar"),
      ("no_history_attribute", GOOD.replace("comedies and light drama", "long films")
       .replace("Comedy and Romance", "Westerns"), False, "no_history_attribute"),
  )
  def test_each_rule(self, text, truncated, reason):
    self.assertEqual(quality.rejection(text, truncated, HISTORY, PCFG), reason)

  def test_attributes_match_whole_words_in_either_number(self):
    found = quality.named_attributes("Comedies, sci-fi and a thriller; no dramatic turns",
                                     ("Comedy", "Sci-Fi", "Thriller", "Drama", "Children's"))
    self.assertEqual(found, {"Comedy", "Sci-Fi", "Thriller"})

  def test_a_catalogue_without_attributes_passes_the_attribute_rule(self):
    plain = GOOD.replace("comedies and light drama", "long films").replace("Comedy and Romance",
                                                                          "Westerns")
    self.assertIsNone(quality.rejection(plain, False, (), PCFG))


def prepared_with(genres, targets):
  """Prepared data whose item i has genre genres[i - 1] and whose user u's validation target is
  targets[u] (each sequence is its target three times: seq[-2] is the validation target)."""
  prepared = fixtures.prepared_from_sequences([[t] * 3 for t in targets], len(genres))
  return dataclasses.replace(
      prepared, item_meta=(ItemMeta(),) + tuple(ItemMeta(categories=(g,)) for g in genres))


def rows_naming(genres):
  return [{"user_id": f"u{u}", "split": "valid",
           "text": f"Step 1: likes {g}.\nStep 2: {g} next.\nStep 3: a {g} film."}
          for u, g in enumerate(genres)]


class MeasureTest(absltest.TestCase):

  def test_lift_when_each_step_two_names_its_users_next_genre(self):
    genres = ["Comedy", "Drama", "Horror", "Western"]
    prepared = prepared_with(genres, targets=[1, 2, 3, 4] * 5)  # user u's next item has genre u % 4
    measured = quality.measure(rows_naming(genres * 5), requests=25, prepared=prepared)
    predictive = measured["predictive"]
    self.assertEqual((predictive["users"], predictive["hit"]), (20, 1.0))
    # paired with any other user's next item: 4 of the 19 others share the genre
    self.assertAlmostEqual(predictive["shuffled_hit"], 4 / 19)
    self.assertAlmostEqual(predictive["lift"], 19 / 4)
    self.assertGreater(predictive["lift_interval"][0], 1.0)
    self.assertEqual((measured["accepted_share"], measured["distinct_share"]), (0.8, 4 / 20))

  def test_no_lift_when_step_two_ignores_the_user(self):
    prepared = prepared_with(["Comedy", "Drama"], targets=[1, 2] * 10)
    rows = rows_naming(["Comedy"] * 20)  # everyone gets the same guess
    predictive = quality.measure(rows, 20, prepared)["predictive"]
    self.assertAlmostEqual(predictive["lift"], 1.0)
    low, high = predictive["lift_interval"]
    self.assertLessEqual(low, 1.0)
    self.assertGreaterEqual(high, 1.0)

  def test_centered_cosine(self):
    rng = np.random.default_rng(0)
    shared = rng.normal(size=16)
    vectors = shared + 0.1 * rng.normal(size=(50, 16))
    measured = quality.centered_cosine(vectors, reference=shared)
    self.assertGreater(measured["mean_cosine"], 0.9)
    self.assertLess(abs(measured["mean_cosine_centered"]), 0.1)


if __name__ == "__main__":
  absltest.main()
