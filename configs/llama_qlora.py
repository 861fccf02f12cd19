"""QLoRA on a Llama-family model: LoRA on a base held in 4-bit NF4 (e.g. Llama-3.1-70B on a v6e-8).

  python scripts/train.py --config configs/llama_qlora.py --workdir gs://BUCKET/runs/llama-qlora \
      --config.model.path=/path/to/Meta-Llama-3.1-70B-Instruct --config.data.train=data.jsonl

`python -m jaxtune.planner --preset llama3-70b --rank 16 --slice v6e-8 --batch 8 --seq 4096
--quantize nf4` gives 17.4 GiB a chip for this run (29.6 GiB with a bfloat16 base); see docs/qlora.md.
"""

from configs.llama_lora import get_config as llama_lora_config


def get_config():
  c = llama_lora_config()
  c.model.quantize = "nf4"
  c.train.batch_size = 8
  c.data.seq_len = 4096
  return c
