"""Prompt tuning: logits and gradients against Hugging Face peft's PROMPT_TUNING, packing, training, export."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_tiny
from jaxtune import export, inference, peft_io, sampling
from jaxtune.models import llama, loading
from jaxtune.peft import partition, prompt
from test_prefix import assert_real_logits_close, left_padded_batch

P = 4  # virtual tokens
forward = jax.jit(llama.forward, static_argnums=1)


@pytest.fixture(scope="module", params=["llama_untied", "qwen2"])
def folder(request, tmp_path_factory):
  return hf_tiny.tiny_folder(tmp_path_factory, request.param)


def peft_prompt_model(folder, seed=1):
  """peft's prompt tuning with a random soft prompt at the scale of the model's own embeddings."""
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
  embedding = model.prompt_encoder["default"].embedding.weight
  scale = float(base.get_input_embeddings().weight.std())
  values = np.random.RandomState(seed).normal(0, 3 * scale, size=tuple(embedding.shape)).astype(np.float32)
  with torch.no_grad():
    embedding.copy_(torch.from_numpy(values))
  return model.eval(), values


@pytest.mark.parametrize("family", ["gemma", "granite"])
def test_scaled_embeddings_meet_the_soft_prompt_as_in_peft(tmp_path_factory, tmp_path, family):
  """Gemma scales token embeddings in its embedding layer, so not peft's virtual tokens; Granite scales
  the model's whole input, so them too (sharpened: Granite's small multipliers hide the prompt)."""
  folder = str(tmp_path_factory.mktemp(family))
  hf_tiny.save_hf_model(family, folder, sharp=True)
  test_logits_match_peft_and_the_peft_export_round_trips(folder, tmp_path)


def real_logits(model, tokens, mask=None):
  """peft's logits for the real tokens (it returns the P virtual positions first)."""
  mask = np.ones_like(tokens) if mask is None else mask
  out = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long()).logits
  assert out.shape[1] == P + tokens.shape[1]
  return out[:, P:]


def test_logits_match_peft_and_the_peft_export_round_trips(folder, tmp_path):
  model, values = peft_prompt_model(folder)
  cfg, params = loading.load_model(folder)
  tokens, mask, positions, segments = left_padded_batch()
  with torch.no_grad():
    theirs = real_logits(model, tokens, mask).numpy()
  prompted = {**params, "prompt_embeddings": jnp.asarray(values)}
  ours, _ = forward(prompted, cfg, tokens, positions, segments)
  assert_real_logits_close(theirs, ours, mask, atol=2e-5)
  base, _ = forward(params, cfg, tokens, positions, segments)
  assert np.abs(np.asarray(base) - theirs)[mask.astype(bool)].max() > 1e-2  # the prompt matters

  # jaxtune's PEFT export loads in peft with the same logits, and jaxtune's import reads it back.
  out = str(tmp_path / "prompt")
  export.write_peft(out, cfg, prompted, "prompt", {}, folder)
  base_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  reloaded = peft.PeftModel.from_pretrained(base_model, out).eval()
  with torch.no_grad():
    np.testing.assert_allclose(real_logits(reloaded, tokens, mask).numpy(), theirs, atol=1e-6)
  back, _ = peft_io.load_peft_adapter(params, cfg, out)
  np.testing.assert_array_equal(np.asarray(back["prompt_embeddings"]), values)
  with pytest.raises(export.ExportError, match="prompt tuning cannot be merged"):
    export.write_hf(str(tmp_path / "hf"), cfg, prompted, llama.PeftRuntime(), None, folder)


def test_gradient_matches_peft_autograd(folder):
  """d(mean NLL of the real tokens)/d(soft prompt) through peft's torch graph and jaxtune's jax one: the
  prompt's keys/values are recomputed from the embeddings inside the differentiated forward pass."""
  model, values = peft_prompt_model(folder)
  tokens = np.random.RandomState(2).randint(3, 250, size=(1, 10)).astype(np.int32)
  logits = real_logits(model, tokens)[:, :-1]
  torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                    torch.from_numpy(tokens[:, 1:]).long().reshape(-1)).backward()
  theirs = model.prompt_encoder["default"].embedding.weight.grad.numpy()

  cfg, params = loading.load_model(folder)
  trainable, frozen = partition.split({**params, "prompt_embeddings": jnp.asarray(values)}, "prompt")
  assert list(trainable) == ["prompt_embeddings"]

  def loss(trainable):
    logits, _ = forward(partition.merge(trainable, frozen), cfg, tokens[:, :-1])
    return llama.token_nll(logits, tokens[:, 1:]).mean()

  ours = np.asarray(jax.grad(loss)(trainable)["prompt_embeddings"])
  assert np.abs(theirs).max() > 1e-4
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_packed_sequences_each_see_the_prompt(folder):
  """A packed row of two sequences gives each the logits it has alone after the soft prompt."""
  cfg, params = loading.load_model(folder)
  prompted = prompt.add_prompt(params, cfg, jax.random.key(0), P)
  a, b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
  row = np.array([a + b + [0]], np.int32)
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]], np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0]], np.int32)
  packed, _ = forward(prompted, cfg, row, positions, segments)
  alone_a, _ = forward(prompted, cfg, np.array([a], np.int32))
  alone_b, _ = forward(prompted, cfg, np.array([b], np.int32))
  np.testing.assert_allclose(np.asarray(packed[0, :5]), np.asarray(alone_a[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(packed[0, 5:9]), np.asarray(alone_b[0]), atol=1e-5)


def _dots_in_loops(jaxpr, inside=False) -> int:
  """dot_generals inside while loops, through every nested jaxpr."""
  count = 0
  for eqn in jaxpr.eqns:
    count += inside and eqn.primitive.name == "dot_general"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _dots_in_loops(sub, inside or eqn.primitive.name == "while")
  return count


def test_generation_computes_the_prompt_once(tiny_setup):
  """Sampling (generate, GRPO) with a soft prompt: the same tokens as the folded prefix, and its
  decode loop is the folded model's program: the prompt's own pass is not redone per token."""
  cfg, params = loading.load_model(tiny_setup[0])
  prompted = prompt.add_prompt(params, cfg, jax.random.key(0), P)
  folded = prompt.prompt_as_prefix(prompted, cfg)
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  assert (sampling.generate(prompted, cfg, prompts, max_new_tokens=6)
          == sampling.generate(folded, cfg, prompts, max_new_tokens=6))
  rows = sampling.left_pad(prompts, 8, 0)
  args = (*rows, np.full((8,), -1, np.int32), np.asarray(jax.random.key_data(jax.random.key(0))),
          np.float32(0), np.float32(1), np.int32(0))

  def loop_dots(p):
    fn = lambda p, *a: sampling.generate_padded(p, *a, cfg=cfg, peft=llama.PeftRuntime(), max_new_tokens=4)
    return _dots_in_loops(jax.make_jaxpr(fn)(p, *args).jaxpr)

  assert loop_dots(prompted) == loop_dots(folded) > 0


def test_prompt_training_learns_and_exports_for_peft(tiny_setup, tmp_path):
  """train.py (peft.method=prompt) -> the workdir's trained model (the prompt folded into a prefix) ->
  scripts/export.py --format peft, which peft loads with the same logits; --format hf is refused."""
  from jaxtune import trainer
  from test_export import run_export
  from train_helpers import losses, tiny_config
  model_dir, data = tiny_setup
  run = str(tmp_path / "run")
  trained = losses(trainer.run(tiny_config(model_dir, data, **{
      "peft.method": "prompt", "peft.prompt.length": P, "train.steps": 8, "optimizer.learning_rate": 1e-1}), run))
  print("prompt tuning losses", [round(x, 4) for x in trained])
  assert trained[-1] < trained[0] - 0.05, trained  # 4 x 64 numbers: 5.59 -> 5.50 in 8 steps
  # evaluate/generate --adapter RUN: the prompt is folded into prefix keys/values once, not per decode step
  cfg, params, _, _ = inference.load_for_inference(model_dir, adapter=run)
  assert "prompt_embeddings" not in params and params["layers"]["self_attn"]["prefix_k"].shape[1] == P
  tokens = np.random.RandomState(3).randint(3, 250, size=(1, 12)).astype(np.int32)
  ours, _ = forward(params, cfg, tokens)
  result = run_export(run, str(tmp_path / "peft"), "peft")
  assert result.returncode == 0, result.stderr
  base_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  with torch.no_grad():
    theirs = real_logits(peft.PeftModel.from_pretrained(base_model, str(tmp_path / "peft")).eval(), tokens)
  np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), atol=2e-5)
  refused = run_export(run, str(tmp_path / "hf"), "hf")
  assert refused.returncode != 0 and "prompt tuning cannot be merged" in refused.stderr
