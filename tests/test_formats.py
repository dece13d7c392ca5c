"""Dataset readers on small fixture files, malformed lines included."""

import gzip
import json
import math
import pathlib

from absl.testing import absltest
import numpy as np

from slim_jax.data import formats
from slim_jax.data.formats import ItemMeta


def _write(path: pathlib.Path, lines, encoding="utf-8") -> pathlib.Path:
  data = "".join(line + "\n" for line in lines).encode(encoding)
  if path.suffix == ".gz":
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


RECBOLE_INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "u1\ti1\t4\t100",
    "u2\ti2\t3\t90",
    "",
    "u1\ti3\t5\t101",
]
RECBOLE_ITEM = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "i1\tToy Story\t1995\tAnimation Children's Comedy",
    "i2\tShawshank Redemption, The\t1994\tDrama",
]


class RecBoleTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir("toy").full_path)

  def _fixture(self, inter=RECBOLE_INTER, item=RECBOLE_ITEM):
    _write(self.dir / "toy.inter", inter)
    _write(self.dir / "toy.item", item)

  def test_reads_interactions_and_metadata(self):
    self._fixture()
    raw = formats.read_recbole(self.dir)
    self.assertEqual(raw.name, "toy")
    self.assertEqual(raw.users.tolist(), ["u1", "u2", "u1"])
    self.assertEqual(raw.items.tolist(), ["i1", "i2", "i3"])
    np.testing.assert_array_equal(raw.timestamps, [100.0, 90.0, 101.0])
    self.assertEqual(raw.timestamps.dtype, np.float64)
    np.testing.assert_array_equal(raw.ratings, np.float32([4, 3, 5]))
    self.assertEqual(raw.item_meta["i1"], ItemMeta(
        title="Toy Story", categories=("Animation", "Children's", "Comedy"), year="1995"))
    self.assertEqual(raw.item_meta["i2"].title, "Shawshank Redemption, The")
    self.assertEqual(dict(raw.report), {"skipped_lines": 0, "items_without_meta": 1})

  def test_accepts_prefix_and_inter_path(self):
    self._fixture()
    for path in (self.dir / "toy", self.dir / "toy.inter"):
      self.assertEqual(formats.read_recbole(path).items.tolist(), ["i1", "i2", "i3"])

  def test_item_file_is_optional_and_rating_column_too(self):
    _write(self.dir / "toy.inter", ["item_id:token\tuser_id:token\ttimestamp:float", "a\tb\t7"])
    raw = formats.read_recbole(self.dir)
    self.assertEqual((raw.users.tolist(), raw.items.tolist()), (["b"], ["a"]))
    self.assertTrue(math.isnan(raw.ratings[0]))
    self.assertEqual(raw.report["items_without_meta"], 1)

  def test_comma_separated_categories(self):
    self._fixture(item=["item_id:token\ttitle:token\tcategories:token_seq\tbrand:token",
                        "i1\tLip Balm\t'Beauty', 'Skin Care'\tNivea"])
    self.assertEqual(formats.read_recbole(self.dir).item_meta["i1"], ItemMeta(
        title="Lip Balm", categories=("Beauty", "Skin Care"), brand="Nivea"))

  def test_malformed_line_names_file_line_and_field(self):
    self._fixture(inter=RECBOLE_INTER + ["u3\ti1\t4\tyesterday"])
    with self.assertRaisesRegex(ValueError, r"toy\.inter:6: field 'timestamp'.*yesterday"):
      formats.read_recbole(self.dir)

  def test_wrong_field_count_raises_or_is_skipped(self):
    self._fixture(inter=RECBOLE_INTER + ["u3\ti1\t4"], item=RECBOLE_ITEM + ["i3\tNo year"])
    with self.assertRaisesRegex(ValueError, r"toy\.inter:6: expected 4 fields"):
      formats.read_recbole(self.dir)
    raw = formats.read_recbole(self.dir, on_error="skip")
    self.assertLen(raw.users, 3)
    self.assertEqual(raw.report["skipped_lines"], 2)
    self.assertEqual(raw.report["items_without_meta"], 1)

  def test_bad_header(self):
    self._fixture(inter=["user_id\titem_id:token\ttimestamp:float", "u\ti\t1"])
    with self.assertRaisesRegex(ValueError, r"toy\.inter:1: header field 'user_id'"):
      formats.read_recbole(self.dir)
    self._fixture(inter=["user_id:token\titem_id:token", "u\ti"])
    with self.assertRaisesRegex(ValueError, r"toy\.inter:1: header has no 'timestamp'"):
      formats.read_recbole(self.dir)

  def test_missing_file_and_bad_on_error(self):
    with self.assertRaisesRegex(FileNotFoundError, "toy.inter"):
      formats.read_recbole(self.dir)
    self._fixture()
    with self.assertRaisesRegex(ValueError, "on_error='ignore'"):
      formats.read_recbole(self.dir, on_error="ignore")


# Amazon 2014 metadata lines are Python literals: single quotes, not JSON.
AMAZON_2014_META = [
    "{'asin': 'A1', 'title': 'Lip Balm', 'brand': 'Nivea', 'categories': "
    "[['Beauty', 'Skin Care', 'Lips'], ['Beauty', 'Makeup']], 'description': \"Soft 'n' smooth\"}",
    "{'asin': 'A9', 'title': 'Never reviewed'}",
    "{'asin': 'A2', 'related': {'also_bought': ['A1']}, 'salesRank': {'Beauty': 12}}",
]


def _review(user, item, time, rating=5.0):
  return json.dumps({"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": time,
                     "reviewText": "fine"})


class AmazonTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir().full_path)

  def test_2014_reviews_and_python_literal_metadata(self):
    with self.assertRaises(json.JSONDecodeError):
      json.loads(AMAZON_2014_META[0])
    reviews = _write(self.dir / "reviews_Beauty_5.json.gz",
                     [_review("U1", "A1", 1400000000, 4.0), _review("U2", "A2", 1300000000),
                      _review("U1", "A3", 1400000001)])
    meta = _write(self.dir / "meta_Beauty.json.gz", AMAZON_2014_META)
    raw = formats.read_amazon(reviews, meta)
    self.assertEqual(raw.name, "Beauty")
    self.assertEqual(raw.users.tolist(), ["U1", "U2", "U1"])
    np.testing.assert_array_equal(raw.timestamps, [1400000000, 1300000000, 1400000001])
    np.testing.assert_array_equal(raw.ratings, [4.0, 5.0, 5.0])
    self.assertEqual(raw.item_meta["A1"], ItemMeta(
        title="Lip Balm", brand="Nivea", categories=("Beauty", "Skin Care", "Lips", "Makeup"),
        description="Soft 'n' smooth"))
    self.assertEqual(raw.item_meta["A2"], ItemMeta())
    self.assertNotIn("A9", raw.item_meta)  # only reviewed items are kept
    self.assertEqual(raw.report["items_without_meta"], 1)  # A3

  def test_2018_json_metadata(self):
    _write(self.dir / "Luxury_Beauty_5.json.gz", [_review("U1", "B1", 1500000000)])
    _write(self.dir / "meta_Luxury_Beauty.json.gz", [json.dumps({
        "asin": "B1", "title": "Serum", "brand": "\n  Acme  ", "category": ["Luxury", "Skin"],
        "description": ["Line one.", "Line two."], "also_buy": [], "rank": None})])
    raw = formats.read_dataset("amazon", self.dir)  # finds both files in the directory
    self.assertEqual(raw.name, "Luxury_Beauty")
    self.assertEqual(raw.item_meta["B1"], ItemMeta(
        title="Serum", brand="Acme", categories=("Luxury", "Skin"),
        description="Line one. Line two."))

  def test_malformed_lines(self):
    reviews = _write(self.dir / "reviews_Toys_5.json", [
        _review("U1", "A1", 1), '{"reviewerID": "U2", "asin": "A1", "unixReviewTime": 2}',
        "{not json"])
    meta = _write(self.dir / "meta_Toys.json", [
        "{'asin': 'A1', 'title': 'Ok'}", "__import__('os').system('echo pwned')",
        "{'title': 'no asin'}", "['A1']"])
    with self.assertRaisesRegex(ValueError, r"reviews_Toys_5\.json:2: missing field 'overall'"):
      formats.read_amazon(reviews, meta)
    raw = formats.read_amazon(reviews, meta, on_error="skip")
    self.assertEqual(raw.users.tolist(), ["U1"])
    self.assertEqual(raw.item_meta["A1"].title, "Ok")
    self.assertEqual(raw.report["skipped_lines"], 5)
    good_reviews = _write(self.dir / "good_5.json", [_review("U1", "A1", 1)])
    with self.assertRaisesRegex(ValueError, r"meta_Toys\.json:2: neither JSON nor a Python lit"):
      formats.read_amazon(good_reviews, meta)

  def test_missing_metadata_file(self):
    _write(self.dir / "reviews_Toys_5.json.gz", [_review("U1", "A1", 1)])
    with self.assertRaisesRegex(FileNotFoundError, "meta_Toys.json.gz"):
      formats.read_dataset("amazon", self.dir / "reviews_Toys_5.json.gz")


def _ml100k_item(item, title, date, genres):
  flags = ["1" if g in genres else "0" for g in formats.ML100K_GENRES]
  return "|".join([item, title, date, "", "http://us.imdb.com/x"] + flags)


class MovieLensTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir("ml-100k").full_path)

  def test_ml100k(self):
    _write(self.dir / "u.data", ["196\t242\t3\t881250949", "186\t302\t3\t891717742"])
    _write(self.dir / "u.item", [
        _ml100k_item("242", "Kolya (1996)", "24-Jan-1997", {"Comedy"}),
        _ml100k_item("302", "Café au lait", "01-Jan-1993", {"Comedy", "Film-Noir"}),
    ], encoding="latin-1")
    raw = formats.read_movielens(self.dir)
    self.assertEqual(raw.name, "ml-100k")
    self.assertEqual(raw.users.tolist(), ["196", "186"])
    np.testing.assert_array_equal(raw.timestamps, [881250949, 891717742])
    np.testing.assert_array_equal(raw.ratings, [3, 3])
    self.assertEqual(raw.item_meta["242"], ItemMeta(title="Kolya", year="1996",
                                                    categories=("Comedy",)))
    self.assertEqual(raw.item_meta["302"], ItemMeta(title="Café au lait", year="1993",
                                                    categories=("Comedy", "Film-Noir")))

  def test_ml100k_malformed(self):
    _write(self.dir / "u.data", ["1\t2\t3\t4", "1\t2\t3"])
    _write(self.dir / "u.item", [_ml100k_item("2", "X (1990)", "", set()).replace("|0|", "|2|", 1)])
    with self.assertRaisesRegex(ValueError, r"u\.data:2: expected 4 fields"):
      formats.read_movielens(self.dir)
    _write(self.dir / "u.data", ["1\t2\t3\t4"])
    with self.assertRaisesRegex(ValueError, r"u\.item:1: genre flags"):
      formats.read_movielens(self.dir)
    raw = formats.read_movielens(self.dir, on_error="skip")
    self.assertEqual(dict(raw.report), {"skipped_lines": 1, "items_without_meta": 1})

  def test_ml1m(self):
    _write(self.dir / "ratings.dat", ["1::1193::5::978300760", "1::661::3::978302109"])
    _write(self.dir / "movies.dat", ["1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
                                     "661::James and the Giant Peach (1996)::Animation|Musical"],
           encoding="latin-1")
    raw = formats.read_dataset("movielens", self.dir)
    self.assertEqual(raw.items.tolist(), ["1193", "661"])
    self.assertEqual(raw.item_meta["661"], ItemMeta(
        title="James and the Giant Peach", year="1996", categories=("Animation", "Musical")))
    _write(self.dir / "ratings.dat", ["1::1193::5::978300760", "1::661::five::978302109"])
    with self.assertRaisesRegex(ValueError, r"ratings\.dat:2: field 'rating': 'five'"):
      formats.read_movielens(self.dir)

  def test_no_files(self):
    with self.assertRaisesRegex(FileNotFoundError, "u.data or ratings.dat"):
      formats.read_movielens(self.dir)

  def test_unknown_kind(self):
    with self.assertRaisesRegex(ValueError, "unknown dataset format 'csv'"):
      formats.read_dataset("csv", self.dir)


if __name__ == "__main__":
  absltest.main()
