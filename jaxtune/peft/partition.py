"""The one idea: a PEFT method only decides which param leaves are trainable.

Params are split into two flat dicts ('/'-joined paths -> arrays): the trainable partition (what
gradients, optimizer state and PEFT checkpoints cover) and the frozen rest.
"""

from __future__ import annotations

from typing import Any

from jaxtune.models import quantization
from jaxtune.models.loading import flatten, unflatten

METHODS = ("full", "lora", "dora", "ia3", "adapter", "prefix", "prompt")
LORA_METHODS = ("lora", "dora")  # dora = lora with peft.lora.use_dora: both train the lora_* leaves


def is_peft_leaf(path: str) -> bool:
  """Leaves added by a PEFT method (named by convention: lora_*, ia3_*, *_adapter/*, prefix_*,
  prompt_embeddings)."""
  last = path.split("/")[-1]
  return (last.startswith(("lora_", "ia3_")) or "_adapter/" in path or "prefix_" in path
          or path == "prompt_embeddings")


def is_trainable(path: str, method: str) -> bool:
  if path.startswith("reward_head/"):  # the reward model's new scalar head trains under every method
    return True
  if method == "full":
    return not is_peft_leaf(path)
  if method in LORA_METHODS:
    return path.split("/")[-1].startswith("lora_")
  if method == "ia3":
    return path.split("/")[-1].startswith("ia3_")
  if method == "adapter":
    return "_adapter/" in path
  if method == "prefix":
    return "prefix_" in path
  if method == "prompt":
    return path == "prompt_embeddings"
  raise ValueError(f"peft.method={method!r} is not one of {', '.join(METHODS)}")


def split(params: dict, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) flat dicts."""
  flat = flatten(params)
  trainable = {p: v for p, v in flat.items() if is_trainable(p, method)}
  if not trainable:
    raise ValueError(f"peft.method={method!r}: no trainable parameters in the model")
  frozen = {p: v for p, v in flat.items() if p not in trainable}
  return trainable, frozen


def merge(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict:
  return unflatten({**frozen, **trainable})


def count(flat: dict[str, Any]) -> int:
  """Parameters in a flat dict (an NF4 kernel counts its weights, two a byte, not its scales)."""
  return int(sum(quantization.weights_in(p, v) for p, v in flat.items()))
