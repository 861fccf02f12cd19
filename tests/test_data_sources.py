"""Data sources and bad data: every bad record is one DataError line FILE:LINE naming the field."""

import json

import pandas as pd
import pytest

import hf_tiny
from jaxtune.data import formats, pipeline
from jaxtune.data.sources import DataError, read_records, split_records

GOOD = {"instruction": "Say hi", "output": "hi"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return hf_tiny.save_byte_tokenizer(str(tmp_path_factory.mktemp("tok")))


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


# (format, bad line, expected message after "FILE:LINE: ")
BAD = [
    ("instruction", '{"instruction": "a", "output": }', "invalid JSON (Expecting value at column 32)"),
    ("instruction", '{"instruction": "a"}', "missing field 'output'"),
    ("instruction", '{"output": "b"}', "missing field 'instruction'"),
    ("instruction", '{"instruction": "a", "output": "  "}', "field 'output' is empty"),
    ("instruction", '{"instruction": "a", "output": 3}', "field 'output' must be a string, got int"),
    ("instruction", '{"instruction": ["a"], "output": "b"}', "field 'instruction' must be a string, got list"),
    ("instruction", '[1, 2]', "record is a list, expected a JSON object"),
    ("instruction", '"just a string"', "record is a str, expected a JSON object"),
    ("text", '{"txt": "a"}', "missing field 'text'"),
    ("chat", '{"messages": []}', "field 'messages' must be a non-empty list of messages"),
    ("chat", '{"messages": [{"role": "user"}]}', "field 'messages'[0] must be an object with string 'role' and 'content'"),
    ("chat", '{"messages": [{"role": "user", "content": "a"}]}', "field 'messages' has no assistant turn"),
    ("chat", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
     "field 'messages'[1] (assistant) is empty"),
    ("preference", '{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
]


@pytest.mark.parametrize("fmt,line,message", BAD)
def test_bad_record_is_one_line_naming_file_line_and_field(tmp_path, tok, fmt, line, message):
  good = {"instruction": GOOD, "text": {"text": "abc"}, "chat": GOOD_CHAT,
          "preference": {"prompt": "p", "chosen": "a", "rejected": "b"}}[fmt]
  # a blank line before the bad one: line numbers are the file's, not the records'
  path = write_lines(tmp_path / "d.jsonl", [json.dumps(good), "", line, json.dumps(good)])
  with pytest.raises(DataError) as e:
    pipeline.build_dataset(path, fmt, tok, 256)
  assert str(e.value) == f"{path}:3: {message}"
  assert "\n" not in str(e.value)


def test_lenient_skips_and_counts_every_bad_line(tmp_path, tok):
  bad = [line for fmt, line, _ in BAD if fmt == "instruction"]
  path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)] + bad + [json.dumps(GOOD)])
  ds = pipeline.build_dataset(path, "instruction", tok, 256, lenient=True, packing=False)
  assert (ds.stats.records, ds.stats.kept, ds.stats.skipped) == (len(bad) + 2, 2, len(bad))
  assert len(ds) == 2
  assert ds.stats.errors[0] == f"{path}:2: invalid JSON (Expecting value at column 32)"
  assert ds.stats.errors[1] == f"{path}:3: missing field 'output'"
  assert f"skipped {len(bad)} bad" in ds.stats.summary()


def test_field_map_renames_columns_and_errors_name_the_source_column(tmp_path, tok):
  mapped = {"question": "Say hi", "answer": "hi"}
  path = write_lines(tmp_path / "d.jsonl", [json.dumps(mapped), json.dumps({"question": "q"})])
  field_map = {"instruction": "question", "output": "answer"}
  records = read_records(path, field_map=field_map)
  assert records.records[0] == GOOD
  with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'output' \(source column 'answer'"):
    pipeline.build_dataset(path, "instruction", tok, 256, field_map=field_map)
  ds = pipeline.build_dataset(path, "instruction", tok, 256, field_map=field_map, lenient=True,
                              packing=False)
  expected = formats.encode_record(GOOD, "instruction", tok)
  n = len(expected.ids)
  assert ds.arrays["inputs"][0, :n].tolist() == expected.ids


def test_csv_parquet_json_and_folder_sources_give_the_same_records(tmp_path, tok):
  rows = [GOOD, {"instruction": "Add", "context": "1+1", "output": "2"}]
  frame = pd.DataFrame(rows)
  folder = tmp_path / "mixed"
  folder.mkdir()
  frame.to_csv(folder / "a.csv", index=False)
  frame.to_parquet(folder / "b.parquet")
  (folder / "c.json").write_text(json.dumps(rows))
  write_lines(folder / "d.jsonl", [json.dumps(r) for r in rows])
  (folder / "notes.txt").write_text("not data")
  expected = [dict(GOOD, context=None), rows[1]]  # tables fill a missing column with None
  for name, first in (("a.csv", 2), ("b.parquet", 1)):  # CSV: the line after the header; parquet: the row
    records = read_records(str(folder / name))
    assert records.records == expected
    assert records.origins == [f"{folder / name}:{first}", f"{folder / name}:{first + 1}"]
  assert read_records(str(folder / "c.json")).records == rows
  (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert read_records(str(tmp_path / "lines.json")).records == rows  # JSON lines named .json
  (tmp_path / "broken.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]')
  with pytest.raises(DataError, match=r"broken.json:3: invalid JSON \(Expecting value at column 12\)"):
    read_records(str(tmp_path / "broken.json"))
  everything = read_records(str(folder))
  assert len(everything) == 8
  assert everything.origins[-1] == f"{folder / 'd.jsonl'}:2"
  ds_csv = pipeline.build_dataset(str(folder / "a.csv"), "instruction", tok, 256, packing=False)
  ds_jsonl = pipeline.build_dataset(str(folder / "d.jsonl"), "instruction", tok, 256, packing=False)
  for k in ds_csv.arrays:
    assert (ds_csv.arrays[k] == ds_jsonl.arrays[k]).all()


def test_bad_csv_record_names_file_and_line(tmp_path, tok):
  """FILE:LINE is the line the record starts on, past the header, a blank line and a quoted field
  spanning two lines."""
  path = tmp_path / "d.csv"
  path.write_text('instruction,output\nAdd one and one,2\n\n"Say it\non two lines",ok\nNo answer,\n')
  records = read_records(str(path))
  assert records.records[0]["output"] == "2"  # numbers-only columns stay text
  assert records.records[1]["instruction"] == "Say it\non two lines"
  assert records.origins == [f"{path}:2", f"{path}:4", f"{path}:6"]
  with pytest.raises(DataError) as e:
    pipeline.build_dataset(str(path), "instruction", tok, 256)
  assert str(e.value) == f"{path}:6: missing field 'output'"


def test_missing_file_and_empty_folder(tmp_path, tok):
  with pytest.raises(DataError, match="nope.jsonl: no such file"):
    read_records(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match="folder has no data files"):
    read_records(str(tmp_path))
  only_bad = write_lines(tmp_path / "bad.jsonl", ['{"instruction": 1, "output": "x"}'])
  with pytest.raises(DataError, match="bad.jsonl: no usable records"):
    pipeline.build_dataset(only_bad, "instruction", tok, 256, lenient=True)


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": str(i)}) for i in range(50)])
  records = read_records(path)
  train, evaluation = split_records(records, 0.2, seed=3)
  again_train, again_eval = split_records(records, 0.2, seed=3)
  _, other_eval = split_records(records, 0.2, seed=4)
  assert (len(train), len(evaluation)) == (40, 10)
  assert evaluation.origins == again_eval.origins and train.origins == again_train.origins
  assert evaluation.origins != other_eval.origins
  assert sorted(train.origins + evaluation.origins, key=lambda o: int(o.rsplit(":")[-1])) == records.origins
  assert train.origins == sorted(train.origins, key=lambda o: int(o.rsplit(":")[-1]))  # file order kept
  loaded_train, loaded_eval = pipeline.load_splits(path, eval_fraction=0.2, seed=3)
  assert loaded_eval.origins == evaluation.origins
  given_train, given_eval = pipeline.load_splits(path, path)
  assert len(given_train) == len(given_eval) == 50
  with pytest.raises(DataError, match="eval_fraction"):
    split_records(records, 1.5, seed=0)


def test_unparseable_csv_names_the_file_and_the_parser_line(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("instruction,output\nAdd,2\nSub,1,3\n")
  with pytest.raises(DataError) as e:
    read_records(str(path))
  assert str(e.value) == (f"{path}: cannot read csv (ParserError: Error tokenizing data. C error: "
                          "Expected 2 fields in line 3, saw 3)")


def test_a_datasets_name_goes_to_load_dataset_with_its_split(monkeypatch):
  import datasets
  calls = []

  def fake_load_dataset(name, split):
    calls.append((name, split))
    if name == "missing/set":
      raise ConnectionError("hub not reachable\nsecond line")
    return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  records = read_records(["org/set", "org/set:test"], field_map={"instruction": "question"})
  assert calls == [("org/set", "train"), ("org/set", "test")]
  assert records.records == [{"instruction": "q", "answer": "a"}] * 2
  assert records.origins == ["org/set:1", "org/set:test:1"]
  with pytest.raises(DataError) as e:
    read_records("missing/set")
  assert str(e.value) == "missing/set: cannot load the datasets name (ConnectionError: hub not reachable second line)"
