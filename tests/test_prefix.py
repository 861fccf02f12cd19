"""Prefix tuning: numerics against Hugging Face peft's PREFIX_TUNING, masks, packing and the KV cache."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_tiny
from jaxtune.models import llama, loading
from jaxtune.models.config import ModelConfig
from jaxtune.peft import partition, prefix

P = 5  # virtual tokens
TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8)
forward = jax.jit(llama.forward, static_argnums=1)  # un-jitted, every call re-traces the layer scan


@pytest.fixture(scope="module", params=["llama_untied", "qwen2", "gemma2"])
def hf_folder(request, tmp_path_factory):
  """A tiny grouped-query model (4 heads / 2 kv heads) saved as a HF folder; qwen2 adds q/k/v biases;
  gemma2's windowed layer (8 positions) hides the prefix from the later tokens, as peft's past keys."""
  return request.param, hf_tiny.tiny_folder(tmp_path_factory, request.param)


def peft_prefix_model(folder, **config):
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **config))
  return model.eval()


def left_padded_batch(seed=0, T=12, pads=(0, 3)):
  """Token ids, HF attention mask, jaxtune positions/segment ids (row i has pads[i] left pads)."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(3, 250, size=(len(pads), T)).astype(np.int32)
  mask = np.ones((len(pads), T), np.int32)
  for row, n in enumerate(pads):
    mask[row, :n] = 0
  # HF (through peft) gives every slot position P + column, padding or not; jaxtune adds P itself.
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
  return tokens, mask, positions, mask.copy()


def assert_real_logits_close(hf_logits, jt_logits, mask, atol=2e-4):
  real = mask.astype(bool)
  diff = np.abs(np.asarray(jt_logits)[real] - hf_logits[real]).max()
  assert diff < atol, diff


def test_logits_match_peft_prefix_tuning(hf_folder):
  family, folder = hf_folder
  model = peft_prefix_model(folder)
  cfg, params = loading.load_model(folder)
  embedding = model.prompt_encoder["default"].embedding.weight
  assert tuple(embedding.shape) == (P, cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim)
  values = np.random.RandomState(1).normal(0, 1.0, size=tuple(embedding.shape)).astype(np.float32)
  with torch.no_grad():
    embedding.copy_(torch.from_numpy(values))
  tokens, mask, positions, segments = left_padded_batch()
  with torch.no_grad():
    hf_logits = model(input_ids=torch.from_numpy(tokens).long(),
                      attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  assert hf_logits.shape[1] == tokens.shape[1]  # peft returns logits for the real slots only
  prefix_k, prefix_v = prefix.prefix_from_peft(values, cfg)
  assert prefix_k.shape == (cfg.num_layers, P, cfg.num_kv_heads, cfg.head_dim)
  logits, _ = forward(prefix.attach_prefix(params, prefix_k, prefix_v), cfg, tokens, positions, segments)
  assert_real_logits_close(hf_logits, logits, mask)
  # The prefix matters: the base model's logits are far from these.
  base_logits, _ = forward(params, cfg, tokens, positions, segments)
  assert np.abs(np.asarray(base_logits) - hf_logits)[mask.astype(bool)].max() > 1e-2
  np.testing.assert_array_equal(np.asarray(prefix.prefix_to_peft(prefix_k, prefix_v)), values)


def test_reparametrised_prefix_matches_peft_prefix_projection(hf_folder):
  family, folder = hf_folder
  hidden = 16
  model = peft_prefix_model(folder, prefix_projection=True, encoder_hidden_size=hidden)
  cfg, params = loading.load_model(folder)
  params = prefix.add_prefix(params, cfg, jax.random.key(0), P, reparam_hidden=hidden)
  enc = model.prompt_encoder["default"]
  # Our init has peft's shapes; copy peft's (random) values over ours.
  assert params["prefix_encoder"]["embedding"].shape == tuple(enc.embedding.weight.shape)
  assert params["prefix_encoder"]["output"]["kernel"].shape == tuple(enc.transform[2].weight.T.shape)
  t = lambda x: jnp.asarray(x.detach().numpy())
  params["prefix_encoder"] = {
      "embedding": t(enc.embedding.weight),
      "hidden": {"kernel": t(enc.transform[0].weight).T, "bias": t(enc.transform[0].bias)},
      "output": {"kernel": t(enc.transform[2].weight).T, "bias": t(enc.transform[2].bias)},
  }
  tokens, mask, positions, segments = left_padded_batch(seed=2)
  with torch.no_grad():
    hf_logits = model(input_ids=torch.from_numpy(tokens).long(),
                      attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    saved = model.get_prompt_embedding_to_save("default").numpy()  # what peft writes on save
  logits, _ = forward(params, cfg, tokens, positions, segments)
  assert_real_logits_close(hf_logits, logits, mask)
  folded = prefix.fold_prefix(params, cfg)
  assert "prefix_encoder" not in folded
  attn = folded["layers"]["self_attn"]
  np.testing.assert_allclose(np.asarray(prefix.prefix_to_peft(attn["prefix_k"], attn["prefix_v"])), saved,
                             atol=1e-5)
  folded_logits, _ = forward(folded, cfg, tokens, positions, segments)
  np.testing.assert_allclose(np.asarray(folded_logits), np.asarray(logits), atol=1e-5)


def test_prefix_converters_round_trip_and_reject_bad_shapes():
  flat = np.random.RandomState(0).normal(size=(P, TINY.num_layers * 2 * TINY.kv_size)).astype(np.float32)
  k, v = prefix.prefix_from_peft(flat, TINY)
  np.testing.assert_array_equal(np.asarray(prefix.prefix_to_peft(k, v)), flat)
  # Layer 1's values are the 4th block of kv_size numbers (peft's order: l0 k, l0 v, l1 k, l1 v).
  np.testing.assert_array_equal(np.asarray(v[1, 2]).ravel(), flat[2, 3 * TINY.kv_size:4 * TINY.kv_size])
  with pytest.raises(ValueError, match="expected \\(P, 64\\)"):
    prefix.prefix_from_peft(flat[:, :-1], TINY)


def test_init_is_the_base_model_after_a_prompt():
  """The default init makes the prefixed model equal the base model given the init tokens as a prompt."""
  params = llama.init_params(TINY, jax.random.key(0), std=0.2)
  prompt = [5, 17, 42, 3, 88]
  prefixed = prefix.add_prefix(params, TINY, jax.random.key(1), P, init_tokens=prompt)
  tokens = np.array([[7, 8, 9, 10, 11, 12]], np.int32)
  logits, _ = forward(prefixed, TINY, tokens)
  full, _ = forward(params, TINY, np.concatenate([[prompt], tokens], axis=1))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, P:]), atol=1e-5)
  # Random init tokens: right shapes, keys/values of real activations' scale (not N(0, 1)).
  rand = prefix.add_prefix(params, TINY, jax.random.key(1), P)["layers"]["self_attn"]
  assert rand["prefix_k"].shape == rand["prefix_v"].shape == (TINY.num_layers, P, TINY.num_kv_heads, TINY.head_dim)
  with pytest.raises(ValueError, match="already has a prefix"):
    prefix.add_prefix(prefixed, TINY, jax.random.key(1), P)
  with pytest.raises(ValueError, match="peft.prefix.length=0"):
    prefix.add_prefix(params, TINY, jax.random.key(1), 0)


# Gemma 2's shape of model: a windowed first layer (the prefix leaves its window), soft-capped scores
WINDOWED = dataclasses.replace(TINY, sliding_window=4, sliding_layers=(True, False), attn_logit_softcap=5.0,
                               norm_weight_offset=1.0, sandwich_norms=True, model_type="gemma2")


@pytest.fixture(scope="module", params=[(TINY, 0), (TINY, 16), (WINDOWED, 0)], ids=["direct", "reparam", "windowed"])
def prefixed(request):
  """(config, params with a prefix)."""
  cfg, reparam_hidden = request.param
  params = llama.init_params(cfg, jax.random.key(0), std=0.2)
  return cfg, prefix.add_prefix(params, cfg, jax.random.key(1), P, reparam_hidden=reparam_hidden)


def test_padding_and_packing_with_a_prefix(prefixed):
  """Each packed record sees the prefix and only itself; padding changes nothing real."""
  cfg, prefixed = prefixed
  a, b = [3, 14, 15, 92, 65], [35, 89, 79, 32]
  row = np.array([a + b + [0, 0, 0]], np.int32)
  positions = np.array([list(range(5)) + list(range(4)) + [0, 0, 0]], np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
  packed, _ = forward(prefixed, cfg, row, positions, segments)
  alone_a, _ = forward(prefixed, cfg, np.array([a], np.int32))
  alone_b, _ = forward(prefixed, cfg, np.array([b], np.int32))
  np.testing.assert_allclose(np.asarray(packed[0, :5]), np.asarray(alone_a[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(packed[0, 5:9]), np.asarray(alone_b[0]), atol=1e-5)


def greedy(params, cfg, prompt, steps, use_cache, max_len=16):
  """Greedy continuation of `prompt`: one prefill + cached decode steps, or a full forward per step.

  The full forward always runs on max_len slots (so it compiles once): causal attention keeps the
  unused trailing slots from touching the logits read at position n - 1.
  """
  if not use_cache:
    tokens = np.zeros((1, max_len), np.int32)
    tokens[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
      logits, _ = forward(params, cfg, tokens)
      tokens[0, n] = np.argmax(logits[0, n - 1])
    return tokens[0, len(prompt):len(prompt) + steps].tolist()
  logits, cache = forward(params, cfg, np.array([prompt], np.int32), cache=llama.init_cache(cfg, 1, max_len))
  out = []
  for _ in range(steps):
    out.append(int(np.argmax(logits[0, -1])))
    logits, cache = forward(params, cfg, np.array([[out[-1]]], np.int32), cache=cache)
  return out


def test_kv_cache_generation_equals_full_forward(prefixed):
  cfg, prefixed = prefixed
  prompt = [11, 22, 33, 44]
  with_cache = greedy(prefixed, cfg, prompt, 8, use_cache=True)
  assert with_cache == greedy(prefixed, cfg, prompt, 8, use_cache=False)
  # The cached step logits themselves, not just the argmax, agree with one full forward.
  tokens = np.array([prompt + with_cache + [0] * 4], np.int32)
  full, _ = forward(prefixed, cfg, tokens)
  cache = llama.init_cache(cfg, 1, 16)
  steps = []
  for t in range(tokens.shape[1]):
    logits, cache = forward(prefixed, cfg, tokens[:, t:t + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5)


def test_only_prefix_leaves_get_gradients(prefixed):
  cfg, prefixed = prefixed
  trainable, frozen = partition.split(prefixed, "prefix")
  expected = ({"prefix_encoder/embedding", "prefix_encoder/hidden/kernel", "prefix_encoder/hidden/bias",
               "prefix_encoder/output/kernel", "prefix_encoder/output/bias"} if "prefix_encoder" in prefixed
              else {"layers/self_attn/prefix_k", "layers/self_attn/prefix_v"})
  assert set(trainable) == expected
  tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)

  def loss(trainable):
    logits, _ = forward(partition.merge(trainable, frozen), cfg, tokens[:, :-1])
    return llama.token_nll(logits, tokens[:, 1:]).mean()

  grads = jax.grad(loss)(trainable)
  assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())
  print(f"prefix trainable {partition.count(trainable)} of {partition.count(trainable) + partition.count(frozen)}")


@pytest.mark.parametrize("reparam_hidden,learning_rate", [(0, 1e-1), (32, 1e-2)], ids=["direct", "reparam"])
def test_prefix_training_reduces_loss(tiny_setup, tmp_path, reparam_hidden, learning_rate):
  # Prefix tuning wants a larger learning rate than LoRA (peft's examples use 1e-2 to 3e-2).
  from jaxtune import trainer
  from train_helpers import losses, tiny_config
  model, data = tiny_setup
  run = tiny_config(model, data, **{"peft.method": "prefix", "peft.prefix.length": 8, "train.steps": 8,
                                    "peft.prefix.reparam_hidden": reparam_hidden,
                                    "optimizer.learning_rate": learning_rate})
  trained = losses(trainer.run(run, str(tmp_path)))
  print("prefix losses", [round(x, 4) for x in trained])
  assert trained[-1] < trained[0] - 0.15, trained
  counts = json.load(open(tmp_path / "params.json"))
  L, KV, hd = 2, 2, 16  # hf_tiny's llama
  encoder = 8 * KV * hd + (KV * hd + 1) * 32 + (32 + 1) * L * 2 * KV * hd
  assert counts["trainable_params"] == (encoder if reparam_hidden else 2 * L * 8 * KV * hd)


def test_reparametrised_prefix_resumes_exactly(tiny_setup, tmp_path):
  """The encoder (a top-level `prefix_encoder` subtree, not a layer leaf) is checkpointed and restored."""
  from jaxtune import trainer
  from train_helpers import losses, tiny_config
  model, data = tiny_setup
  kw = {"peft.method": "prefix", "peft.prefix.length": 4, "peft.prefix.reparam_hidden": 16, "train.steps": 6,
        "train.checkpoint_every": 3, "optimizer.learning_rate": 1e-2}
  straight = losses(trainer.run(tiny_config(model, data, **kw), str(tmp_path / "straight")))
  trainer.run(tiny_config(model, data, **kw), str(tmp_path / "resumed"), stop_after=3)
  second = trainer.run(tiny_config(model, data, **kw), str(tmp_path / "resumed"))
  assert second[0]["step"] == 4 and losses(second) == straight[3:], (losses(second), straight)
