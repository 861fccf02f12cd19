"""Sources -> encoded records -> rows (tokenized once, kept in memory) -> per-host global batches.

    train, evaluation = pipeline.load_splits("train.jsonl", eval_fraction=0.1, seed=0)  # or an eval source
    ds = pipeline.build_dataset(train, "instruction", tokenizer, seq_len=512)  # ds.stats.summary()
    it = pipeline.BatchIterator(ds, global_batch=32, seed=0, process_index=p, process_count=P)
    batch = it.next()            # this host's rows of the next global batch (numpy)
    state = it.state()           # {"epoch", "index", "seed", "rows"}; it.restore(state) resumes exactly

Bad records raise DataError("FILE:LINE: <message naming the field>"), or are skipped and counted
when lenient. Over-long records are truncated or dropped by policy, and counted either way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pickle
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxtune.data import formats
from jaxtune.data.formats import Encoded, RecordError
from jaxtune.data.packing import pack
from jaxtune.data.sources import DataError, Records, read_records, split_records

TRUNCATION = ("truncate", "drop")
PROGRESS_MIN_RECORDS = 5000  # below this a progress bar is noise
RECORDS_PER_PROCESS = 5000  # data.num_proc=0 (auto) starts a tokenizing process per this many records
MAX_AUTO_PROCESSES = 32


@dataclasses.dataclass
class DataStats:
  records: int = 0          # records read (good or bad)
  kept: int = 0             # records (pairs, for preference) that made it into rows
  skipped: int = 0          # bad JSON lines and bad records, lenient mode only
  truncated: int = 0        # kept, cut to seq_len
  dropped_long: int = 0     # longer than seq_len under truncation="drop"
  dropped_no_target: int = 0  # no target token left (after truncation, or none to begin with)
  tokens: int = 0           # tokens in the rows (padding excluded)
  target_tokens: int = 0    # tokens with weight 1
  rows: int = 0
  rows_tokens: int = 0      # rows x seq_len (x 2 for preference pairs)
  errors: list[str] = dataclasses.field(default_factory=list)  # the first few skipped-record messages
  processes: int = 1        # how many processes tokenized the records

  def add(self, other: DataStats) -> None:
    """Adds `other`'s counts (and its first errors, up to MAX_ERRORS_KEPT in all) to these."""
    for field in dataclasses.fields(self):
      if field.name not in ("errors", "processes"):
        setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
    self.errors += other.errors[:MAX_ERRORS_KEPT - len(self.errors)]

  @property
  def dropped(self) -> int:
    return self.dropped_long + self.dropped_no_target

  def summary(self) -> str:
    fill = self.tokens / max(self.rows_tokens, 1)
    text = (f"{self.kept} of {self.records} records kept in {self.rows} rows ({fill:.0%} filled), "
            f"{self.target_tokens} target tokens; skipped {self.skipped} bad, truncated "
            f"{self.truncated}, dropped {self.dropped_long} too long and {self.dropped_no_target} "
            f"with no target")
    return text + (f"; first skipped: {self.errors[0]}" if self.errors else "")


@dataclasses.dataclass
class PackedDataset:
  """Rows in the batch contract (N x seq_len numpy arrays); preference rows carry chosen_*/rejected_*."""

  arrays: dict[str, np.ndarray]
  seq_len: int
  stats: DataStats

  def __len__(self) -> int:
    return next(iter(self.arrays.values())).shape[0]


MAX_ERRORS_KEPT = 5


def _fit(e: Encoded, seq_len: int, truncation: str, stats: DataStats) -> Encoded | None:
  """The record cut to seq_len by policy, or None when it must go (counted in stats)."""
  if len(e.ids) > seq_len:
    if truncation == "drop":
      stats.dropped_long += 1
      return None
    e = Encoded(e.ids[:seq_len], e.loss_mask[:seq_len])
    stats.truncated += 1
  if not any(e.loss_mask[1:]):
    stats.dropped_no_target += 1
    return None
  return e


def _shows_progress(progress: bool | None, records: int) -> bool:
  """progress: True or False as given; None (auto) for PROGRESS_MIN_RECORDS records and up."""
  return progress if progress is not None else records >= PROGRESS_MIN_RECORDS


def _progress(items: Sequence, progress: bool | None, desc: str):
  if not _shows_progress(progress, len(items)):
    return items
  from tqdm import tqdm
  return tqdm(items, desc=desc, unit="rec", mininterval=2.0)


def _mention_column(message: str, field_map: Mapping[str, str] | None) -> str:
  """A mapped field's error also names the source column the user knows it by."""
  for field, column in (field_map or {}).items():
    if f"'{field}'" in message:
      return f"{message} (source column {column!r} via the field map)"
  return message


def tokenizing_processes(num_proc: int, records: int) -> int:
  """data.num_proc resolved: 0 (auto) is one process per RECORDS_PER_PROCESS records, at most the
  machine's cores and MAX_AUTO_PROCESSES; 1 tokenizes in this process."""
  if num_proc:
    return num_proc
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(cores, MAX_AUTO_PROCESSES, records // RECORDS_PER_PROCESS))


def encode_records(records: Records, fmt: str, tokenizer, seq_len: int, *, template: str = "alpaca",
                   train_on_prompt: bool = False, add_eos: bool = False, truncation: str = "truncate",
                   lenient: bool = False, field_map: Mapping[str, str] | None = None,
                   progress: bool | None = None, num_proc: int = 0) -> tuple[list[Any], DataStats]:
  """Encoded records (pairs of Encoded for fmt="preference") that fit seq_len, and the counts.

  With `num_proc` > 1 (see `tokenizing_processes`) contiguous chunks of the records are encoded in
  that many fresh processes, each with a copy of the tokenizer; the result, the counts and the
  error raised (the first bad record's) are the same as in one process."""
  if fmt not in formats.FORMATS:
    raise DataError(f"data.format={fmt!r} must be one of {'|'.join(formats.FORMATS)}")
  if truncation not in TRUNCATION:
    raise DataError(f"data.truncation={truncation!r} must be one of {'|'.join(TRUNCATION)}")
  stats = DataStats(records=len(records) + len(records.errors), skipped=len(records.errors),
                    errors=records.errors[:MAX_ERRORS_KEPT])
  items = list(zip(records.records, records.origins))
  options = dict(fmt=fmt, seq_len=seq_len, template=template, train_on_prompt=train_on_prompt, add_eos=add_eos,
                 truncation=truncation, lenient=lenient, field_map=field_map)
  parts, stats.processes = encode_in_parts(_encode_chunk, items, tokenizer, options, num_proc, progress)
  out = []
  for encoded, part_stats in parts:
    out += encoded
    stats.add(part_stats)
  return out, stats


def encode_in_parts(encode_chunk, items: list, tokenizer, options: Mapping[str, Any], num_proc: int,
                    progress: bool | None) -> tuple[list, int]:
  """([encode_chunk(part, tokenizer, **options) for each contiguous part of items, in order], the
  processes that ran them). `encode_chunk` is a module-level function (a fresh process imports it by
  name); with num_proc resolving to 1 (see `tokenizing_processes`), or a tokenizer that cannot be
  pickled, one part in this process. The first failing part's error is raised."""
  processes = tokenizing_processes(num_proc, len(items))
  pickled = _pickled(tokenizer) if processes > 1 else None
  if pickled is None:
    return [encode_chunk(_progress(items, progress, "tokenizing"), tokenizer, **options)], 1
  return _encode_in_processes(encode_chunk, items, pickled, processes, options, progress), processes


def encode_unpacked(records: Records, fmt: str, tokenizer, *, template: str = "alpaca", max_len: int = 0,
                    num_proc: int = 0, progress: bool | None = None) -> tuple[list[Encoded], int]:
  """(every record encoded whole, in order, cut to max_len tokens when > 0; how many were cut), for
  evaluation: nothing is dropped or packed, and the first bad record raises DataError("FILE:LINE: ...")."""
  parts, _ = encode_in_parts(_encode_unpacked_chunk, list(zip(records.records, records.origins)), tokenizer,
                             dict(fmt=fmt, template=template, max_len=max_len), num_proc, progress)
  return [e for encoded, _ in parts for e in encoded], sum(truncated for _, truncated in parts)


def _encode_unpacked_chunk(items, tokenizer, *, fmt, template, max_len) -> tuple[list[Encoded], int]:
  out, truncated = [], 0
  for record, origin in items:
    try:
      e = formats.encode_record(record, fmt, tokenizer, template=template)
    except RecordError as err:
      raise DataError(f"{origin}: {err}") from None
    if max_len and len(e.ids) > max_len:
      e, truncated = Encoded(e.ids[:max_len], e.loss_mask[:max_len]), truncated + 1
    out.append(e)
  return out, truncated


def _encode_chunk(items, tokenizer, *, fmt, seq_len, template, train_on_prompt, add_eos, truncation, lenient,
                  field_map) -> tuple[list[Any], DataStats]:
  """(encoded records that fit, their counts) for (record, origin) `items`, in order."""
  stats, out = DataStats(), []
  for record, origin in items:
    try:
      if fmt == "preference":
        encoded = formats.encode_preference(record, tokenizer, template=template)
      else:
        encoded = formats.encode_record(record, fmt, tokenizer, template=template,
                                        train_on_prompt=train_on_prompt, add_eos=add_eos)
    except RecordError as e:
      message = f"{origin}: {_mention_column(str(e), field_map)}"
      if not lenient:
        raise DataError(message) from None
      stats.skipped += 1
      if len(stats.errors) < MAX_ERRORS_KEPT:
        stats.errors.append(message)
      continue
    if fmt == "preference":
      chosen, rejected = (_fit(e, seq_len, truncation, stats) for e in encoded)
      if chosen is not None and rejected is not None:
        out.append((chosen, rejected))
    else:
      fitted = _fit(encoded, seq_len, truncation, stats)
      if fitted is not None:
        out.append(fitted)
  stats.kept = len(out)
  return out, stats


_worker_tokenizer = None  # a tokenizing process's copy of the tokenizer


def _start_worker(pickled_tokenizer: bytes) -> None:
  global _worker_tokenizer
  _worker_tokenizer = pickle.loads(pickled_tokenizer)


def _encode_in_worker(encode_chunk, items, options):
  return encode_chunk(items, _worker_tokenizer, **options)


def _pickled(tokenizer) -> bytes | None:
  """The tokenizer for the tokenizing processes, or None (with a warning) when it cannot be pickled:
  then this process tokenizes."""
  try:
    return pickle.dumps(tokenizer)
  except Exception as e:  # a tokenizer class of someone's own, holding a lock or a handle
    print(f"warning: data.num_proc: the tokenizer cannot be copied to other processes ({type(e).__name__}: "
          f"{e}); tokenizing in this one", flush=True)
    return None


def _encode_in_processes(encode_chunk, items, pickled_tokenizer: bytes, processes: int, options,
                         progress: bool | None):
  """`encode_chunk` over 4 contiguous chunks per process, in fresh ("spawn") processes: forking
  one that runs JAX's threads can deadlock. The chunks' results in order; the first chunk's error."""
  size = -(-len(items) // (4 * processes))
  chunks = [items[i:i + size] for i in range(0, len(items), size)]
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                                              initargs=(pickled_tokenizer,)) as pool:
    futures = [pool.submit(_encode_in_worker, encode_chunk, chunk, options) for chunk in chunks]
    bar = None
    if _shows_progress(progress, len(items)):
      from tqdm import tqdm
      bar = tqdm(total=len(items), desc=f"tokenizing ({processes} processes)", unit="rec", mininterval=2.0)
    try:
      parts = []
      for chunk, future in zip(chunks, futures):
        parts.append(future.result())  # raises the first failing chunk's DataError
        if bar is not None:
          bar.update(len(chunk))
      return parts
    finally:
      if bar is not None:
        bar.close()
      pool.shutdown(cancel_futures=True)


def build_dataset(source: str | Sequence[str] | Records, fmt: str, tokenizer, seq_len: int, *,
                  field_map: Mapping[str, str] | None = None, template: str = "alpaca",
                  train_on_prompt: bool = False, add_eos: bool = False, packing: bool = True,
                  truncation: str = "truncate", lenient: bool = False,
                  progress: bool | None = None, num_proc: int = 0) -> PackedDataset:
  """Read (unless given Records), encode and pack; preference pairs are one pair a row, never packed."""
  records = source if isinstance(source, Records) else read_records(source, field_map=field_map,
                                                                   lenient=lenient)
  encoded, stats = encode_records(records, fmt, tokenizer, seq_len, template=template,
                                  train_on_prompt=train_on_prompt, add_eos=add_eos,
                                  truncation=truncation, lenient=lenient, field_map=field_map,
                                  progress=progress, num_proc=num_proc)
  if not encoded:
    raise DataError(f"{_describe(source)}: no usable records ({stats.summary()})")
  if fmt == "preference":
    arrays = {}
    for side, pairs in (("chosen", [c for c, _ in encoded]), ("rejected", [r for _, r in encoded])):
      arrays.update({f"{side}_{k}": v for k, v in pack(pairs, seq_len, False).items()})
  else:
    arrays = pack(encoded, seq_len, packing)
  weights = [v for k, v in arrays.items() if k.endswith("weights")]
  segments = [v for k, v in arrays.items() if k.endswith("segment_ids")]
  stats.rows = len(segments[0])
  stats.rows_tokens = sum(s.size for s in segments)
  stats.tokens = int(sum(np.count_nonzero(s) for s in segments))
  stats.target_tokens = int(sum(w.sum() for w in weights))
  return PackedDataset(arrays, seq_len, stats)


def _describe(source) -> str:
  if isinstance(source, Records):
    return source.origins[0].rsplit(":", 1)[0] if source.origins else "data"
  return source if isinstance(source, str) else ", ".join(source)


def _not_empty(records: Records, source) -> Records:
  """`records`, or a DataError naming the source (an empty file, or every line skipped as malformed)."""
  if not len(records):
    skipped = f" ({len(records.errors)} malformed skipped)" if records.errors else ""
    raise DataError(f"{_describe(source)}: no records{skipped}")
  return records


def load_splits(train: str | Sequence[str], evaluation: str | Sequence[str] | None = None, *,
                eval_fraction: float = 0.0, seed: int = 0, field_map: Mapping[str, str] | None = None,
                lenient: bool = False) -> tuple[Records, Records | None]:
  """(train, eval) records: eval from its own source, or a seeded held-out fraction, or None."""
  records = _not_empty(read_records(train, field_map=field_map, lenient=lenient), train)
  if evaluation:
    if eval_fraction:
      raise DataError("give data.eval or data.eval_fraction, not both")
    return records, _not_empty(read_records(evaluation, field_map=field_map, lenient=lenient), evaluation)
  if eval_fraction:
    return split_records(records, eval_fraction, seed)
  return records, None


class BatchIterator:
  """Infinite, seeded, checkpointable global batches; each host gets only its rows.

  The stream is epoch 0's permutation of the rows, then epoch 1's, ... (numpy Generator seeded by
  (seed, epoch)); global batch k is stream rows [k*B, (k+1)*B), so no row is skipped or repeated
  within an epoch even when B does not divide the row count. Host p of P gets rows
  [p*B/P, (p+1)*B/P) of each global batch.
  """

  def __init__(self, dataset: PackedDataset, global_batch: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if global_batch <= 0 or global_batch % process_count:
      raise DataError(f"train.batch_size={global_batch} must be a positive multiple of the "
                      f"{process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}")
    self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
    per_host = global_batch // process_count
    self._rows = slice(process_index * per_host, (process_index + 1) * per_host)
    self.epoch, self.index = 0, 0
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
      self._perm_epoch = epoch
    return self._perm

  def _take(self, count: int) -> np.ndarray:
    """The next `count` stream rows, advancing across epochs."""
    parts = []
    while count:
      perm = self._permutation(self.epoch)
      part = perm[self.index:self.index + count]
      parts.append(part)
      count -= len(part)
      self.index += len(part)
      if self.index == len(perm):
        self.epoch, self.index = self.epoch + 1, 0
    return np.concatenate(parts)

  def next(self) -> dict[str, np.ndarray]:
    rows = self._take(self.global_batch)[self._rows]
    return {k: v[rows] for k, v in self.dataset.arrays.items()}

  __next__ = next

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "rows": len(self.dataset)}

  def restore(self, state: Mapping[str, int]) -> None:
    if int(state["seed"]) != self.seed or int(state["rows"]) != len(self.dataset):
      raise DataError(f"the data position in the checkpoint (seed {state['seed']}, {state['rows']} rows) "
                      f"does not match this data (seed {self.seed}, {len(self.dataset)} rows)")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(dataset: PackedDataset, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every row once, in order; the last global batch is filled with all-padding rows (weight 0)."""
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(f"eval batch size {batch_size} must be a positive multiple of the "
                    f"{process_count} processes")
  per_host = batch_size // process_count
  n = len(dataset)
  for start in range(0, n, batch_size):
    lo = start + process_index * per_host
    batch = {}
    for k, v in dataset.arrays.items():
      part = v[lo:min(lo + per_host, n)]
      pad = np.zeros((per_host - len(part),) + v.shape[1:], v.dtype)
      batch[k] = np.concatenate([part, pad]) if len(pad) else part
    yield batch
