"""DPO with LoRA on SmolLM2-135M-Instruct (the bundled GGUF) over the bundled preference set (polite,
correct answers preferred); the reference is the same model with the adapter switched off. CPU, minutes.

  python scripts/train.py --config configs/dpo.py --workdir /tmp/dpo
  python scripts/train.py --config configs/dpo.py --workdir /tmp/dpo_full --config.peft.method=full

metrics.jsonl rows carry rewards_chosen, rewards_rejected, reward_accuracy, reward_margin (and eval_*).
"""

import os

from configs.base import get_base_config
from configs.demo import smollm2_gguf

PREFERENCE_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxtune",
                                                "data", "preference_demo"))


def get_config():
  c = get_base_config()
  c.objective = "dpo"
  c.model.path = smollm2_gguf()
  c.peft.method = "lora"
  c.data.train = os.path.join(PREFERENCE_DATA, "train.jsonl")
  c.data.eval = os.path.join(PREFERENCE_DATA, "eval.jsonl")
  c.data.format = "preference"
  c.data.template = "chat"
  c.data.seq_len = 96
  c.train.steps = 20
  c.train.batch_size = 4  # pairs
  c.train.log_every = 2
  c.train.eval_every = 10
  c.train.eval_batches = 4
  c.train.checkpoint_every = 10
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 2
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  return c
