"""Bottleneck adapters: exact base model at init, placement checked against transformers, gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from jaxtune.models import llama, loading
from jaxtune.models.config import ModelConfig, config_from_hf
from jaxtune.peft import adapter, partition

SIZE = 8
# Scanned layers on every backend: "exactly" holds within one compiled form (unrolled, as a GPU's
# model.layer_loop=auto runs them, XLA fuses the two models differently: 7e-7 apart).
TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, layer_loop="scan")
TOKENS = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]], np.int32)
forward = jax.jit(llama.forward, static_argnums=1)  # un-jitted, every call re-traces the layer scan


@pytest.fixture(scope="module")
def base():
  return llama.init_params(TINY, jax.random.key(0), std=0.2)


def test_adapters_at_init_leave_the_base_model_exactly(base):
  with_adapters = adapter.add_adapters(base, TINY, jax.random.key(1), SIZE)
  layers = with_adapters["layers"]
  assert layers["attn_adapter"]["down"]["kernel"].shape == (TINY.num_layers, TINY.hidden_size, SIZE)
  assert layers["mlp_adapter"]["up"]["bias"].shape == (TINY.num_layers, TINY.hidden_size)
  assert float(jnp.abs(layers["attn_adapter"]["down"]["kernel"]).max()) > 0  # down is random, up zero
  np.testing.assert_array_equal(np.asarray(forward(with_adapters, TINY, TOKENS)[0]),
                                np.asarray(forward(base, TINY, TOKENS)[0]))
  only_mlp = adapter.add_adapters(base, TINY, jax.random.key(1), SIZE, placement=("mlp",))
  assert "attn_adapter" not in only_mlp["layers"] and "mlp_adapter" in only_mlp["layers"]
  with pytest.raises(ValueError, match="placement='ffn'"):
    adapter.add_adapters(base, TINY, jax.random.key(1), SIZE, placement=("ffn",))
  with pytest.raises(ValueError, match="size=0"):
    adapter.add_adapters(base, TINY, jax.random.key(1), 0)


def adapter_fraction(cfg: ModelConfig, size: int) -> tuple[int, int]:
  """(trainable, total) parameter counts of a model with adapters, from shapes only."""
  shapes = jax.eval_shape(lambda: adapter.add_adapters(llama.init_params(cfg, jax.random.key(0)), cfg,
                                                       jax.random.key(1), size))
  trainable, frozen = partition.split(shapes, "adapter")
  return partition.count(trainable), partition.count(trainable) + partition.count(frozen)


def test_trainable_fraction_is_small():
  # The tiny model is mostly adapter-sized matrices; a real model's adapters are a few percent.
  for name, cfg, size, bound in [("tiny", TINY, SIZE, 0.1),
                          ("SmolLM2-135M shapes", config_from_hf(dict(
                              vocab_size=49152, hidden_size=576, intermediate_size=1536,
                              num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                              tie_word_embeddings=True)), 64, 0.05)]:
    trainable, total = adapter_fraction(cfg, size)
    # 2 placements x L x (D*n + n + n*D + D)
    D, L = cfg.hidden_size, cfg.num_layers
    assert trainable == 2 * L * (2 * D * size + size + D)
    print(f"adapter size {size} on {name}: {trainable} trainable of {total} ({100 * trainable / total:.2f}%)")
    assert trainable / total < bound


def test_gradients_flow_only_to_adapter_leaves(base):
  params = adapter.add_adapters(base, TINY, jax.random.key(1), SIZE)
  trainable, frozen = partition.split(params, "adapter")
  assert set(trainable) == {f"layers/{w}_adapter/{p}/{k}" for w in ("attn", "mlp")
                            for p in ("down", "up") for k in ("kernel", "bias")}
  assert not any("adapter" in p for p in frozen)

  def loss(trainable):
    logits, _ = forward(partition.merge(trainable, frozen), TINY, TOKENS[:, :-1])
    return llama.token_nll(logits, TOKENS[:, 1:]).mean()

  grads = jax.grad(loss)(trainable)
  assert set(grads) == set(trainable)
  for where in ("attn", "mlp"):
    g = lambda p: float(jnp.abs(grads[f"layers/{where}_adapter/{p}"]).max())
    assert g("up/kernel") > 0 and g("up/bias") > 0
    # With up = 0 nothing reaches the down-projection yet: it starts learning after the first step.
    assert g("down/kernel") == 0 and g("down/bias") == 0
  stepped = {p: v - 0.1 * grads[p] for p, v in trainable.items()}
  grads = jax.grad(loss)(stepped)
  assert float(jnp.abs(grads["layers/attn_adapter/down/kernel"]).max()) > 0
  assert loss(stepped) < loss(trainable)


def test_adapter_numerics_match_hooks_on_transformers(tmp_path):
  """Non-zero adapters: jaxtune's logits equal a transformers model whose attention and MLP outputs
  pass through x + up(gelu(down(x))) (forward hooks), i.e. Houlsby's placement before the residual add."""
  folder = str(tmp_path / "llama")
  model = hf_tiny.save_hf_model("llama_bias", folder)
  cfg, params = loading.load_model(folder)
  params = adapter.add_adapters(params, cfg, jax.random.key(1), SIZE)
  rs = np.random.RandomState(0)
  for where in ("attn", "mlp"):  # random non-zero values everywhere, up included
    params["layers"][f"{where}_adapter"] = jax.tree.map(
        lambda x: jnp.asarray(rs.normal(0, 0.3, x.shape).astype(np.float32)), params["layers"][f"{where}_adapter"])

  def hook(where, i):
    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x[i])), params["layers"][f"{where}_adapter"])

    def fn(module, args, output):
      x = output[0] if isinstance(output, tuple) else output
      h = torch.nn.functional.gelu(x @ p["down"]["kernel"] + p["down"]["bias"])
      y = x + h @ p["up"]["kernel"] + p["up"]["bias"]
      return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y
    return fn

  for i, layer in enumerate(model.model.layers):
    layer.self_attn.register_forward_hook(hook("attn", i))
    layer.mlp.register_forward_hook(hook("mlp", i))
  with torch.no_grad():
    expected = model(torch.from_numpy(TOKENS).long()).logits.numpy()
  logits, _ = forward(params, cfg, TOKENS)
  assert np.abs(np.asarray(logits) - expected).max() < 2e-4
  base_logits, _ = forward(loading.load_model(folder)[1], cfg, TOKENS)
  assert np.abs(np.asarray(base_logits) - expected).max() > 1e-2  # the adapters do change the model


def test_adapter_training_reduces_loss_and_starts_at_the_base(tiny_setup, tmp_path):
  from jaxtune import trainer
  from train_helpers import losses, tiny_config
  model, data = tiny_setup
  full = losses(trainer.run(tiny_config(model, data, **{"peft.method": "full", "train.steps": 1}),
                            str(tmp_path / "full")))
  run = tiny_config(model, data, **{"peft.method": "adapter", "peft.adapter.size": 16, "train.steps": 8})
  trained = losses(trainer.run(run, str(tmp_path / "adapter")))
  print("adapter losses", [round(x, 4) for x in trained])
  # up = 0 at init: the first forward is the base model's, so the first-step loss equals full's.
  assert abs(trained[0] - full[0]) < 1e-6, (trained[0], full[0])
  assert trained[-1] < trained[0] - 0.2, trained
  counts = json.load(open(tmp_path / "adapter" / "params.json"))
  D, L = 64, 2  # hf_tiny's llama
  assert counts["trainable_params"] == 2 * L * (2 * D * 16 + 16 + D)
