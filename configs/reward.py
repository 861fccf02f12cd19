"""A reward model (SmolLM2-135M-Instruct + LoRA + a scalar head on the last token) trained with the
Bradley-Terry loss on the bundled preference set; logs pairwise accuracy (eval_reward_accuracy held out).

  python scripts/train.py --config configs/reward.py --workdir /tmp/reward

The workdir can then score GRPO completions: --config.grpo.reward_model=/tmp/reward (configs/grpo.py).
"""

from configs.dpo import get_config as dpo_config


def get_config():
  c = dpo_config()
  c.objective = "reward"
  c.optimizer.learning_rate = 1e-3
  return c
