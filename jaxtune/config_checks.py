"""Config validation: every impossible value is reported as one line naming its key, before any work."""

from __future__ import annotations

import re

import ml_collections

from jaxtune.models import attention, llama, moe, quantization
from jaxtune.peft import lora
from jaxtune.peft.partition import LORA_METHODS, METHODS

OBJECTIVES = ("lm", "dpo", "reward", "grpo")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = tuple(llama.REMAT_POLICIES)
# objectives/dpo.py's dpo_losses says what each is
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "simpo", "orpo")
DPO_REFERENCE_FREE = ("simpo", "orpo")  # compare the policy's own length-normalised log-probs: no reference pass
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")  # objectives/grpo.py's grpo_loss_sums says what each is
GRPO_SCALE_REWARDS = ("group", "batch", "none")  # the std dividing the advantages (grpo.advantages)
GRPO_IMPORTANCE_SAMPLING = ("token", "sequence")  # grpo.importance_sampling_level (sequence: GSPO)


class ConfigError(ValueError):
  """A config value is impossible; str() is `config.KEY: why`."""

  def __init__(self, key: str, why: str):
    super().__init__(f"config.{key}: {why}")
    self.key = key


def _choice(c, key, options):
  value = _get(c, key)
  if value not in options:
    shown = (repr(o) if o == "" else str(o) for o in options)
    raise ConfigError(key, f"{value!r} is not one of {' | '.join(shown)}")


def _positive(c, key, allow_zero=False):
  value = _get(c, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(key, f"must be a number, got {type(value).__name__}")
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _fraction(c, key):
  if not 0 <= _get(c, key) < 1:
    raise ConfigError(key, f"must be in [0, 1), got {_get(c, key)}")


def _get(c, key):
  node = c
  for part in key.split("."):
    node = node[part]
  return node


def check_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first impossible value found."""
  if not c.model.path:
    raise ConfigError("model.path", "is empty: give a Hugging Face folder or a .gguf file")
  _choice(c, "objective", OBJECTIVES)
  _choice(c, "peft.method", METHODS)
  _positive(c, "peft.lora.rank")
  _positive(c, "peft.lora.alpha")
  _fraction(c, "peft.lora.dropout")
  for key in ("peft.lora.targets", "peft.lora.expert_targets", "peft.ia3.targets", "peft.ia3.feedforward"):
    try:
      re.compile(_get(c, key))
    except re.error as e:
      raise ConfigError(key, f"invalid regex: {e}") from None
  for method, key in ((LORA_METHODS, "peft.lora.targets"), (("ia3",), "peft.ia3.targets")):
    if c.peft.method in method and lora.targets_lm_head(_get(c, key)):
      raise ConfigError(key, f"{_get(c, key)!r} matches lm_head: {c.peft.method} goes in the decoder "
                        "layers' linear layers only (e.g. '.*(q_proj|v_proj)')")
  if c.peft.method in LORA_METHODS and c.peft.lora.expert_targets:
    from jaxtune.peft import expert_lora
    if not expert_lora.targeted(c.peft.lora.expert_targets):
      raise ConfigError("peft.lora.expert_targets", f"{c.peft.lora.expert_targets!r} matches neither gate_up_proj "
                        "nor down_proj")
    if c.peft.method == "dora" or c.peft.lora.use_dora:
      raise ConfigError("peft.lora.expert_targets", "DoRA on experts is not supported (nor in peft): use lora")
    if c.peft.lora.dropout:
      raise ConfigError("peft.lora.dropout", "must be 0 with peft.lora.expert_targets (peft's LoRA on expert "
                        "matrices has no dropout)")
  _positive(c, "peft.adapter.size")
  placement = [p for p in c.peft.adapter.placement.split(",") if p]
  if not placement or any(p not in ("attn", "mlp") for p in placement):
    raise ConfigError("peft.adapter.placement", f"{c.peft.adapter.placement!r}: use attn, mlp or attn,mlp")
  _positive(c, "peft.prefix.length")
  _positive(c, "peft.prompt.length")
  _positive(c, "peft.prefix.reparam_hidden", allow_zero=True)
  if not c.data.train:
    raise ConfigError("data.train", "is empty: give a data file, folder or datasets name")
  _choice(c, "data.format", ("text", "instruction", "chat", "preference"))
  _choice(c, "data.template", ("auto", "alpaca", "chat"))
  _choice(c, "data.truncation", ("truncate", "drop"))
  _positive(c, "data.seq_len")
  if c.data.seq_len < 2:
    raise ConfigError("data.seq_len", "must be >= 2")
  _fraction(c, "data.eval_fraction")
  _positive(c, "data.num_proc", allow_zero=True)
  for key in ("train.steps", "train.batch_size", "train.grad_accum", "train.log_every",
              "train.keep_checkpoints"):
    _positive(c, key)
  _positive(c, "train.profile_start_step")
  if c.train.profile_steps and c.train.profile_start_step > c.train.steps:
    raise ConfigError("train.profile_start_step", f"{c.train.profile_start_step} > train.steps={c.train.steps}: "
                      "no step would be profiled")
  for key in ("train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.profile_steps"):
    _positive(c, key, allow_zero=True)
  if c.train.batch_size % c.train.grad_accum:
    raise ConfigError("train.grad_accum", f"{c.train.grad_accum} does not divide train.batch_size="
                      f"{c.train.batch_size}")
  _choice(c, "train.remat_policy", REMAT_POLICIES)
  _choice(c, "optimizer.name", ("adamw", "adafactor", "sgd", "muon"))
  if c.optimizer.name == "muon" and c.peft.method != "full":
    raise ConfigError("optimizer.name", f"muon orthogonalizes the decoder's weight matrices, which only "
                      f"peft.method=full trains (peft.method={c.peft.method})")
  _fraction(c, "optimizer.muon_momentum")
  _choice(c, "optimizer.schedule", ("constant", "linear", "cosine", "wsd"))
  _choice(c, "optimizer.decay_shape", ("linear", "cosine", "1-sqrt"))
  _positive(c, "optimizer.learning_rate")
  _positive(c, "optimizer.warmup_steps", allow_zero=True)
  if c.optimizer.warmup_steps >= c.train.steps and c.optimizer.warmup_steps > 0:
    raise ConfigError("optimizer.warmup_steps", f"{c.optimizer.warmup_steps} >= train.steps={c.train.steps}")
  _positive(c, "optimizer.decay_steps", allow_zero=True)
  if c.optimizer.warmup_steps + c.optimizer.decay_steps > c.train.steps:
    raise ConfigError("optimizer.decay_steps", f"{c.optimizer.decay_steps} + optimizer.warmup_steps="
                      f"{c.optimizer.warmup_steps} > train.steps={c.train.steps}")
  _positive(c, "optimizer.weight_decay", allow_zero=True)
  _positive(c, "optimizer.grad_clip", allow_zero=True)
  _fraction(c, "optimizer.b1")  # torch's AdamW bounds
  _fraction(c, "optimizer.b2")
  _positive(c, "optimizer.eps", allow_zero=True)
  _positive(c, "optimizer.lora_plus_ratio")
  _positive(c, "train.router_aux_loss_coef", allow_zero=True)
  if c.optimizer.lora_plus_ratio != 1.0 and c.peft.method not in LORA_METHODS:
    raise ConfigError("optimizer.lora_plus_ratio", f"LoRA+ sets the learning rate of LoRA's B matrices: "
                      f"peft.method={c.peft.method} has none")
  _positive(c, "dpo.beta")
  _choice(c, "dpo.loss_type", DPO_LOSS_TYPES)
  _positive(c, "dpo.simpo_gamma", allow_zero=True)
  _positive(c, "dpo.rpo_alpha", allow_zero=True)
  if c.dpo.rpo_alpha and c.dpo.loss_type == "orpo":
    raise ConfigError("dpo.rpo_alpha", "orpo already adds the chosen responses' NLL (with weight 1); leave it 0")
  if not 0 <= c.dpo.label_smoothing < 0.5:
    raise ConfigError("dpo.label_smoothing", f"must be in [0, 0.5), got {c.dpo.label_smoothing}")
  if c.objective == "grpo":
    _check_grpo(c)
  from jaxtune import sharding  # it imports this module (ConfigError)
  mesh_keys = [f"mesh.{axis}" for axis in sharding.MESH_AXES]
  for key in mesh_keys:
    value = _get(c, key)
    if not isinstance(value, int) or (value < 1 and value != -1):
      raise ConfigError(key, f"must be a positive integer or -1 (fill), got {value!r}")
  if sum(_get(c, k) == -1 for k in mesh_keys) > 1:
    raise ConfigError("mesh", f"at most one of mesh.{'/'.join(sharding.MESH_AXES)} may be -1")
  if not isinstance(c.mesh.dcn_data, int) or c.mesh.dcn_data < 1:
    raise ConfigError("mesh.dcn_data", f"must be a positive integer, got {c.mesh.dcn_data!r}")
  for key in ("precision.param_dtype", "precision.compute_dtype"):
    _choice(c, key, DTYPES)
  _choice(c, "model.attention", attention.IMPLEMENTATIONS)
  _choice(c, "model.layer_loop", llama.LAYER_LOOPS)
  _choice(c, "model.moe_dispatch", moe.DISPATCHES)
  _choice(c, "model.quantize", quantization.CHOICES)
  if c.model.quantize and c.peft.method == "full":
    raise ConfigError("model.quantize", f"{c.model.quantize} stores the base frozen; full fine-tuning "
                      "trains it: use a PEFT method (peft.method=lora, ...) or model.quantize=''")
  if c.model.attention == "cudnn" and c.precision.compute_dtype == "float32":
    raise ConfigError("model.attention", "cudnn needs precision.compute_dtype=bfloat16 or float16")
  if c.objective in ("dpo", "reward") and c.data.format != "preference":
    raise ConfigError("data.format", f"objective={c.objective} needs data.format=preference")


def _check_grpo(c: ml_collections.ConfigDict) -> None:
  for key in ("grpo.group_size", "grpo.max_new_tokens", "grpo.updates_per_batch", "grpo.top_p"):
    _positive(c, key)
  for key in ("grpo.temperature", "grpo.kl_coef", "grpo.clip_eps", "grpo.clip_eps_high"):
    _positive(c, key, allow_zero=True)
  _choice(c, "grpo.loss_type", GRPO_LOSS_TYPES)
  _choice(c, "grpo.scale_rewards", GRPO_SCALE_REWARDS)
  _choice(c, "grpo.importance_sampling_level", GRPO_IMPORTANCE_SAMPLING)
  if c.grpo.clip_eps >= 1:
    raise ConfigError("grpo.clip_eps", f"must be < 1 (the ratio's lower clip is 1 - clip_eps), got {c.grpo.clip_eps}")
  if c.grpo.group_size < 2:
    raise ConfigError("grpo.group_size", f"must be >= 2 (advantages compare completions of a prompt), got {c.grpo.group_size}")
  if c.train.batch_size % c.grpo.group_size:
    raise ConfigError("grpo.group_size", f"{c.grpo.group_size} does not divide train.batch_size={c.train.batch_size}")
  if c.grpo.max_new_tokens >= c.data.seq_len:
    raise ConfigError("grpo.max_new_tokens", f"{c.grpo.max_new_tokens} leaves no room for the prompt in "
                      f"data.seq_len={c.data.seq_len}")
  if bool(c.grpo.reward_fn) == bool(c.grpo.reward_model):
    raise ConfigError("grpo.reward_fn", "give exactly one of grpo.reward_fn (module:function) or grpo.reward_model")
  if c.grpo.reward_fn and ":" not in c.grpo.reward_fn:
    raise ConfigError("grpo.reward_fn", f"{c.grpo.reward_fn!r} is not module:function")


def field_map(spec: str, key: str = "data.field_map") -> dict[str, str]:
  """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if "=" not in item:
      raise ConfigError(key, f"{item!r} is not FIELD=COLUMN")
    field, column = (s.strip() for s in item.split("=", 1))
    out[field] = column
  return out
