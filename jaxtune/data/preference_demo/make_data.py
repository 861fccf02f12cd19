"""Writes the bundled tiny preference set (seeded, so reruns give the same files).

  python jaxtune/data/preference_demo/make_data.py

Rule to learn: the chosen answer is polite and gives the right sum; the rejected one is rude and
(usually) wrong. Small enough for CPU tests; the rule shows up in a few dozen steps.
"""

import json
import os
import random

POLITE = ("Happy to help! It is {s}.", "Sure, the answer is {s}. Thanks for asking!",
          "Of course: {s}. Have a nice day!", "Glad you asked, it is {s}.")
RUDE = ("Ugh. {w}.", "{w}, obviously. Go away.", "Figure it out yourself.", "Whatever, {w}.")
PROMPTS = ("What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?")


def record(rng: random.Random) -> dict:
  a, b = rng.randint(0, 49), rng.randint(0, 49)
  wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
  return {"prompt": rng.choice(PROMPTS).format(a=a, b=b),
          "chosen": rng.choice(POLITE).format(s=a + b),
          "rejected": rng.choice(RUDE).format(w=wrong)}


def main():
  rng = random.Random(1234)
  here = os.path.dirname(os.path.abspath(__file__))
  for name, n in (("train.jsonl", 256), ("eval.jsonl", 64)):
    with open(os.path.join(here, name), "w") as f:
      for _ in range(n):
        f.write(json.dumps(record(rng)) + "\n")


if __name__ == "__main__":
  main()
