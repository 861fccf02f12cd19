"""Encoded records -> rows of seq_len in the batch contract, packed (several records a row) or not.

A record of n tokens fills n slots of a row: inputs = its ids, targets[j] = ids[j + 1] with
weights[j] = loss_mask[j + 1], and weight 0 at its last token (nothing of it follows). Packed
records get segment ids 1..k and positions from 0 each, so attention never crosses records;
padding has segment 0, weight 0, target 0.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Sequence

import numpy as np

from jaxtune.data.formats import Encoded

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """Best-fit packing: each record (in order) goes to the open row with the least room that fits it.

  Returns the record indices of every row; rows keep their records in input order.
  """
  rows: list[list[int]] = []
  room: list[tuple[int, int]] = []  # sorted (free slots, row index) of rows that are not full
  for i, n in enumerate(lengths):
    if not 0 < n <= seq_len:
      raise ValueError(f"record {i} has {n} tokens; rows hold 1..{seq_len}")
    k = bisect.bisect_left(room, (n, -1))
    if k == len(room):
      rows.append([i])
      free, row = seq_len - n, len(rows) - 1
    else:
      free, row = room.pop(k)
      rows[row].append(i)
      free -= n
    if free > 0:
      bisect.insort(room, (free, row))
  return rows


def rows_to_arrays(encoded: Sequence[Encoded], rows: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
  """The batch-contract arrays (len(rows) x seq_len) of rows given as record indices."""
  order = [i for row in rows for i in row]  # records in row-major slot order
  lengths = np.array([len(encoded[i].ids) for i in order], np.int64)
  row_of = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
  segment_of = np.concatenate([np.arange(1, len(row) + 1) for row in rows]) if rows else row_of
  first = np.cumsum(lengths) - lengths  # each record's first token in the flat token stream
  total = int(lengths.sum())
  ids = np.fromiter(itertools.chain.from_iterable(encoded[i].ids for i in order), np.int32, total)
  mask = np.fromiter(itertools.chain.from_iterable(encoded[i].loss_mask for i in order), np.float32, total)
  token_record = np.repeat(np.arange(len(order)), lengths)
  pos = np.arange(total) - first[token_record]
  # a record's first slot in its row: the lengths of the records before it in the same row
  row_start = first - first[np.searchsorted(row_of, row_of)]
  r, c = row_of[token_record], row_start[token_record] + pos
  if total and c.max() >= seq_len:
    raise ValueError(f"a row holds more than seq_len={seq_len} tokens")
  has_next = pos < lengths[token_record] - 1  # the last token of a record predicts nothing
  nxt = np.minimum(np.arange(total) + 1, max(total - 1, 0))
  shape = (len(rows), seq_len)
  out = {k: np.zeros(shape, np.float32 if k == "weights" else np.int32) for k in BATCH_KEYS}
  out["inputs"][r, c] = ids
  out["targets"][r, c] = np.where(has_next, ids[nxt], 0)
  out["weights"][r, c] = np.where(has_next, mask[nxt], 0.0)
  out["positions"][r, c] = pos
  out["segment_ids"][r, c] = segment_of[token_record]
  return out


def pack(encoded: Sequence[Encoded], seq_len: int, packing: bool = True) -> dict[str, np.ndarray]:
  """Rows of every record (each already at most seq_len tokens): packed, or one record a row."""
  if packing:
    rows = pack_rows([len(e.ids) for e in encoded], seq_len)
  else:
    rows = [[i] for i in range(len(encoded))]
  return rows_to_arrays(encoded, rows, seq_len)
