r"""Export a train.py run: a merged Hugging Face folder, a PEFT adapter folder or a llama.cpp GGUF file.

  python scripts/export.py --workdir DIR --out OUT --format hf|peft|gguf [--dtype float32|bfloat16] \
      [--max_shard_mb 5120] [--gguf_type f32|f16|bf16|q8_0]

hf:   base + trained weights, LoRA / DoRA / IA3 folded in; loads with transformers.AutoModelForCausalLM
      (a reward model: AutoModelForSequenceClassification, one label).
peft: adapter_config.json + adapter_model.safetensors (LoRA, DoRA, IA3, prefix or prompt tuning); loads with
      peft.PeftModel.from_pretrained(base_model, OUT).
gguf: OUT/model.gguf, the merged model as llama.cpp's converter writes it (Llama, Mistral, SmolLM,
      Qwen2, Qwen3, OLMo 2, Granite, Qwen2/3-MoE; byte-level BPE tokenizers), for llama.cpp, Ollama or LM Studio.
Multi-host runs: every process runs this script; process 0 writes.
"""

import json
import os
import sys

from absl import app, flags
from etils import epath

from jaxtune import cli, export, gguf_export

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py workdir (its newest checkpoint is exported).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (new or empty).", required=True)
_FORMAT = flags.DEFINE_enum("format", None, ["hf", "peft", "gguf"], "Merged HF model, PEFT adapter or GGUF file.",
                            required=True)
_GGUF_TYPE = flags.DEFINE_enum("gguf_type", "f16", list(gguf_export.GGUF_TYPES),
                               "gguf: the matrices' type (norms and biases stay f32).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "hf: weight dtype (default: the trained params' dtype).")
_MAX_SHARD_MB = flags.DEFINE_integer("max_shard_mb", export.DEFAULT_MAX_SHARD_BYTES // 2**20,
                                     "hf: safetensors shard size limit in MiB.")


@cli.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = _OUT.value
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out {out!r} exists and is not empty (export writes into a new or empty folder)")
  if _MAX_SHARD_MB.value < 1:
    raise ValueError(f"--max_shard_mb={_MAX_SHARD_MB.value} must be >= 1")
  run_config = epath.Path(_WORKDIR.value) / "config.json"  # local or gs://
  if run_config.exists():  # refuse an impossible format before loading the model
    run = json.loads(run_config.read_text())
    export.check_exportable(run["peft"]["method"], _FORMAT.value, reward_model=run.get("objective") == "reward")
  from jaxtune import workdir  # after the cheap checks: it imports the heavy training stack
  config, cfg, params, runtime, tokenizer = workdir.load_trained(_WORKDIR.value)
  method = config["peft"]["method"]
  source = config["model"]["path"]
  if _FORMAT.value == "hf":
    export.write_hf(out, cfg, params, runtime, tokenizer, source, _DTYPE.value,
                    max_shard_bytes=_MAX_SHARD_MB.value * 2**20)
  elif _FORMAT.value == "gguf":
    export.write_gguf(out, cfg, params, runtime, tokenizer, source, _GGUF_TYPE.value)
  else:
    export.write_peft(out, cfg, params, method, config["peft"], source)
  print(f"exported {method} run {_WORKDIR.value} as {_FORMAT.value} to {out}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
