r"""Completions of prompts with a model (+ optional adapter), KV-cache decoding.

  python scripts/generate.py --model MODEL [--adapter DIR] --prompt TEXT [--prompt TEXT ...] \
      [--max_new_tokens 64] [--temperature 0] [--top_p 1.0] [--seed 0] [--raw] [--json] \
      [--compute_dtype float32]

Prints each completion's new text (not the prompt); with --json one JSON object per prompt with
`prompt` and `completion`. Instruct models (the tokenizer has a chat template) get it unless --raw.
"""

import json

from absl import app, flags

from jaxtune import cli, huge_pages, inference, sampling
from jaxtune.config_checks import DTYPES

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model folder or .gguf file.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for a batch).", required=True)
_ADAPTER = flags.DEFINE_string("adapter", None, "A train.py workdir or a PEFT adapter folder.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most new tokens per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_RAW = flags.DEFINE_bool("raw", False, "Do not apply the chat template.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per prompt: {prompt, completion}.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "auto", list(inference.QUANTIZE_FLAG),
    "nf4/fp4: hold the base's layer kernels in 4 bits (QLoRA; *_double_quant: their scales in 8 bits too); "
    "auto: as the --adapter workdir trained.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", list(DTYPES),
                                   "Activations and KV cache (bfloat16: the matmul units of TPUs/GPUs); "
                                   "logits and sampling stay float32.")


@cli.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  sampling.check_options(_MAX_NEW.value, _TEMPERATURE.value, _TOP_P.value)
  cfg, params, peft, tokenizer = inference.load_for_inference(_MODEL.value, _ADAPTER.value, quantize=_QUANTIZE.value)
  chat = inference.has_chat_template(tokenizer) and not _RAW.value
  prompts = [sampling.prompt_ids(tokenizer, p, chat) for p in _PROMPT.value]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  outputs = sampling.generate(
      params, cfg, prompts, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value, seed=_SEED.value, eos_ids=inference.eos_ids(cfg, tokenizer),
      pad_id=pad_id, peft=peft, compute_dtype=_COMPUTE_DTYPE.value)
  for prompt, ids in zip(_PROMPT.value, outputs):
    completion = tokenizer.decode(ids, skip_special_tokens=True)
    print(json.dumps({"prompt": prompt, "completion": completion}) if _JSON.value else completion)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages()  # CPU runs: once, before anything is allocated (see its docstring)
  app.run(main, flags_parser=cli.parse_flags)
