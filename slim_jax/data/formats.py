"""Dataset readers: RecBole atomic files, Amazon review dumps (2014, 2018), MovieLens raw files.

Every reader returns the same `RawDataset` (interactions in file order plus item metadata), so
preprocessing never cares where the data came from. A malformed line raises a ValueError that
names the file, the 1-based line and the field; with ``on_error="skip"`` it is counted in
``report["skipped_lines"]`` instead. Files may be gzipped (``.gz``).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

FORMATS = ("recbole", "amazon", "movielens")
ON_ERROR = ("raise", "skip")

# Names RecBole datasets use for the metadata we keep (first match wins).
_TITLE_FIELDS = ("movie_title", "title")
_CATEGORY_FIELDS = ("class", "categories", "category", "genre", "genres")
_YEAR_FIELDS = ("release_year", "year")
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")

# Genre flag columns of ml-100k's u.item, in file order.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western")
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


@dataclasses.dataclass(frozen=True)
class ItemMeta:
  """What we know about an item to describe it in text; empty means unknown."""
  title: str = ""
  categories: tuple[str, ...] = ()
  brand: str = ""
  year: str = ""
  description: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class RawDataset:
  """Interactions in file order (the order breaks timestamp ties) plus item metadata."""
  name: str
  users: np.ndarray  # str [N] raw user ids
  items: np.ndarray  # str [N] raw item ids
  timestamps: np.ndarray  # float64 [N]
  ratings: np.ndarray  # float32 [N], NaN when the format has none
  item_meta: Mapping[str, ItemMeta]  # raw item id -> metadata
  report: Mapping[str, int]  # skipped_lines, items_without_meta


Interaction = tuple[str, str, float, float]  # user, item, timestamp, rating


# ---------------------------------------------------------------------------------------------
# Line handling shared by every reader.


def _open(path: pathlib.Path):
  return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _parse_lines(path: pathlib.Path, parse: Callable[[str], Any], on_error: str,
                 report: dict[str, int], encoding: str = "utf-8", skip: int = 0) -> Iterator[Any]:
  """Yields parse(line) for each non-blank line after the first `skip`.

  Lines are decoded one at a time so that a bad byte, too, is reported with its line number.
  """
  with _open(path) as f:
    for lineno, raw in enumerate(f, 1):
      if lineno <= skip or not raw.strip():
        continue
      try:
        yield parse(raw.decode(encoding).rstrip("\r\n"))
      except ValueError as e:
        if on_error == "raise":
          raise ValueError(f"{path}:{lineno}: {e}") from e
        report["skipped_lines"] += 1


def _fields(line: str, sep: str, count: int) -> list[str]:
  values = line.split(sep)
  if len(values) != count:
    raise ValueError(f"expected {count} fields separated by {sep!r}, got {len(values)}")
  return values


def _id(value: Any, field: str) -> str:
  text = str(value).strip() if isinstance(value, (str, int)) else ""
  if not text:
    raise ValueError(f"field {field!r}: expected a non-empty id, got {value!r}")
  return text


def _number(value: Any, field: str) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"field {field!r}: {value!r} is not a number") from None
  if not math.isfinite(number):
    raise ValueError(f"field {field!r}: {value!r} is not finite")
  return number


def _clean(text: str) -> str:
  """Collapses whitespace: dumps carry newlines and runs of spaces inside titles and brands."""
  return " ".join(text.split())


def _check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")


def _raw_dataset(name: str, source: pathlib.Path, rows: list[Interaction],
                 item_meta: Mapping[str, ItemMeta], report: dict[str, int]) -> RawDataset:
  if not rows:
    raise ValueError(f"{source}: no interactions")
  users, items, timestamps, ratings = zip(*rows)
  report["items_without_meta"] = len(set(items) - item_meta.keys())
  return RawDataset(
      name=name,
      users=np.asarray(users, dtype=str),
      items=np.asarray(items, dtype=str),
      timestamps=np.asarray(timestamps, dtype=np.float64),
      ratings=np.asarray(ratings, dtype=np.float32),
      item_meta=item_meta,
      report=report)


def _interaction_parser(sep: str, count: int, user: int, item: int, time: int,
                        rating: int | None) -> Callable[[str], Interaction]:
  """Parser for delimited interaction lines with the given column positions."""
  def parse(line: str) -> Interaction:
    values = _fields(line, sep, count)
    return (_id(values[user], "user_id"), _id(values[item], "item_id"),
            _number(values[time], "timestamp"),
            math.nan if rating is None else _number(values[rating], "rating"))
  return parse


# ---------------------------------------------------------------------------------------------
# RecBole atomic files.


def _recbole_header(path: pathlib.Path) -> dict[str, int]:
  """Column index of every field of a `name:type` header line."""
  with _open(path) as f:
    try:
      header = f.readline().decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}:1: header is not UTF-8 ({e})") from None
  columns = {}
  for index, spec in enumerate(header.split("\t")):
    name, _, ftype = spec.partition(":")
    if not name or ftype not in _RECBOLE_TYPES:
      raise ValueError(f"{path}:1: header field {spec!r} is not name:type with type in "
                       f"{_RECBOLE_TYPES}")
    columns[name] = index
  return columns


def _required_column(columns: Mapping[str, int], field: str, path: pathlib.Path) -> int:
  if field not in columns:
    raise ValueError(f"{path}:1: header has no {field!r} field (fields: {', '.join(columns)})")
  return columns[field]


def _recbole_categories(value: str) -> tuple[str, ...]:
  """Token sequences are space separated; some converted dumps store comma-separated lists."""
  parts = value.split(",") if "," in value else value.split()
  return tuple(filter(None, (_clean(p).strip("'\"") for p in parts)))


def _recbole_item_parser(columns: Mapping[str, int], path: pathlib.Path
                         ) -> Callable[[str], tuple[str, ItemMeta]]:
  item = _required_column(columns, "item_id", path)

  def column(*names: str) -> int | None:
    return next((columns[n] for n in names if n in columns), None)

  title, categories, year = column(*_TITLE_FIELDS), column(*_CATEGORY_FIELDS), column(*_YEAR_FIELDS)
  brand, description = column("brand"), column("description")

  def parse(line: str) -> tuple[str, ItemMeta]:
    values = _fields(line, "\t", len(columns))

    def text(index: int | None) -> str:
      return "" if index is None else _clean(values[index])

    return _id(values[item], "item_id"), ItemMeta(
        title=text(title), categories=_recbole_categories(text(categories)),
        brand=text(brand), year=text(year), description=text(description))
  return parse


def _recbole_files(path: str | pathlib.Path) -> tuple[str, pathlib.Path, pathlib.Path]:
  """Accepts the dataset directory, `<dir>/<name>` or `<dir>/<name>.inter`."""
  path = pathlib.Path(path)
  if path.is_dir():
    prefix = path / path.name
  elif path.suffix in (".inter", ".item"):
    prefix = path.with_suffix("")
  else:
    prefix = path
  return prefix.name, pathlib.Path(f"{prefix}.inter"), pathlib.Path(f"{prefix}.item")


def read_recbole(dir_or_prefix: str | pathlib.Path, on_error: str = "raise") -> RawDataset:
  """Reads `<name>.inter` and, when present, `<name>.item` (tab separated, `name:type` headers)."""
  _check_on_error(on_error)
  name, inter_path, item_path = _recbole_files(dir_or_prefix)
  if not inter_path.exists():
    raise FileNotFoundError(f"no RecBole interaction file {inter_path}")
  report = {"skipped_lines": 0}
  columns = _recbole_header(inter_path)
  parse = _interaction_parser(
      "\t", len(columns), _required_column(columns, "user_id", inter_path),
      _required_column(columns, "item_id", inter_path),
      _required_column(columns, "timestamp", inter_path), columns.get("rating"))
  rows = list(_parse_lines(inter_path, parse, on_error, report, skip=1))
  item_meta = {}
  if item_path.exists():
    parse_item = _recbole_item_parser(_recbole_header(item_path), item_path)
    for item, meta in _parse_lines(item_path, parse_item, on_error, report, skip=1):
      item_meta.setdefault(item, meta)
  return _raw_dataset(name, inter_path, rows, item_meta, report)


# ---------------------------------------------------------------------------------------------
# Amazon review dumps (McAuley et al. 2014 and 2018).


def _record(line: str) -> dict[str, Any]:
  """A JSON object, or a Python dict literal (2014 metadata): parsed, never evaluated."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    try:
      record = ast.literal_eval(line)
    except (SyntaxError, TypeError, ValueError, MemoryError, RecursionError) as e:
      raise ValueError(f"neither JSON nor a Python literal ({type(e).__name__}: {e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"expected an object, got {type(record).__name__}")
  return record


def _required(record: Mapping[str, Any], field: str) -> Any:
  if field not in record:
    raise ValueError(f"missing field {field!r}")
  return record[field]


def _amazon_review(line: str) -> Interaction:
  record = _record(line)
  return (_id(_required(record, "reviewerID"), "reviewerID"),
          _id(_required(record, "asin"), "asin"),
          _number(_required(record, "unixReviewTime"), "unixReviewTime"),
          _number(_required(record, "overall"), "overall"))


def _strings(value: Any, field: str) -> list[str]:
  """Flattens a string or (nested) list of strings; 2014 categories are a list of paths."""
  if isinstance(value, str):
    return [_clean(value)] if value.strip() else []
  if isinstance(value, (list, tuple)):
    return [s for v in value for s in _strings(v, field)]
  raise ValueError(f"field {field!r}: expected text or a list of text, got {type(value).__name__}")


def _amazon_meta(line: str) -> tuple[str, ItemMeta]:
  record = _record(line)

  def text(field: str) -> str:
    return " ".join(_strings(record.get(field, ""), field))

  categories = _strings(record.get("categories", record.get("category", [])), "categories")
  return _id(_required(record, "asin"), "asin"), ItemMeta(
      title=text("title"), categories=tuple(dict.fromkeys(categories)), brand=text("brand"),
      description=text("description"))


def read_amazon(review_path: str | pathlib.Path, meta_path: str | pathlib.Path | None = None,
                on_error: str = "raise") -> RawDataset:
  """Reads a review dump (`reviews_<Cat>_5.json.gz` 2014, `<Cat>_5.json.gz` 2018) and its metadata.

  Only metadata of reviewed items is kept: full metadata dumps are much larger than 5-core reviews.
  """
  _check_on_error(on_error)
  review_path = pathlib.Path(review_path)
  report = {"skipped_lines": 0}
  rows = list(_parse_lines(review_path, _amazon_review, on_error, report))
  reviewed = {row[1] for row in rows}
  item_meta = {}
  if meta_path is not None:
    for item, meta in _parse_lines(pathlib.Path(meta_path), _amazon_meta, on_error, report):
      if item in reviewed:
        item_meta.setdefault(item, meta)
  return _raw_dataset(_amazon_category(review_path), review_path, rows, item_meta, report)


def _amazon_category(review_path: pathlib.Path) -> str:
  match = re.fullmatch(r"(?:reviews_)?(.+?)(?:_5)?\.json(?:\.gz)?", review_path.name)
  return match[1] if match else review_path.name


def _amazon_files(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """The review file (given, or the one `*_5.json[.gz]` in a directory) and its `meta_` file."""
  path = pathlib.Path(path)
  if path.is_dir():
    reviews = sorted(p for p in path.glob("*_5.json*") if not p.name.startswith("meta_"))
    if len(reviews) != 1:
      raise FileNotFoundError(f"{path}: expected one review file *_5.json[.gz], found "
                              f"{[p.name for p in reviews]}")
    path = reviews[0]
  category = _amazon_category(path)
  candidates = [path.with_name(f"meta_{category}{ext}") for ext in (".json.gz", ".json")]
  meta = next((p for p in candidates if p.exists()), None)
  if meta is None:
    raise FileNotFoundError(f"no metadata file for {path}: looked for "
                            f"{', '.join(str(p) for p in candidates)}")
  return path, meta


# ---------------------------------------------------------------------------------------------
# MovieLens raw files.


def _split_title(title: str) -> tuple[str, str]:
  """'Toy Story (1995)' -> ('Toy Story', '1995'): the year gets its own field."""
  match = _TITLE_YEAR.match(title)
  return (_clean(match[1]), match[2]) if match else (_clean(title), "")


def _ml100k_item(line: str) -> tuple[str, ItemMeta]:
  values = _fields(line, "|", 5 + len(ML100K_GENRES))
  flags = values[5:]
  if any(flag not in ("0", "1") for flag in flags):
    raise ValueError(f"genre flags: expected 0 or 1, got {'|'.join(flags)!r}")
  title, year = _split_title(values[1])
  release_date = values[2].strip()  # e.g. 01-Jan-1995
  return _id(values[0], "movie id"), ItemMeta(
      title=title, year=year or release_date[-4:],
      categories=tuple(g for g, flag in zip(ML100K_GENRES, flags) if flag == "1"))


def _ml1m_item(line: str) -> tuple[str, ItemMeta]:
  item, title, genres = _fields(line, "::", 3)
  title, year = _split_title(title)
  return _id(item, "MovieID"), ItemMeta(
      title=title, year=year, categories=tuple(filter(None, genres.split("|"))))


def read_movielens(directory: str | pathlib.Path, on_error: str = "raise") -> RawDataset:
  """Reads ml-100k (`u.data` + `u.item`) or ml-1m style (`ratings.dat` + `movies.dat`) files."""
  _check_on_error(on_error)
  directory = pathlib.Path(directory)
  if (directory / "u.data").exists():
    inter_file, sep, item_file, parse_item = "u.data", "\t", "u.item", _ml100k_item
  elif (directory / "ratings.dat").exists():
    inter_file, sep, item_file, parse_item = "ratings.dat", "::", "movies.dat", _ml1m_item
  else:
    raise FileNotFoundError(f"{directory}: no MovieLens u.data or ratings.dat")
  report = {"skipped_lines": 0}
  parse = _interaction_parser(sep, 4, user=0, item=1, time=3, rating=2)
  inter_path, item_path = directory / inter_file, directory / item_file
  rows = list(_parse_lines(inter_path, parse, on_error, report, encoding="latin-1"))
  item_meta = {}
  if item_path.exists():
    for item, meta in _parse_lines(item_path, parse_item, on_error, report, encoding="latin-1"):
      item_meta.setdefault(item, meta)
  return _raw_dataset(directory.name, inter_path, rows, item_meta, report)


# ---------------------------------------------------------------------------------------------


def read_dataset(kind: str, path: str | pathlib.Path, on_error: str = "raise") -> RawDataset:
  """Reads a dataset of the given format: "recbole", "amazon" or "movielens"."""
  if kind == "recbole":
    return read_recbole(path, on_error)
  if kind == "amazon":
    return read_amazon(*_amazon_files(path), on_error=on_error)
  if kind == "movielens":
    return read_movielens(path, on_error)
  raise ValueError(f"unknown dataset format {kind!r}; expected one of {FORMATS}")
