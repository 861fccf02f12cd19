"""GRPO with LoRA on SmolLM2-135M-Instruct: 4 sampled answers per arithmetic prompt of the bundled set,
rewarded 1 when the answer contains the right sum (a Python function named in the config), KL to
the adapter-off reference. CPU, minutes.

  python scripts/train.py --config configs/grpo.py --workdir /tmp/grpo
  python scripts/train.py --config configs/grpo.py --workdir /tmp/grpo_rm \
      --config.grpo.reward_fn= --config.grpo.reward_model=/tmp/reward   # a trained reward model instead

metrics.jsonl rows carry reward_mean, reward_std, kl, clip_fraction, completion_length (and
eval_reward_mean: greedy answers to the eval prompts).
"""

from configs.dpo import get_config as dpo_config


def get_config():
  c = dpo_config()  # same model, LoRA and data (GRPO reads only each record's prompt)
  c.objective = "grpo"
  c.data.seq_len = 96
  c.train.steps = 20
  c.train.batch_size = 8  # completions per step: 2 prompts x grpo.group_size
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_batches = 1
  c.optimizer.learning_rate = 5e-4
  c.grpo.group_size = 4
  c.grpo.max_new_tokens = 24
  c.grpo.temperature = 1.0
  c.grpo.reward_fn = "jaxtune.objectives.toy_rewards:right_sum"
  c.grpo.kl_coef = 0.04
  return c
