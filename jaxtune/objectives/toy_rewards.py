"""Programmatic rewards for GRPO demos and tests: fn(prompts, completions) -> one float per completion."""

from __future__ import annotations

from typing import Sequence


def contains_digit(prompts: Sequence, completions: Sequence[str]) -> list[float]:
  """1.0 when the completion has a digit in it."""
  del prompts
  return [float(any(ch.isdigit() for ch in c)) for c in completions]


def digit_fraction(prompts: Sequence, completions: Sequence[str]) -> list[float]:
  """The share of the completion's characters that are digits (a denser signal than contains_digit)."""
  del prompts
  return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def right_sum(prompts: Sequence, completions: Sequence[str]) -> list[float]:
  """1.0 when the completion contains the sum of the first two numbers in the prompt (preference_demo)."""
  import re
  out = []
  for prompt, completion in zip(prompts, completions):
    numbers = [int(n) for n in re.findall(r"\d+", prompt if isinstance(prompt, str) else str(prompt))]
    out.append(float(len(numbers) >= 2 and str(numbers[0] + numbers[1]) in re.findall(r"-?\d+", completion)))
  return out
