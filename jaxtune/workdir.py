"""Reading a train.py workdir back: its resolved config and the newest checkpoint's trained params."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from jaxtune import checkpoint, objectives
from jaxtune.models import llama, loading
from jaxtune.models.config import ModelConfig
from jaxtune.optimizer import build_optimizer
from jaxtune.peft import methods, partition


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"  # local or gs://
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no config.json (not a train.py workdir)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_adapter_from_workdir(params: llama.Params, cfg: ModelConfig, workdir: str
                              ) -> tuple[llama.Params, llama.PeftRuntime]:
  """Base params + the trained leaves of the workdir's newest checkpoint (full runs: all leaves)."""
  config = read_config(workdir)
  dtype = jnp.dtype(config.precision.param_dtype)
  params = methods.add_peft(params, cfg, config.peft, jax.random.PRNGKey(0), dtype)
  params = objectives.add_params(config, params, cfg, dtype)  # e.g. a reward model's head
  trainable, frozen = partition.split(params, config.peft.method)
  manager = checkpoint.make_manager(workdir, async_save=False)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}: no complete checkpoint under {checkpoint.checkpoint_dir(workdir)}")
  optimizer = build_optimizer(config.optimizer, config.train.steps, trainable.keys())
  target = {"trainable": trainable, "opt_state": jax.eval_shape(optimizer.init, trainable),
            "rng": jax.random.PRNGKey(0)}
  state, _ = checkpoint.restore(manager, step, target)
  manager.close()
  params = partition.merge(state["trainable"], frozen)
  if config.peft.method == "prefix":  # fold a reparametrised prefix once, not at every decode step
    from jaxtune.peft import prefix
    params = prefix.fold_prefix(params, cfg)
  return params, methods.peft_runtime(config.peft)


def load_trained(workdir: str) -> tuple[dict[str, Any], ModelConfig, llama.Params, llama.PeftRuntime, Any]:
  """(config as a dict, model config, trained params, PEFT knobs, tokenizer) of a workdir."""
  config = read_config(workdir)
  dtype = jnp.dtype(config.precision.param_dtype)
  cfg, params = loading.load_model(config.model.path, dtype)
  params, peft = load_adapter_from_workdir(params, cfg, workdir)
  tokenizer = loading.load_tokenizer(config.model.tokenizer or config.model.path)
  return config.to_dict(), cfg, params, peft, tokenizer
