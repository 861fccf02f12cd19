"""The batch iterator (seeded epochs, exact resume, per-host slices), truncation policy, preference rows."""

import json

import numpy as np
import pytest

import hf_tiny
from jaxtune.data import formats, pipeline
from jaxtune.data.packing import BATCH_KEYS
from jaxtune.data.sources import DataError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return hf_tiny.save_byte_tokenizer(str(tmp_path_factory.mktemp("tok")))


def jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
  """11 rows, unpacked, each row tagged by its first token so batches are easy to compare."""
  path = jsonl(tmp_path_factory.mktemp("d") / "t.jsonl", [{"text": chr(65 + i) + "xyz"} for i in range(11)])
  return pipeline.build_dataset(path, "text", tok, 16, packing=False)


def first_tokens(batch):
  return batch["inputs"][:, 0].tolist()


def test_epochs_are_seeded_permutations_that_cover_every_row(dataset):
  it = pipeline.BatchIterator(dataset, global_batch=4, seed=7)
  stream = sum((first_tokens(it.next()) for _ in range(11)), [])  # 44 rows = 4 epochs of 11
  rows = sorted(first_tokens({"inputs": dataset.arrays["inputs"]}))
  epochs = [stream[i * 11:(i + 1) * 11] for i in range(4)]
  for epoch in epochs:
    assert sorted(epoch) == rows
  assert epochs[0] != epochs[1]  # a fresh order each epoch
  again = pipeline.BatchIterator(dataset, global_batch=4, seed=7)
  assert sum((first_tokens(again.next()) for _ in range(11)), []) == stream
  other = pipeline.BatchIterator(dataset, global_batch=4, seed=8)
  assert sum((first_tokens(other.next()) for _ in range(11)), []) != stream
  assert it.state() == {"epoch": 4, "index": 0, "seed": 7, "rows": 11}


@pytest.mark.parametrize("k", [0, 2, 3, 7])
def test_resume_continues_with_exactly_the_next_batch(dataset, k):
  uninterrupted = pipeline.BatchIterator(dataset, global_batch=4, seed=1)
  expected = [uninterrupted.next() for _ in range(k + 3)][k:]
  it = pipeline.BatchIterator(dataset, global_batch=4, seed=1)
  for _ in range(k):
    it.next()
  state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
  fresh = pipeline.BatchIterator(dataset, global_batch=4, seed=1)
  fresh.restore(state)
  for want in expected:
    got = fresh.next()
    assert set(got) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key])


def test_restore_refuses_another_seed_or_dataset(dataset):
  state = pipeline.BatchIterator(dataset, global_batch=4, seed=1).state()
  with pytest.raises(DataError, match="does not match this data"):
    pipeline.BatchIterator(dataset, global_batch=4, seed=2).restore(state)


def test_host_slices_concatenate_to_the_global_batch(dataset):
  single = pipeline.BatchIterator(dataset, global_batch=6, seed=3)
  hosts = [pipeline.BatchIterator(dataset, 6, 3, process_index=p, process_count=2) for p in range(2)]
  for _ in range(5):
    want = single.next()
    parts = [h.next() for h in hosts]
    for key in BATCH_KEYS:
      assert parts[0][key].shape[0] == 3
      np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), want[key])
  with pytest.raises(DataError, match="multiple of the 4 processes"):
    pipeline.BatchIterator(dataset, 6, 3, process_index=0, process_count=4)


def test_eval_batches_cover_every_row_once_with_zero_weight_padding(dataset):
  for hosts in (1, 2):
    batches = [list(pipeline.eval_batches(dataset, 4, p, hosts)) for p in range(hosts)]
    merged = [np.concatenate([b[i]["inputs"] for b in batches]) for i in range(len(batches[0]))]
    weights = np.concatenate([b[i]["weights"] for i in range(len(batches[0])) for b in batches])
    assert len(merged) == 3
    inputs = np.concatenate(merged)
    np.testing.assert_array_equal(inputs[:11], dataset.arrays["inputs"])
    assert (inputs[11:] == 0).all() and weights.sum() == dataset.arrays["weights"].sum()


def test_truncation_policy_is_counted(tmp_path, tok):
  records = [{"text": "a" * 40}, {"text": "b" * 10}, {"text": "c"}]
  path = jsonl(tmp_path / "t.jsonl", records)
  cut = pipeline.build_dataset(path, "text", tok, 16, packing=False)
  assert (cut.stats.kept, cut.stats.truncated, cut.stats.dropped_no_target) == (2, 1, 1)  # "c": 1 token
  np.testing.assert_array_equal(cut.arrays["inputs"][0], tok("a" * 40)["input_ids"][:16])
  assert cut.arrays["weights"][0].sum() == 15
  dropped = pipeline.build_dataset(path, "text", tok, 16, truncation="drop")
  assert (dropped.stats.kept, dropped.stats.dropped_long, dropped.stats.truncated) == (1, 1, 0)
  assert dropped.stats.dropped == 2  # "a"*40 too long, "c" no target
  assert "truncated 0, dropped 1 too long" in dropped.stats.summary()
  # an instruction whose prompt fills seq_len: nothing to learn is left after truncation
  prompt_only = jsonl(tmp_path / "i.jsonl", [{"instruction": "x" * 300, "output": "y"},
                                             {"instruction": "q", "output": "a"}])
  ds = pipeline.build_dataset(prompt_only, "instruction", tok, 200)
  assert (ds.stats.kept, ds.stats.truncated, ds.stats.dropped_no_target) == (1, 1, 1)
  with pytest.raises(DataError, match="data.truncation='cut' must be one of truncate|drop"):
    pipeline.build_dataset(path, "text", tok, 16, truncation="cut")


def test_packed_dataset_counts_and_rows(tmp_path, tok):
  path = jsonl(tmp_path / "t.jsonl", [{"text": "ab" * i} for i in range(1, 9)])
  packed = pipeline.build_dataset(path, "text", tok, 32)
  unpacked = pipeline.build_dataset(path, "text", tok, 32, packing=False)
  assert packed.stats.rows < unpacked.stats.rows == 8
  assert packed.stats.tokens == unpacked.stats.tokens == sum(2 * i for i in range(1, 9))
  assert packed.stats.target_tokens == unpacked.stats.target_tokens == sum(2 * i - 1 for i in range(1, 9))


def test_preference_rows_pair_chosen_and_rejected(tmp_path, tok):
  records = [{"prompt": "Q?", "chosen": "good", "rejected": "bad."},
             {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "hey", "rejected": "go"}]
  ds = pipeline.build_dataset(jsonl(tmp_path / "p.jsonl", records), "preference", tok, 64)
  assert set(ds.arrays) == {f"{side}_{k}" for side in ("chosen", "rejected") for k in BATCH_KEYS}
  assert len(ds) == 2 and ds.stats.kept == 2
  for i, record in enumerate(records):
    for side, e in zip(("chosen", "rejected"), formats.encode_preference(record, tok)):
      n = len(e.ids)
      assert ds.arrays[f"{side}_inputs"][i, :n].tolist() == e.ids
      assert ds.arrays[f"{side}_weights"][i].tolist() == e.loss_mask[1:] + [0] * (64 - n + 1)
      assert ds.arrays[f"{side}_weights"][i].sum() == len(record[side]) + 1  # response bytes + end of turn
  batch = pipeline.BatchIterator(ds, global_batch=2, seed=0).next()
  assert batch["chosen_inputs"].shape == batch["rejected_inputs"].shape == (2, 64)


def mixed_records(n):
  """n instruction records, every 17th missing its output (a bad record), lengths varying."""
  return [{"instruction": f"say {i}" + " x" * (i % 40)} if i % 17 == 5 else
          {"instruction": f"say {i}", "context": "y" * (i % 23), "output": "z" * (1 + i % 9)} for i in range(n)]


def test_tokenizing_processes_give_one_process_result(tmp_path, tok):
  """num_proc=2 (chunks in fresh processes) gives one process's rows, counts and first skipped
  errors (lenient), and stops at the first bad record with its FILE:LINE (not lenient)."""
  path = jsonl(tmp_path / "mixed.jsonl", mixed_records(300))
  results = [pipeline.build_dataset(path, "instruction", tok, 230, lenient=True, truncation="drop", num_proc=n)
             for n in (1, 2)]
  assert (results[0].stats.processes, results[1].stats.processes) == (1, 2)
  results[1].stats.processes = 1  # every other count and the errors are one process's
  assert results[0].stats == results[1].stats
  assert results[0].stats.skipped == 18 and len(results[0].stats.errors) == 5 and results[0].stats.dropped_long
  for key, rows in results[0].arrays.items():
    np.testing.assert_array_equal(rows, results[1].arrays[key], err_msg=key)
  pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "a" * (i % 7 + 1), "rejected": "b"}
                                            for i in range(40)])
  preference = [pipeline.build_dataset(pairs, "preference", tok, 32, num_proc=n) for n in (1, 3)]
  for key, rows in preference[0].arrays.items():
    np.testing.assert_array_equal(rows, preference[1].arrays[key], err_msg=key)
  good = [r for r in mixed_records(300) if "output" in r][:150]
  bad = jsonl(tmp_path / "bad.jsonl", good + mixed_records(300))  # bad records from line 156 on, in 4 chunks
  for n in (1, 2):
    with pytest.raises(DataError, match=r"^.*bad\.jsonl:156: missing field 'output'"):
      pipeline.build_dataset(bad, "instruction", tok, 256, num_proc=n)
  # evaluate.py's encoding (whole records, none dropped, cut at --max_len) the same way
  from jaxtune import evaluation
  good_path = jsonl(tmp_path / "good.jsonl", good)
  median = int(np.median([len(e.ids) for e in evaluation.encode_file(good_path, "instruction", tok)[0]]))
  one, two = (evaluation.encode_file(good_path, "instruction", tok, max_len=median, num_proc=n) for n in (1, 2))
  assert one == two and len(one[0]) == 150 and 0 < one[1] < 150
  for n in (1, 2):
    with pytest.raises(DataError, match=r"^.*bad\.jsonl:156: missing field 'output'"):
      evaluation.encode_file(bad, "instruction", tok, num_proc=n)


def test_a_tokenizer_that_cannot_be_pickled_tokenizes_in_process(tmp_path, tok, capsys):
  class Unpicklable:
    def __init__(self, inner):
      self.inner, self.lock = inner, __import__("threading").Lock()

    def __getattr__(self, name):
      return getattr(self.__dict__["inner"], name)

    def __call__(self, *args, **kwargs):
      return self.inner(*args, **kwargs)

  path = jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(20)])
  got = pipeline.build_dataset(path, "text", Unpicklable(tok), 16, num_proc=2)
  assert "cannot be copied to other processes" in capsys.readouterr().out and got.stats.processes == 1
  np.testing.assert_array_equal(got.arrays["inputs"], pipeline.build_dataset(path, "text", tok, 16).arrays["inputs"])


def test_auto_tokenizing_processes_follow_the_record_count(monkeypatch):
  monkeypatch.delattr("os.sched_getaffinity", raising=False)
  monkeypatch.setattr("os.cpu_count", lambda: 8)
  assert [pipeline.tokenizing_processes(0, n) for n in (10, 9_999, 10_000, 25_000, 10**7)] == [1, 1, 2, 5, 8]
  monkeypatch.setattr("os.cpu_count", lambda: 200)
  assert pipeline.tokenizing_processes(0, 10**7) == pipeline.MAX_AUTO_PROCESSES
  assert pipeline.tokenizing_processes(3, 10) == 3  # given: as given
