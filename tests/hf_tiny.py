"""Tiny random Hugging Face models built locally (no hub), saved as folders jaxtune loads."""

from __future__ import annotations

import os

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# Phi3Config's, Olmo2Config's and SmolLM3Config's default token ids lie outside the tiny vocabulary
PHI3_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama_linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 10000.0})),
    "llama3_rope": ("llama", dict(head_dim=32, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    # YaRN (Qwen2.5's long-context setting): a ramp between scaled and original frequencies over
    # an original context of 32 positions, and cos/sin scaled by 0.1 ln(4) + 1
    "qwen2_yarn": ("qwen2", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
        "beta_slow": 2.0, "rope_theta": 10000.0})),
    "mistral": ("mistral", dict(sliding_window=4096, tie_word_embeddings=False)),
    "mistral_window": ("mistral", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    # q_norm/k_norm, and heads wider than hidden / heads (q is 128 wide on a 64-wide model)
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, head_dim=32)),
    # Gemma: norms scaling by 1 + w, scaled embeddings, exact-gelu GeGLU (as old Gemma 1 configs)
    "gemma": ("gemma", dict(head_dim=32, hidden_act="gelu")),
    # Gemma 2: + sandwich norms, soft-capped scores and logits (caps low enough to bite), windows
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                              attn_logit_softcapping=2.0, final_logit_softcapping=0.5,
                              layer_types=["sliding_attention", "full_attention"])),
    # Gemma 3 (text): sandwich norms scaling by 1 + w, GeGLU, scaled embeddings, q/k norms, scores
    # scaled by 1/sqrt(24), a windowed layer (own rope base) before a global one
    "gemma3": ("gemma3_text", dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])),
    # mixtures of experts: 4 experts, 2 a token (Mixtral renormalises their weights; Qwen3-MoE here too,
    # with q/k norms and experts narrower than its dense width)
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    # Qwen2-MoE: + a shared expert (width 96) behind a sigmoid gate, q/k/v biases, weights not renormalised
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=96, tie_word_embeddings=False)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                    norm_topk_prob=True, head_dim=32)),
    # Phi-3: fused qkv_proj and gate_up_proj, a sliding window on every layer (as Phi-3-mini's 2047)
    "phi3": ("phi3", dict(sliding_window=8, tie_word_embeddings=False, **PHI3_TOKENS)),
    # Phi-3.5 / Phi-4-mini: longrope (a short and a long set of frequency divisors, switched when an
    # input passes the original context of 32; cos/sin scaled for the 8x longer one) over the first
    # 12 of 16 dims of each head, tied embeddings
    "phi3_longrope": ("phi3", dict(tie_word_embeddings=True, partial_rotary_factor=0.75,
                                   original_max_position_embeddings=32, rope_parameters={
                                       "rope_type": "longrope", "rope_theta": 10000.0,
                                       "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 3.0],
                                       "long_factor": [1.0, 1.5, 2.5, 4.0, 8.0, 16.0]}, **PHI3_TOKENS)),
    # OLMo 2: norms on each block's output only, q/k norms over the whole projections
    "olmo2": ("olmo2", dict(tie_word_embeddings=False, **PHI3_TOKENS)),
    # OLMo 3: + windowed layers (3 of 4 by default; here the first of two)
    "olmo3": ("olmo3", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            tie_word_embeddings=False, **PHI3_TOKENS)),
    # Granite: embeddings x 12, scores x 0.05 (not 1/sqrt(16)), block outputs x 0.22, logits / 8
    "granite": ("granite", dict(embedding_multiplier=12.0, attention_multiplier=0.05, residual_multiplier=0.22,
                                logits_scaling=8.0, tie_word_embeddings=True)),
    # SmolLM3: NoPE layers (the first of two here: no rotary embeddings there)
    "smollm3": ("smollm3", dict(no_rope_layers=[0, 1], tie_word_embeddings=True, **PHI3_TOKENS)),
    # ... with use_sliding_window: windows on the NoPE layers (transformers' default layer_types)
    "smollm3_window": ("smollm3", dict(no_rope_layers=[0, 1], use_sliding_window=True, sliding_window=8,
                                       tie_word_embeddings=False, **PHI3_TOKENS)),
    "smollm2": ("llama", dict(tie_word_embeddings=True, num_attention_heads=8,
                              num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": 100000.0})),
}


def build_hf_model(family: str, seed: int = 0, **overrides):
  """A random tiny transformers model of `family` (fp32, eval mode); `overrides` change its config."""
  import torch
  import transformers
  model_type, extra = FAMILIES[family]
  config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
                "gemma3_text": transformers.Gemma3TextConfig, "mixtral": transformers.MixtralConfig,
                "qwen3_moe": transformers.Qwen3MoeConfig, "qwen2_moe": transformers.Qwen2MoeConfig, "phi3": transformers.Phi3Config,
                "olmo2": transformers.Olmo2Config, "olmo3": transformers.Olmo3Config,
                "granite": transformers.GraniteConfig, "smollm3": transformers.SmolLM3Config}[model_type]
  kwargs = {**TINY, **extra, **overrides}
  config = config_cls(**kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # non-trivial norms and biases so their loading is checked too
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def sharpen(model, scale: float = 8.0):
  """The model with its layer weights (not norms) scaled up, in place: at the default init (std 0.02)
  the layers barely move the logits (tied models just repeat the last token), and soft-caps never
  bite; scaled weights make attention, masking, positions and caps matter."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".layers." in name and "norm" not in name:
        p.mul_(scale)
  return model


def save_hf_model(family: str, folder: str, seed: int = 0, with_tokenizer: bool = True, sharp: bool = False):
  model = build_hf_model(family, seed)
  if sharp:
    sharpen(model)
  model.save_pretrained(folder)
  if with_tokenizer:
    save_byte_tokenizer(folder)
  return model


def save_byte_tokenizer(folder: str):
  """A byte-level BPE tokenizer with a 256-token vocab and a ChatML template, built offline."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}  # 256 byte symbols
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  # The specials take the ids of bytes 0x00-0x02 (never in text), so the vocab stays at 256.
  for i, tok in enumerate(specials):
    vocab[tok] = vocab.pop(chr(0x100 + i))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                 pad_token="<|endoftext|>", unk_token=None)
  fast.add_special_tokens({"additional_special_tokens": specials})
  fast.chat_template = CHATML_TEMPLATE
  fast.save_pretrained(folder)
  return fast


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


def save_bpe_tokenizer(folder: str, texts, vocab_size: int = 320, llama3_split: bool = False):
  """A byte-level BPE tokenizer with merges learned from `texts` (ids 0-2 the ChatML specials, then
  the 256 bytes, then merges up to vocab_size), GPT-2's pre-tokenizer or Llama 3's split, built offline."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  from jaxtune.gguf_export import LLAMA3_SPLIT
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                       if llama3_split else pre_tokenizers.ByteLevel(add_prefix_space=False))
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                 pad_token="<|endoftext|>", unk_token=None)
  fast.chat_template = CHATML_TEMPLATE
  fast.save_pretrained(folder)
  return fast


def tiny_folder(tmp_path_factory, family: str, seed: int = 0) -> str:
  folder = str(tmp_path_factory.mktemp(family))
  save_hf_model(family, folder, seed)
  return os.path.abspath(folder)
