"""The demo task: its metric, and the bundled data files (well-formed, exactly what the script builds)."""

import json
import os
import subprocess
import sys

import hf_tiny
import pytest

from jaxtune import demo_task
from jaxtune.data.formats import encode_instruction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "make_demo_data.py")
BOOKS = ("Genesis", "Psalms", "Proverbs", "Matthew", "Revelation")


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("text,expected", [
    ("Psalms", "psalms"),
    ("  Psalms.\n", "psalms"),
    ("REVELATION!", "revelation"),
    ("The  Book\tof\nGenesis.", "the book of genesis"),
    ("", ""),
])
def test_normalise(text, expected):
  assert demo_task.normalise(text) == expected


def test_task_metric_counts_exact_and_mentioned_answers():
  predictions = ["Psalms", " genesis.", "This verse is from the Book of Proverbs.", "Matthews", "Job"]
  references = ["Psalms", "Genesis", "Proverbs", "Matthew", "Revelation"]
  metric = demo_task.task_metric(predictions, references)
  # Independent count: exact after normalisation: 0, 1; named as a whole word: 0, 1, 2.
  assert metric == {"exact_match": 2 / 5, "mentioned": 3 / 5, "count": 5}


def test_task_metric_rejects_mismatched_or_empty_inputs():
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    demo_task.task_metric(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="at least one"):
    demo_task.task_metric([], [])


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
  from transformers import AutoTokenizer
  folder = str(tmp_path_factory.mktemp("byte_tokenizer"))
  hf_tiny.save_byte_tokenizer(folder)
  return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("path,per_book", [(demo_task.DEMO_TRAIN, 200), (demo_task.DEMO_EVAL, 10)])
def test_demo_files_are_well_formed_instruction_records(path, per_book, chat_tokenizer):
  records = read_jsonl(path)
  assert len(records) == per_book * len(BOOKS)
  for record in records:
    assert set(record) == {"instruction", "context", "output"}
    assert all(isinstance(v, str) and v.strip() == v and v for v in record.values())
    assert 40 <= len(record["context"]) <= 160 and "[" not in record["context"]
    # The loss covers exactly the answer and the end-of-turn token.
    encoded = encode_instruction(record, chat_tokenizer, template="chat")
    answer = [t for t, m in zip(encoded.ids, encoded.loss_mask) if m]
    assert chat_tokenizer.decode(answer) == record["output"] + "<|im_end|>"
  assert {b: sum(r["output"] == b for r in records) for b in BOOKS} == {b: per_book for b in BOOKS}
  assert len({r["context"] for r in records}) == len(records)


def test_eval_verses_are_held_out():
  train = {r["context"] for r in read_jsonl(demo_task.DEMO_TRAIN)}
  assert not train & {r["context"] for r in read_jsonl(demo_task.DEMO_EVAL)}


def test_script_regenerates_the_committed_files_exactly(tmp_path):
  subprocess.run([sys.executable, SCRIPT, f"--out_dir={tmp_path}"], check=True, capture_output=True)
  for path in (demo_task.DEMO_TRAIN, demo_task.DEMO_EVAL):
    with open(path, "rb") as committed, open(tmp_path / os.path.basename(path), "rb") as rebuilt:
      assert rebuilt.read() == committed.read(), path
