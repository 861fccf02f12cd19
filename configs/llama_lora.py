"""LoRA on a Llama-family model (e.g. Llama-3.1-8B-Instruct) on a TPU slice or GPU, bf16.

  python scripts/train.py --config configs/llama_lora.py --workdir gs://BUCKET/runs/llama-lora \
      --config.model.path=/path/to/Meta-Llama-3.1-8B-Instruct --config.data.train=data.jsonl

On a v5p-8 (4 chips) the defaults shard weights over fsdp; see tpu/README.md and docs/scaling.md.
"""

from configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.peft.method = "lora"
  c.peft.lora.rank = 16
  c.peft.lora.alpha = 32.0
  c.peft.lora.dropout = 0.05
  c.data.format = "instruction"
  c.data.seq_len = 2048
  c.data.packing = True
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.remat = True
  c.optimizer.learning_rate = 2e-4
  c.optimizer.warmup_steps = 50
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.precision.param_dtype = "bfloat16"
  c.precision.compute_dtype = "bfloat16"
  return c
