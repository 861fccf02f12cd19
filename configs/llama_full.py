"""Full fine-tuning of a Llama-family model on a TPU slice: fp32 master weights, bf16 compute, FSDP.

  python scripts/train.py --config configs/llama_full.py --workdir gs://BUCKET/runs/llama-full \
      --config.model.path=/path/to/Llama-3.2-1B --config.data.train=data.jsonl
"""

from configs import llama_lora


def get_config():
  c = llama_lora.get_config()
  c.peft.method = "full"
  c.precision.param_dtype = "float32"  # AdamW updates need fp32 master weights
  c.optimizer.learning_rate = 1e-5
  c.optimizer.weight_decay = 0.01
  return c
