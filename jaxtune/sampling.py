"""KV-cache generation: left-padded prompt batch, one prefill, then a jitted decode loop.

Greedy at temperature 0, otherwise temperature + top-p (nucleus) sampling from a seed. Each
sequence stops at its first eos id and is padded after it. Compiles once per (batch, prompt
length bucket, max_new_tokens, model).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtune import sharding
from jaxtune.evaluation import bucket_length
from jaxtune.models import llama
from jaxtune.models.config import ModelConfig
from jaxtune.peft import prefix


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
  """Token ids of a prompt: as one user turn of the chat template (+ generation prompt), or raw."""
  if chat:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """(tokens, positions, segment_ids), each B x length; pads are segment 0 and positions count
  from each prompt's first real token (as Hugging Face derives them from the attention mask)."""
  B = len(prompts)
  tokens = np.full((B, length), pad_id, np.int32)
  positions = np.zeros((B, length), np.int32)
  segments = np.zeros((B, length), np.int32)
  for row, ids in enumerate(prompts):
    n = len(ids)
    tokens[row, length - n:] = ids
    positions[row, length - n:] = np.arange(n)
    segments[row, length - n:] = 1
  return tokens, positions, segments


def top_p_filter(logits_BxV, top_p):
  """Logits outside the smallest set of most likely tokens whose probability reaches top_p set to
  -inf. One sort: the kept tokens are a prefix of it, cut at the least likely one's logit (a token
  tied with that one is kept too)."""
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  probs = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # The most likely token always stays (mass_before = 0), so top_p -> 0 means greedy.
  kept_Bx1 = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
  cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_Bx1 - 1, axis=-1)
  return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def next_token(logits_BxV, rng, temperature, top_p):
  """argmax at temperature 0, else a sample from softmax(logits / temperature) cut to top_p.

  Only the branch in use runs (lax.cond): a vocabulary sort per decode step costs far more than
  the rest of a small model's step, so top_p = 1 skips it."""
  def sample(logits):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = jax.lax.cond(top_p < 1, top_p_filter, lambda x, _: x, scaled, top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy, logits_BxV)


@functools.partial(jax.jit, static_argnames=("cfg", "peft", "max_new_tokens", "compute_dtype"))
def generate_padded(params: llama.Params, tokens_BxP, positions_BxP, segments_BxP, eos_ids_E, key_data,
                    temperature, top_p, pad_id, *, cfg: ModelConfig, peft: llama.PeftRuntime,
                    max_new_tokens: int, compute_dtype: str = "float32"):
  """New tokens B x max_new_tokens for left-padded prompts; pad_id after each sequence's eos.

  key_data: `jax.random.key_data` of the sampling key (plain uint32, which every process of a
  multi-host run can pass as the same replicated value). Activations and the KV cache are in
  `compute_dtype`; logits and sampling in float32."""
  B, P = tokens_BxP.shape
  # A soft prompt's (or a reparametrised prefix's) keys/values, once: the decode loop then sees a
  # plain prefix instead of re-running them at every step (as training does).
  params = prefix.materialize_prefix(params, cfg)
  rng = jax.random.wrap_key_data(key_data)
  dtype = jnp.dtype(compute_dtype)
  cache = llama.init_cache(cfg, B, P + max_new_tokens, dtype)
  logits, cache = llama.forward(params, cfg, tokens_BxP, positions_BxP, segments_BxP, cache=cache,
                                peft=peft, compute_dtype=dtype)
  state = dict(step=jnp.zeros((), jnp.int32), logits=logits[:, -1], cache=cache,
               position=positions_BxP[:, -1] + 1,  # the last slot is real in every row
               out=jnp.full((B, max_new_tokens), pad_id, jnp.int32), done=jnp.zeros((B,), bool),
               rng=rng)

  def unfinished(s):
    return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

  def one_token(s, token, out):
    del out
    logits, cache = llama.forward(params, cfg, token[:, None], s["position"][:, None],
                                  jnp.ones((B, 1), jnp.int32), cache=s["cache"], peft=peft, compute_dtype=dtype)
    return logits[:, 0], cache

  def whole_sequence(s, token, out):
    """Prompt and every token so far in a fresh cache; the slots still to come are padding."""
    del token
    written = jnp.arange(max_new_tokens) <= s["step"]
    tokens = jnp.concatenate([tokens_BxP, out], axis=1)
    positions = jnp.concatenate([positions_BxP, jnp.where(written, s["position"][:, None] - s["step"]
                                                          + jnp.arange(max_new_tokens), 0)], axis=1)
    segments = jnp.concatenate([segments_BxP, jnp.broadcast_to(written, (B, max_new_tokens)).astype(jnp.int32)], 1)
    hidden, cache = llama.forward(params, cfg, tokens, positions, segments, cache=llama.init_cache(
        cfg, B, P + max_new_tokens, dtype), peft=peft, compute_dtype=dtype, return_hidden=True)
    last = jax.lax.dynamic_index_in_dim(hidden, P + s["step"], axis=1, keepdims=False)
    return llama.lm_logits(params, last, cfg), dict(cache, index=P + s["step"] + 1)

  def decode_step(s):
    rng, key = jax.random.split(s["rng"])
    token = jnp.where(s["done"], pad_id, next_token(s["logits"], key, temperature, top_p))
    out = jax.lax.dynamic_update_slice_in_dim(s["out"], token[:, None], s["step"], axis=1)
    if cfg.rope_type == "longrope":
      # As transformers' generate for Phi-3: when the sequence first passes longrope's original
      # context, the cache (keys rotated with the short set) is dropped and the whole sequence runs
      # again, with the long set, as one call without a cache would.
      crossing = jnp.max(s["position"]) + llama.prefix_length(params) == cfg.rope_original_max_positions
      logits, cache = jax.lax.cond(crossing, whole_sequence, one_token, s, token, out)
    else:
      logits, cache = one_token(s, token, out)
    return dict(step=s["step"] + 1, logits=logits, cache=cache, position=s["position"] + 1,
                out=out, done=s["done"] | jnp.isin(token, eos_ids_E), rng=rng)

  return jax.lax.while_loop(unfinished, decode_step, state)["out"]


def check_options(max_new_tokens: int, temperature: float, top_p: float):
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"--temperature={temperature} must be >= 0")
  if not 0 < top_p <= 1:
    raise ValueError(f"--top_p={top_p} must be in (0, 1]")


def generate(params: llama.Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] = (), pad_id: int = 0,
             peft: llama.PeftRuntime = llama.PeftRuntime(), mesh: Mesh | None = None,
             compute_dtype: str = "float32") -> list[list[int]]:
  """New token ids per prompt, each ending at (and including) its first eos id.

  With a mesh, `prompts` are this process's rows of a global batch (`sharding.global_batch`) that
  all processes generate together, with the same arguments otherwise; returns this process's rows.
  """
  check_options(max_new_tokens, temperature, top_p)
  for i, ids in enumerate(prompts):
    if not ids:
      raise ValueError(f"prompt {i + 1} is empty (no tokens to condition on)")
  longest = max(map(len, prompts))
  if mesh is not None:  # every process pads to the same length: one program, one global batch
    longest = int(sharding.all_processes(np.array([longest])).max())
  rows = dict(zip(("tokens", "positions", "segments"), left_pad(prompts, bucket_length(longest), pad_id)))
  if mesh is not None:
    rows = sharding.global_batch(rows, mesh)
  # A fixed number of eos slots (-1 = none) keeps the shape, so the eos set never recompiles.
  eos = np.full((max(8, len(set(eos_ids))),), -1, np.int32)
  eos[:len(set(eos_ids))] = sorted(set(eos_ids))
  key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
  out = generate_padded(params, rows["tokens"], rows["positions"], rows["segments"], eos, key_data,
                        np.float32(temperature), np.float32(top_p), np.int32(pad_id), cfg=cfg,
                        peft=peft, max_new_tokens=max_new_tokens, compute_dtype=compute_dtype)
  result = []
  for row in (np.asarray(out) if mesh is None else sharding.local_rows(out, mesh)).tolist():
    ends = [j for j, t in enumerate(row) if t in eos_ids]
    result.append(row[:ends[0] + 1] if ends else row)
  return result
