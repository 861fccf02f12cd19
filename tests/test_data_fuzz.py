"""Fuzzing the data path (file -> records -> tokens -> packed rows): random, truncated and wrongly
typed JSON lines, odd unicode, empty strings, huge records, broken bytes. build_dataset either
succeeds with well-formed rows or raises DataError naming FILE:LINE (or the file); nothing else."""

import json
import random
import re

import pytest

from jaxtune.data import pipeline
from jaxtune.data.sources import DataError
from jaxtune.models import loading

SEQ_LEN = 48
ODD_TEXT = ["", " ", "\n", "\t\r\n", "\u200b", "\u202e reversed", "e\u0301\u0301", "\U0001F600\U0001F469\u200d\U0001F467",
            "\x00nul", "\\", '"', "\ufeffbom", "\u2028\u2029", "\ud7ff\ue000\uffff", "<|im_end|>", "<|im_start|>user",
            "{{ raise }}", "a" * 5000, "日本語のテキスト", "\U0010ffff", "\x7f\x1b[31m"]
LONE_SURROGATE_LINE = '{"text": "\\ud800 half a pair", "instruction": "\\udfff", "output": "x\\ud83d"}'


def odd_string(rng: random.Random) -> str:
  pieces = rng.choices(ODD_TEXT + ["word"] * 4, k=rng.randint(0, 4))
  return "".join(pieces)


def odd_value(rng: random.Random, depth: int = 0):
  kind = rng.randrange(9 if depth < 2 else 6)
  if kind == 0:
    return None
  if kind == 1:
    return rng.choice([True, False])
  if kind == 2:
    return rng.choice([0, -1, 2**63, 1e308, -0.0, 3.5])
  if kind in (3, 4, 5):
    return odd_string(rng)
  if kind == 6:
    return [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
  if kind == 7:  # a message-like object (right or wrong)
    return {"role": rng.choice(["user", "assistant", "system", "", 3]), "content": odd_value(rng, depth + 1)}
  return {rng.choice(["text", "output", "x"]): odd_value(rng, depth + 1)}


def good_record(rng: random.Random, fmt: str) -> dict:
  text = lambda: odd_string(rng) or "fine"  # noqa: E731
  if fmt == "text":
    return {"text": text()}
  if fmt == "instruction":
    record = {"instruction": text(), "output": text()}
    if rng.random() < 0.5:
      record["context"] = odd_string(rng)
    return record
  if fmt == "chat":
    turns = [{"role": r, "content": text()} for r in rng.choice([["user", "assistant"], ["system", "user", "assistant"],
                                                                   ["user", "assistant", "user", "assistant"]])]
    return {"messages": turns}
  prompt = text() if rng.random() < 0.7 else [{"role": "user", "content": text()}]
  return {"prompt": prompt, "chosen": text(), "rejected": text()}


def mutate(rng: random.Random, record: dict):
  """A record with one thing wrong (or right): a field dropped, retyped, emptied, renamed, or huge."""
  record = json.loads(json.dumps(record))
  key = rng.choice(sorted(record))
  action = rng.randrange(7)
  if action == 0:
    del record[key]
  elif action == 1:
    record[key] = odd_value(rng)
  elif action == 2:
    record[key] = ""
  elif action == 3:
    record[key.upper()] = record.pop(key)
  elif action == 4:
    record[key] = "huge " * rng.choice([200, 20000])
  elif action == 5:
    return odd_value(rng)  # not an object at all
  return record


def line_of(rng: random.Random, fmt: str) -> str:
  record = good_record(rng, fmt)
  roll = rng.random()
  if roll < 0.35:
    return json.dumps(record, ensure_ascii=rng.random() < 0.5)
  if roll < 0.65:
    return json.dumps(mutate(rng, record), ensure_ascii=rng.random() < 0.5)
  if roll < 0.75:
    line = json.dumps(record)
    return line[:rng.randrange(len(line))]  # truncated (a crash mid-write)
  if roll < 0.8:
    return LONE_SURROGATE_LINE
  if roll < 0.9:
    return rng.choice(["", "   ", "null", "[]", "{}", "[1, 2]", '"text"', "{'single': 'quotes'}", "NaN", "{,}",
                       '{"text": "a"} {"text": "b"}', '{"text": "a"', "\x00", '{"text": "\\x41"}'])
  return json.dumps(record) + rng.choice(["\r", " trailing", ",", "\u2028"])


def write_case(path: str, rng: random.Random, fmt: str) -> None:
  """JSON lines (.jsonl), or for a .json path one array of records, perhaps cut short."""
  if path.endswith(".json"):
    records = [mutate(rng, good_record(rng, fmt)) if rng.random() < 0.5 else good_record(rng, fmt)
               for _ in range(rng.randint(1, 6))]
    text = json.dumps(records, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.2:
      text = text[:rng.randrange(len(text))]
    if rng.random() < 0.2:
      text = text.replace("fine", "\\udc00", 1)
    lines = [text]
  else:
    lines = [line_of(rng, fmt) for _ in range(rng.randint(1, 8))]
  data = rng.choice(["\n", "\r\n"]).join(lines).encode("utf-8", "surrogatepass")
  if rng.random() < 0.15:  # broken bytes: invalid UTF-8 somewhere
    at = rng.randrange(len(data) + 1)
    data = data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + data[at:]
  if rng.random() < 0.1:
    data = b"\xef\xbb\xbf" + data  # a UTF-8 byte-order mark
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture(scope="module")
def tokenizer(tiny_setup):
  return loading.load_tokenizer(tiny_setup[0])


def check_dataset(ds: pipeline.PackedDataset, fmt: str) -> None:
  sides = ["chosen_", "rejected_"] if fmt == "preference" else [""]
  for side in sides:
    ids, seg, w = (ds.arrays[side + k] for k in ("inputs", "segment_ids", "weights"))
    assert ids.shape == seg.shape == w.shape and ids.shape[1] == SEQ_LEN
    assert ((ids >= 0) & (ids < 256)).all()
    assert (w[seg == 0] == 0).all()  # padding is never a target
    assert w.sum() > 0
  assert ds.stats.kept >= 1 and ds.stats.kept + ds.stats.skipped <= ds.stats.records


@pytest.mark.parametrize("fmt", ["text", "instruction", "chat", "preference"])
def test_fuzzed_files_load_or_fail_with_file_and_line(tokenizer, tmp_path, fmt):
  rng = random.Random(f"jaxtune-fuzz-{fmt}")
  outcomes = {"ok": 0, "DataError": 0}
  for case in range(150):
    path = str(tmp_path / f"case{case}.{rng.choice(['jsonl', 'jsonl', 'json'])}")
    write_case(path, rng, fmt)
    lenient, packing = rng.random() < 0.5, rng.random() < 0.5
    truncation = rng.choice(["truncate", "drop"])
    try:
      ds = pipeline.build_dataset(path, fmt, tokenizer, SEQ_LEN, template=rng.choice(["alpaca", "chat"]),
                                  lenient=lenient, packing=packing, truncation=truncation,
                                  add_eos=fmt == "text", progress=False)
    except DataError as e:
      message = str(e)
      assert "\n" not in message, message
      assert re.match(rf"{re.escape(path)}(:\d+)?: \S", message), message
      outcomes["DataError"] += 1
      continue
    except Exception as e:  # anything else is a crash without a clear message
      with open(path, "rb") as f:
        raise AssertionError(f"case {case} ({fmt}, lenient={lenient}): {type(e).__name__}: {e}\n"
                             f"file: {f.read()[:600]!r}") from e
    check_dataset(ds, fmt)
    outcomes["ok"] += 1
  print(fmt, outcomes)
  assert outcomes["ok"] >= 10 and outcomes["DataError"] >= 10, outcomes  # both paths were exercised
