"""A tiny CPU config: LoRA on a small model, a few steps. Seconds on a laptop CPU.

  python scripts/make_tiny_model.py --out /tmp/tiny_llama
  python scripts/train.py --config configs/tiny.py --workdir /tmp/tiny_run \
      --config.model.path=/tmp/tiny_llama
"""

import os

from configs.base import get_base_config

_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxtune", "data", "demo"))


def get_config():
  c = get_base_config()
  c.peft.method = "lora"
  c.peft.lora.rank = 4
  c.data.train = os.path.join(_DATA, "train.jsonl")
  c.data.eval = os.path.join(_DATA, "eval.jsonl")
  c.data.format = "instruction"
  c.data.seq_len = 128
  c.train.steps = 20
  c.train.batch_size = 4
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.eval_batches = 2
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 2
  return c
