"""Fork me: every knob of a jaxtune run, annotated. Copy this file and edit it.

  python scripts/train.py --config configs/forkme.py --workdir /tmp/forkme \
      --config.model.path=/path/to/hf_folder_or_model.gguf --config.data.train=my_data.jsonl

Any key can also be overridden on the command line: --config.peft.lora.rank=32
An unknown key or an impossible value stops the run before any work, naming the key.
"""

from configs.base import get_base_config


def get_config():
  c = get_base_config()
  # The model: a Hugging Face folder (config.json + safetensors + tokenizer) or a .gguf file
  # (dequantized on load). model.tokenizer overrides where the tokenizer comes from.
  c.model.path = ""
  # QLoRA: "nf4" holds the frozen base's layer kernels in 4 bits (bitsandbytes' NF4 codes), about a
  # quarter of bfloat16's memory; any method but full trains on it.
  c.model.quantize = ""
  # What trains. full: every weight. lora: low-rank A/B in the layers matched by the regex
  # (paths keep HF names: layers/self_attn/q_proj, layers/mlp/down_proj...). dora: LoRA plus a
  # learned magnitude per output (same as lora with peft.lora.use_dora = True). ia3: learned
  # scales on the outputs of peft.ia3.targets (the inputs of peft.ia3.feedforward). adapter: Houlsby
  # bottlenecks after attention and/or MLP. prefix: trainable key/value prefixes per layer.
  # prompt: trainable input embeddings before every sequence (prompt tuning).
  c.peft.method = "lora"
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with use_rslora)
  c.peft.lora.targets = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  c.peft.lora.use_dora = False  # DoRA: also learn each output's magnitude (peft's use_dora)
  c.peft.lora.expert_targets = ""  # MoE models: "gate_up_proj|down_proj" puts LoRA on every expert too
  # The data: JSONL/JSON/CSV/parquet, a folder, or a datasets name. Formats: text, instruction
  # ({"instruction", "context"?, "output"}), chat ({"messages": [...]}), preference.
  c.data.train = ""
  c.data.eval = ""  # or data.eval_fraction = 0.05 to hold out part of data.train
  c.data.format = "instruction"
  c.data.seq_len = 1024
  c.data.packing = True  # several records a row; attention never crosses records
  # The loop. batch_size is global, in sequences; grad_accum splits it into micro-batches.
  c.train.steps = 1000
  c.train.batch_size = 16
  c.train.grad_accum = 1
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.remat = False  # True trades compute for activation memory
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 20
  c.optimizer.lora_plus_ratio = 1.0  # LoRA+: LoRA B matrices learn at learning_rate x this (16 in its paper)
  # Devices: data x fsdp x tensor must equal the device count; -1 fills.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1  # MoE: experts split over it; otherwise one more data axis
  c.mesh.dcn_data = 1  # multi-slice: mesh.data split into this many slices (groups)
  c.precision.param_dtype = "float32"
  c.precision.compute_dtype = "float32"  # bfloat16 on TPU/GPU
  return c
