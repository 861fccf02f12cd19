"""The shared base config: every key of the contract, with defaults. Other configs start from it.

Runs only with a model and data given (both are empty here); see tiny.py, llama_lora.py, forkme.py:

  python scripts/train.py --config configs/base.py --workdir DIR \
      --config.model.path=/path/to/hf_folder --config.data.train=data.jsonl
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # Hugging Face folder or .gguf file
  c.model.tokenizer = ""  # "" = the tokenizer that comes with model.path
  # training attention kernel: auto (cuDNN flash attention on a GPU in bf16/fp16, else blocked) |
  # blocked (jaxtune's, any device) | xla | cudnn (jax.nn.dot_product_attention's) |
  # splash (Pallas' TPU flash kernel; rows a multiple of 128 tokens, no prefix or sliding window)
  c.model.attention = "auto"
  # the decoder layers in a training/eval pass: auto (unrolled on a GPU, else scan) | scan (one
  # compiled layer in a loop: the least compile time, TPU's usual form) | unrolled (straight-line
  # code: no per-layer copies of the saved activations into stacked buffers; longer compiles)
  c.model.layer_loop = "auto"
  # mixtures of experts (Mixtral, Qwen3-MoE): auto (dense on CPU, else ragged) | dense (every expert
  # on every token, weighted) | ragged (tokens grouped by expert, jax.lax.ragged_dot) -- models/moe.py
  c.model.moe_dispatch = "auto"
  # "" | nf4 | fp4 | nf4_double_quant | fp4_double_quant: store the frozen base's decoder-layer kernels
  # in 4 bits (QLoRA; the same codes as bitsandbytes' load_in_4bit with bnb_4bit_quant_type nf4 or fp4;
  # *_double_quant also codes their block scales in 8 bits, bnb_4bit_use_double_quant), dequantized as
  # each layer runs. PEFT methods only.
  c.model.quantize = ""

  c.objective = "lm"  # lm | dpo | reward | grpo

  c.peft = ml_collections.ConfigDict()
  c.peft.method = "lora"  # full | lora | dora | ia3 | adapter | prefix | prompt
  c.peft.lora = ml_collections.ConfigDict()
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0
  c.peft.lora.dropout = 0.0
  c.peft.lora.targets = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  c.peft.lora.use_rslora = False
  c.peft.lora.use_dora = False  # DoRA: also learn each output's magnitude (peft's use_dora)
  # mixtures of experts: LoRA on every expert of the matrices this regex fullmatches, gate_up_proj and/or
  # down_proj (peft's target_parameters=["mlp.experts.gate_up_proj", ...]); "" = experts stay frozen
  c.peft.lora.expert_targets = ""
  c.peft.ia3 = ml_collections.ConfigDict()
  c.peft.ia3.targets = r".*(k_proj|v_proj|down_proj)"  # layers rescaled by a learned vector
  c.peft.ia3.feedforward = r".*down_proj"  # of those, the ones whose input (not output) is rescaled
  c.peft.adapter = ml_collections.ConfigDict()
  c.peft.adapter.size = 64
  c.peft.adapter.placement = "attn,mlp"  # where adapters go: attn, mlp or both
  c.peft.prefix = ml_collections.ConfigDict()
  c.peft.prefix.length = 16
  c.peft.prefix.reparam_hidden = 0  # > 0: train through an MLP reparametrisation, folded away after
  c.peft.prompt = ml_collections.ConfigDict()
  c.peft.prompt.length = 16  # prompt tuning: trainable input embeddings before every sequence

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # JSONL/JSON/CSV/parquet path, a folder, or a datasets name
  c.data.eval = ""  # "" = hold out data.eval_fraction of data.train
  c.data.eval_fraction = 0.0
  c.data.format = "instruction"  # text | instruction | chat | preference
  c.data.template = "auto"  # instruction prompt: auto (chat template if the tokenizer has one) | alpaca | chat
  c.data.field_map = ""  # rename source columns: "instruction=question,output=answer"
  c.data.train_on_prompt = False
  c.data.seq_len = 512
  c.data.packing = True
  c.data.truncation = "truncate"  # truncate | drop (over-long records; always counted and reported)
  c.data.lenient = False  # True: skip and count malformed records instead of stopping
  c.data.num_proc = 0  # processes that tokenize: 0 = auto (one per 5,000 records, up to the cores and 32), 1 = none

  c.train = ml_collections.ConfigDict()
  # mixtures of experts: the loss adds this x the router load-balancing loss (transformers'
  # router_aux_loss_coef with output_router_logits=True; Mixtral's configs say 0.02); 0 = off
  c.train.router_aux_loss_coef = 0.0
  c.train.steps = 1000
  c.train.batch_size = 8  # global, in sequences
  c.train.grad_accum = 1
  c.train.seed = 0
  c.train.log_every = 10
  c.train.eval_every = 0  # 0 = only at the end (when there is eval data)
  c.train.eval_batches = 0  # 0 = the whole eval set
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.remat = False
  # With remat, what each layer keeps: nothing (least memory) | dots (matmul outputs; less recompute)
  c.train.remat_policy = "nothing"
  # JAX's persistent compilation cache (local or gs://; "" = off): a rerun after a preemption loads
  # the step programs instead of compiling them (see tpu/README.md)
  c.train.compilation_cache = ""
  # jax.profiler trace of this many steps (0 = off) from profile_start_step, on process 0, into
  # WORKDIR/profile (TensorBoard/XProf, Perfetto), with the step's top ops in profile/top_ops.txt
  c.train.profile_steps = 0
  c.train.profile_start_step = 3  # after the first step's compile
  c.train.skip_nonfinite = False  # True: a step with a non-finite loss/gradient is not applied (counted)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | adafactor | sgd | muon (full fine-tuning: Muon on the layers' matrices, AdamW on the rest)
  c.optimizer.muon_momentum = 0.95
  c.optimizer.learning_rate = 1e-4
  c.optimizer.schedule = "cosine"  # constant | linear | cosine | wsd (warmup, stable, decay)
  c.optimizer.warmup_steps = 0
  # wsd: the learning rate decays to 0 over the last decay_steps steps (0 = the last 10% of
  # train.steps), shaped linear | cosine | 1-sqrt (transformers' get_wsd_schedule decay_type)
  c.optimizer.decay_steps = 0
  c.optimizer.decay_shape = "cosine"
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0  # 0 = off
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # LoRA+ (Hayou et al. 2024; peft's create_loraplus_optimizer loraplus_lr_ratio): LoRA B matrices
  # learn at learning_rate x this (the paper suggests 16); 1 = plain LoRA
  c.optimizer.lora_plus_ratio = 1.0

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1
  # sigmoid | robust | hinge | ipo | nca_pair | sppo_hard | apo_zero | apo_down (TRL's DPO loss types) |
  # simpo | orpo; simpo and orpo need no reference (the policy's average log-probs; orpo adds the
  # chosen responses' NLL, with beta as ORPO's lambda)
  c.dpo.loss_type = "sigmoid"
  c.dpo.rpo_alpha = 0.0  # > 0: + this x the chosen responses' NLL (RPO, Pang et al. 2024; TRL's rpo_alpha)
  c.dpo.simpo_gamma = 0.5  # SimPO's target margin gamma (TRL's CPOConfig.simpo_gamma); simpo only
  c.dpo.label_smoothing = 0.0
  c.dpo.precompute_reference = False  # True: reference log-probs once before training, also for PEFT
  #                                     (full fine-tuning always precomputes them)

  c.grpo = ml_collections.ConfigDict()  # objective=grpo; train.batch_size counts completions
  c.grpo.group_size = 4  # completions sampled per prompt (divides train.batch_size)
  c.grpo.max_new_tokens = 32
  c.grpo.temperature = 1.0
  c.grpo.top_p = 1.0
  c.grpo.reward_fn = ""  # "module:function", called as fn(prompts, completions) -> list of floats
  c.grpo.reward_model = ""  # or an objective=reward train.py workdir, or a HF *ForSequenceClassification folder
  # beta of the k3 KL penalty to the reference (adapter off / initial params); 0 = no reference pass
  c.grpo.kl_coef = 0.04
  c.grpo.clip_eps = 0.2  # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]
  c.grpo.clip_eps_high = 0.0  # 0 = clip_eps; DAPO's clip-higher uses 0.28 (TRL's epsilon_high)
  # how per-token losses average: grpo (per completion, then over completions) | dapo (over all
  # completion tokens) | dr_grpo (sum / (completions x max_new_tokens)) -- TRL's loss_type
  c.grpo.loss_type = "grpo"
  c.grpo.scale_rewards = "group"  # advantages divided by the group's std | batch's std | none (Dr. GRPO)
  # the policy ratio of each token: its own (token) | its completion's, exp(mean token log-ratio) (sequence: GSPO)
  c.grpo.importance_sampling_level = "token"
  c.grpo.updates_per_batch = 1  # optimizer steps on each batch of completions (> 1: clipping matters)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1  # MoE: experts split over it; otherwise one more data axis
  c.mesh.dcn_data = 1  # multi-slice: mesh.data split into this many slices (groups)

  c.precision = ml_collections.ConfigDict()
  c.precision.param_dtype = "float32"
  c.precision.compute_dtype = "float32"
  return c


def get_config() -> ml_collections.ConfigDict:
  """The base config itself, so that every configs/*.py has get_config()."""
  return get_base_config()
