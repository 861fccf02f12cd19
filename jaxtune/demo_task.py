"""The demo task's metric: exact match of the answered book name, after normalisation.

The bundled demo data (jaxtune/data/demo/, built by scripts/make_demo_data.py) asks which book of
the Bible a King James verse is from; the answer is the book's name alone. A completion that rambles
("This verse is from the Book of Psalms.") does not match: following the answer format is part of
what fine-tuning teaches.
"""

from __future__ import annotations

import os
import string

DEMO_DIR = os.path.join(os.path.dirname(__file__), "data", "demo")
DEMO_TRAIN = os.path.join(DEMO_DIR, "train.jsonl")
DEMO_EVAL = os.path.join(DEMO_DIR, "eval.jsonl")

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
  """Case-folded, punctuation removed, whitespace collapsed: ' Psalms.\\n' -> 'psalms'."""
  return " ".join(text.casefold().translate(_PUNCTUATION).split())


def mentions(prediction: str, reference: str) -> bool:
  """Whether the normalised reference occurs in the normalised prediction as whole words."""
  return f" {normalise(reference)} " in f" {normalise(prediction)} "


def task_metric(predictions: list[str], references: list[str]) -> dict:
  """exact_match: fraction of normalised predictions equal to their reference (the task metric);
  mentioned: fraction that name the reference somewhere (a diagnostic: right answer, wrong format)."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not references:
    raise ValueError("task_metric needs at least one reference")
  pairs = list(zip(predictions, references))
  return {"exact_match": sum(normalise(p) == normalise(r) for p, r in pairs) / len(pairs),
          "mentioned": sum(mentions(p, r) for p, r in pairs) / len(pairs),
          "count": len(pairs)}
