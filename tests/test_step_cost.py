"""LoRA's step does no weight-gradient matmuls for frozen weights: ~4N FLOPs/token instead of ~6N."""

from jaxtune import sharding, trainer
from jaxtune.data import pipeline
from train_helpers import tiny_config


def _step_flops(config, workdir):
  r = trainer.setup(config, workdir)
  local = pipeline.BatchIterator(r.train_data, config.train.batch_size).next()
  batch = sharding.global_batch(local, r.mesh)
  compiled = r.step_fn.lower(r.trainable, r.frozen, r.opt_state, batch, r.rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"], r


def test_lora_step_skips_frozen_weight_gradients(tiny_setup, tmp_path):
  model, data = tiny_setup
  scan = {"model.layer_loop": "scan"}  # the count below relies on the layer loop (GPUs unroll it)
  full, r = _step_flops(tiny_config(model, data, **{"peft.method": "full"}, **scan), str(tmp_path / "f"))
  lora, r = _step_flops(tiny_config(model, data, **{"peft.method": "lora"}, **scan), str(tmp_path / "l"))
  # Matmul params N (per token 2N forward, 2N activation grads, 2N weight grads) plus attention A
  # (no weights: 3x its forward either way).
  # XLA's cost analysis counts a while-loop body once: the scanned layers count as one layer.
  cfg = trainer.loading.model_config_of(model)
  tokens = 8 * 64
  n = 1 * (cfg.hidden_size * (cfg.q_size * 2 + cfg.kv_size * 2)
           + 3 * cfg.hidden_size * cfg.intermediate_size)
  head = cfg.hidden_size * cfg.vocab_size  # the LM head runs only at the r.spec.max_targets positions
  head_tokens = 8 * r.spec.max_targets
  assert 0 < r.spec.max_targets < 64
  attention = 1 * 4 * 64 * cfg.q_size  # QK^T and PV per token, full (masked) T=64
  expected_full = tokens * (6 * n + 3 * attention) + head_tokens * 6 * head
  lora_params = r.counts["trainable_params"] // cfg.num_layers  # one (scanned) layer's A and B
  expected_lora = tokens * (4 * n + 3 * attention + 6 * lora_params) + head_tokens * 4 * head
  assert abs(full / expected_full - 1) < 0.1, (full, expected_full)
  assert abs(lora / expected_lora - 1) < 0.1, (lora, expected_lora)
  assert lora / full < 0.85, lora / full  # with frozen weight grads it would exceed 1
