"""README command one: LoRA-tune SmolLM2-135M-Instruct on the bundled task and show it learned.

  python scripts/demo.py --workdir runs/demo [--config.train.steps=40 ...]

Evaluates the held-out set before and after (eval loss, exact match, 3 samples), trains with a
progress bar and checkpoints, exports the adapter in PEFT format and plots the loss curve.
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/

from absl import app, flags, logging
from ml_collections import config_flags

from jaxtune import cli, huge_pages

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py"),
    "The demo config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output folder.")


@cli.exit_on_user_error
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from jaxtune import demo, export, trainer, workdir
  from jaxtune.config_checks import check_config
  from jaxtune.metrics_log import read_metrics
  from jaxtune.models import llama, loading
  config, out = _CONFIG.value, _WORKDIR.value
  start = time.time()
  check_config(config)
  print(f"loading {config.model.path}", flush=True)
  cfg, base = loading.load_model(config.model.path, quantize=config.model.quantize)  # as training holds it
  tokenizer = loading.load_tokenizer(config.model.path)
  print("evaluating the base model on the held-out set...", flush=True)
  before = demo.score(base, cfg, llama.PeftRuntime(), tokenizer, config.data.eval)
  print(f"before: eval loss {before['eval_loss']:.4f}, exact match {before['exact_match']:.0%} "
        f"({time.time() - start:.0f} s)", flush=True)
  trainer.run(config, out)
  params, peft = workdir.load_adapter_from_workdir(base, cfg, out)
  print(f"evaluating the fine-tuned model... ({time.time() - start:.0f} s)", flush=True)
  after = demo.score(params, cfg, peft, tokenizer, config.data.eval)
  shutil.rmtree(os.path.join(out, "peft_adapter"), ignore_errors=True)  # a rerun re-exports
  export.write_peft(os.path.join(out, "peft_adapter"), cfg, params, config.peft.method,
                    config.peft.to_dict(), config.model.path)
  demo.plot_losses(read_metrics(out), os.path.join(out, "loss_curve.png"), before["eval_loss"])
  summary = demo.write_summary(out, before, after)
  print(demo.report(before, after))
  print(f"\nwrote {out}/: checkpoints/, metrics.jsonl, loss_curve.png, peft_adapter/, {os.path.basename(summary)}"
        f"  ({time.time() - start:.0f} s)")
  print(f"to run it in llama.cpp / Ollama: python scripts/export.py --workdir {out} --out {out}_gguf --format gguf")


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages()  # CPU runs: once, before anything is allocated (see its docstring)
  app.run(main, flags_parser=cli.parse_flags)
