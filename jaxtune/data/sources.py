"""Data sources -> records with their origin (FILE:LINE or FILE:ROW), field mapping, train/eval split.

A source is a .jsonl/.json/.csv/.parquet file, a folder of them (local or gs://, read through
etils.epath), or a `datasets` hub name (`NAME` or `NAME:SPLIT`). JSONL is parsed here line by line because `datasets`' json loader
loses line numbers and dies on the first bad line; CSV and parquet go through `datasets` (a CSV
record is named by the line it starts on, a parquet record by its row).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

JSONL_EXTS = (".jsonl", ".ndjson")
DATASETS_BUILDERS = {".csv": "csv", ".parquet": "parquet"}
EXTS = JSONL_EXTS + (".json",) + tuple(DATASETS_BUILDERS)


class DataError(ValueError):
  """Bad data or a bad source; the message is one line that starts with FILE:LINE (or the source)."""


@dataclasses.dataclass
class Records:
  """Raw records (whatever JSON value each line held) and where each came from."""

  records: list[Any]
  origins: list[str]
  errors: list[str] = dataclasses.field(default_factory=list)  # lines skipped in lenient mode

  def __len__(self) -> int:
    return len(self.records)

  def subset(self, indices: Sequence[int]) -> "Records":
    return Records([self.records[i] for i in indices], [self.origins[i] for i in indices], list(self.errors))


def _not_utf8(origin: str, data: bytes, e: UnicodeDecodeError) -> str:
  column = e.start - data.rfind(b"\n", 0, e.start)
  return f"{origin}: not UTF-8 text (byte {data[e.start]:#04x} at column {column})"


def _check_unicode(record: Any) -> Any:
  """json.loads accepts escaped lone surrogates ("\\ud800"), which no tokenizer can encode."""
  try:
    json.dumps(record, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError("a string holds an unpaired surrogate escape such as \\ud800 (not Unicode text)") from None
  return record


def _jsonl(path: str, lenient: bool) -> Records:
  out = Records([], [])
  with epath.Path(path).open("rb") as f:  # bytes: a line that is not UTF-8 is reported (or skipped) by itself
    for number, raw in enumerate(f, start=1):
      origin = f"{path}:{number}"
      try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # -sig: a byte-order mark is fine
        if not line.strip():
          continue  # blank lines (often a trailing one) carry no record
        out.records.append(_check_unicode(json.loads(line.rstrip("\r\n"))))
        out.origins.append(origin)
      except ValueError as e:  # bad bytes, bad JSON, bad escapes
        if isinstance(e, UnicodeDecodeError):
          message = _not_utf8(origin, raw, e)
        elif isinstance(e, json.JSONDecodeError):
          message = f"{origin}: invalid JSON ({e.msg} at column {e.colno})"
        else:
          message = f"{origin}: {e}"
        if not lenient:
          raise DataError(message) from None
        out.errors.append(message)
  return out


def _json(path: str, lenient: bool) -> Records:
  """A .json file holding one array of records, or JSON lines under a .json name."""
  data = epath.Path(path).read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    if lenient and not data.lstrip().startswith(b"["):  # JSON lines: skip just the bad ones
      return _jsonl(path, lenient)
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(_not_utf8(f"{path}:{line}", data, e)) from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    if text.lstrip().startswith("["):  # a broken array: its own line, nothing to skip to
      raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return _jsonl(path, lenient)  # not one JSON document: JSON lines, reported per line
  if isinstance(value, dict):  # a single object on one line is one JSON-lines record
    value = [value]
  if not isinstance(value, list):
    raise DataError(f"{path}: expected a JSON array of records, got a {type(value).__name__}")
  out = Records([], [])
  for row, record in enumerate(value, start=1):
    try:
      out.records.append(_check_unicode(record))
      out.origins.append(f"{path}:{row}")
    except ValueError as e:
      if not lenient:
        raise DataError(f"{path}:{row}: {e}") from None
      out.errors.append(f"{path}:{row}: {e}")
  return out


def _root_cause(e: BaseException) -> str:
  """`datasets` wraps the parser's error (which names the line) in a generic one: unwrap it."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _datasets_table(dataset, name: str, lines: list[int] | None = None) -> Records:
  """Records named NAME:N, N the record's first line in the file when `lines` gives one per record
  (CSV), else its row number (parquet, datasets names)."""
  rows = dataset.to_list()
  numbers = lines if lines is not None and len(lines) == len(rows) else range(1, len(rows) + 1)
  return Records(rows, [f"{name}:{n}" for n in numbers])


def _csv_record_lines(path: str) -> list[int]:
  """The line on which each CSV data record starts (after the header; blank lines skipped, as the
  reader skips them; a quoted field may span lines)."""
  starts = []
  with epath.Path(path).open("rb") as f:
    reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
    while True:
      start = reader.line_num + 1
      try:
        row = next(reader)
      except (StopIteration, csv.Error, ValueError):  # ValueError: not UTF-8; row numbers then
        break
      if row:
        starts.append(start)
  return starts[1:]


def _datasets_file(path: str) -> Records:
  import datasets
  builder = DATASETS_BUILDERS[os.path.splitext(path)[1].lower()]
  kwargs = {}
  if builder == "csv":  # every CSV column is text: pandas would make an answer column of "2"s ints
    with epath.Path(path).open("rb") as f:
      header = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")), [])
    kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
  try:
    dataset = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
  except Exception as e:  # pandas/arrow parse errors: one line naming the file
    raise DataError(f"{path}: cannot read {builder} ({_root_cause(e)})") from None
  return _datasets_table(dataset, path, _csv_record_lines(path) if builder == "csv" else None)


def _hub(name: str) -> Records:
  import datasets
  dataset_name, _, split = name.partition(":")
  try:
    dataset = datasets.load_dataset(dataset_name, split=split or "train")
  except Exception as e:  # offline, unknown name, missing split
    raise DataError(f"{name}: cannot load the datasets name ({_root_cause(e)})") from None
  return _datasets_table(dataset, name)


def _file(path: str, lenient: bool) -> Records:
  ext = os.path.splitext(path)[1].lower()
  if ext in JSONL_EXTS:
    return _jsonl(path, lenient)
  if ext == ".json":
    return _json(path, lenient)
  if ext in DATASETS_BUILDERS:
    return _datasets_file(path)
  raise DataError(f"{path}: unsupported data file type (expected one of {', '.join(EXTS)})")


def _remote_files(source: str) -> list[str]:
  """The data files of a gs:// file or folder (sorted, subfolders included)."""
  def walk(path):
    for child in path.iterdir():
      yield from walk(child) if child.is_dir() else (child,)
  path = epath.Path(source)
  if path.is_dir():
    files = sorted(str(p) for p in walk(path) if p.suffix.lower() in EXTS)
    if not files:
      raise DataError(f"{source}: folder has no data files ({', '.join(EXTS)})")
    return files
  if path.exists():
    return [source]
  raise DataError(f"{source}: no such file")


def source_files(source: str) -> list[str] | None:
  """The data files of a local or gs:// source (sorted for a folder), or None for a datasets hub name."""
  if "://" in source:
    return _remote_files(source)
  if os.path.isdir(source):
    files = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                   if os.path.isfile(p) and os.path.splitext(p)[1].lower() in EXTS)
    if not files:
      raise DataError(f"{source}: folder has no data files ({', '.join(EXTS)})")
    return files
  if os.path.isfile(source):
    return [source]
  if os.path.splitext(source)[1].lower() in EXTS or source.startswith((".", "/", "~")):
    raise DataError(f"{source}: no such file")
  return None


def rename_fields(record: Any, field_map: Mapping[str, str] | None) -> Any:
  """{"instruction": "question"} makes the source column "question" the record's "instruction"."""
  if not field_map or not isinstance(record, dict):
    return record
  record = dict(record)
  for field, column in field_map.items():
    if column in record:
      record[field] = record.pop(column)
  return record


def read_records(sources: str | Sequence[str], *, field_map: Mapping[str, str] | None = None,
                 lenient: bool = False) -> Records:
  """All records of one or more sources, in order, with field mapping applied.

  A malformed JSON line raises DataError("FILE:LINE: invalid JSON (...)"), or is skipped and
  recorded in `.errors` when lenient.
  """
  sources = [sources] if isinstance(sources, str) else list(sources)
  out = Records([], [])
  for source in sources:
    files = source_files(os.path.expanduser(source))
    parts = [_hub(source)] if files is None else [_file(f, lenient) for f in files]
    for part in parts:
      out.records.extend(rename_fields(r, field_map) for r in part.records)
      out.origins.extend(part.origins)
      out.errors.extend(part.errors)
  return out


def split_records(records: Records, eval_fraction: float, seed: int) -> tuple[Records, Records]:
  """(train, eval): a seeded random `eval_fraction` of the records held out; both keep file order."""
  if not 0.0 < eval_fraction < 1.0:
    raise DataError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
  n = len(records)
  n_eval = int(round(eval_fraction * n))
  if n_eval == 0 or n_eval == n:
    raise DataError(f"data.eval_fraction={eval_fraction} of {n} records leaves an empty split")
  held_out = np.zeros(n, dtype=bool)
  held_out[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
  train = records.subset(np.flatnonzero(~held_out).tolist())
  evaluation = records.subset(np.flatnonzero(held_out).tolist())
  evaluation.errors = []  # skipped lines are reported once, with the train split
  return train, evaluation
