r"""Loss and perplexity of a model (+ optional adapter) on a data file.

  python scripts/evaluate.py --model MODEL [--adapter DIR] --data FILE.jsonl \
      [--data_format text|instruction|chat] [--batch_size 8] [--max_len 0] \
      [--instruction_template alpaca|chat] [--num_proc 0]

The LAST stdout line is one JSON object: {"loss", "perplexity", "tokens", "records"}.
"""

import json
import sys

from absl import app, flags

from jaxtune import cli, evaluation, huge_pages, inference
from jaxtune.data import formats

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model folder or .gguf file.", required=True)
_DATA = flags.DEFINE_string("data", None, "Data file (JSONL/JSON/CSV/parquet) or folder.", required=True)
_FORMAT = flags.DEFINE_enum("data_format", "text", ["text", "instruction", "chat"], "Record format.")
_ADAPTER = flags.DEFINE_string("adapter", None, "A train.py workdir or a PEFT adapter folder.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Records per batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Cut records to this many tokens (0 = no limit).")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "auto", list(inference.QUANTIZE_FLAG),
    "nf4/fp4: hold the base's layer kernels in 4 bits (QLoRA; *_double_quant: their scales in 8 bits too); "
    "auto: as the --adapter workdir trained.")
_NUM_PROC = flags.DEFINE_integer("num_proc", 0, "Tokenizing processes (0 = one per 5,000 records, up to the cores).")
_TEMPLATE = flags.DEFINE_enum(
    "instruction_template", None, list(formats.INSTRUCTION_TEMPLATES),
    "Prompt template of instruction records (default: chat if the tokenizer has one, else alpaca).")


def log(message: str):
  print(message, file=sys.stderr)


@cli.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  result = evaluation.evaluate_path(
      _MODEL.value, _DATA.value, _FORMAT.value, adapter=_ADAPTER.value, batch_size=_BATCH.value,
      max_len=_MAX_LEN.value, instruction_template=_TEMPLATE.value, progress=True, log=log,
      quantize=_QUANTIZE.value, num_proc=_NUM_PROC.value)
  print(json.dumps(result))


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages()  # CPU runs: once, before anything is allocated (see its docstring)
  app.run(main, flags_parser=cli.parse_flags)
