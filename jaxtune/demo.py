"""The embedded demo: evaluate, fine-tune, evaluate again, export, plot.

Scores a model on the bundled held-out set: eval loss (response tokens only), the task metric
(exact match of greedy answers) and a few sample generations.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxtune import demo_task, evaluation, inference, sampling
from jaxtune.data import formats, sources
from jaxtune.models import llama


def score(params, cfg, peft: llama.PeftRuntime, tokenizer, eval_path: str, *, samples: int = 3,
          max_new_tokens: int = 6, batch_size: int = 25) -> dict[str, Any]:
  """{"eval_loss", "exact_match", "mentioned", "samples": [{question, reference, answer}]}."""
  records = sources.read_records(eval_path).records
  encoded = [formats.encode_instruction(r, tokenizer, template="chat") for r in records]
  loss = evaluation.evaluate_encoded(params, cfg, encoded, batch_size=batch_size, peft=peft)["loss"]
  prompts = [formats.instruction_messages(r["instruction"], r.get("context")) for r in records]
  prompt_ids = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]) for m in prompts]
  answers = []
  for i in range(0, len(prompt_ids), batch_size):
    out = sampling.generate(params, cfg, prompt_ids[i:i + batch_size], max_new_tokens=max_new_tokens,
                            eos_ids=inference.eos_ids(cfg, tokenizer), pad_id=tokenizer.pad_token_id or 0,
                            peft=peft)
    answers += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]
  references = [r["output"] for r in records]
  metric = demo_task.task_metric(answers, references)
  shown = [{"verse": r["context"], "reference": ref, "answer": a}
           for r, ref, a in list(zip(records, references, answers))[:samples]]
  return {"eval_loss": loss, "exact_match": metric["exact_match"], "mentioned": metric["mentioned"],
          "samples": shown}


def plot_losses(metrics_rows: list[dict], path: str, base_eval_loss: float | None = None) -> None:
  """Train and eval loss per step; the base model's eval loss is drawn at step 0."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  train = [(r["step"], r["loss"]) for r in metrics_rows if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in metrics_rows if "eval_loss" in r]
  if base_eval_loss is not None:
    evals.insert(0, (0, base_eval_loss))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  if train:
    ax.plot(*zip(*train), marker=".", label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o", label="eval loss (held out)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (response tokens)")
  ax.set_title("jaxtune demo: LoRA on SmolLM2-135M-Instruct")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(before: dict, after: dict) -> str:
  lines = ["", f"{'':14}{'before':>10}{'after':>10}",
           f"{'eval loss':14}{before['eval_loss']:>10.4f}{after['eval_loss']:>10.4f}",
           f"{'exact match':14}{before['exact_match']:>10.2%}{after['exact_match']:>10.2%}", ""]
  for b, a in zip(before["samples"], after["samples"]):
    lines += [f"verse:  {b['verse']}", f"  reference: {b['reference']}",
              f"  before:    {b['answer']!r}", f"  after:     {a['answer']!r}"]
  return "\n".join(lines)


def write_summary(workdir: str, before: dict, after: dict) -> str:
  path = os.path.join(workdir, "demo_summary.json")
  with open(path, "w") as f:
    json.dump({"before": before, "after": after}, f, indent=2)
  return path
