"""The optimizer against torch's: AdamW with decoupled weight decay, and LoRA+'s learning rate for B."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from configs.base import get_base_config
from jaxtune.optimizer import build_optimizer


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  opt = ml_collections.ConfigDict(get_base_config().optimizer)
  opt.update(dict(learning_rate=1e-2, schedule="constant", grad_clip=0.0, weight_decay=0.1, **overrides))
  return opt


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_adamw_and_lora_plus_match_torch_param_groups(ratio):
  """Three steps on LoRA-shaped leaves: jaxtune's chain equals torch.optim.AdamW with B in its own
  group at lr x ratio (peft's create_loraplus_optimizer), decay included."""
  rng = np.random.RandomState(0)
  params = {"layers/q_proj/lora_a": rng.randn(2, 8, 4).astype(np.float32),
            "layers/q_proj/lora_b": rng.randn(2, 4, 6).astype(np.float32),
            "layers/q_proj/bias": rng.randn(2, 6).astype(np.float32)}  # no decay on biases
  grads = [{p: rng.randn(*v.shape).astype(np.float32) for p, v in params.items()} for _ in range(3)]
  opt = optimizer_config(lora_plus_ratio=ratio)
  tx = build_optimizer(opt, 3, params.keys())
  ours, state = {p: jnp.asarray(v) for p, v in params.items()}, None
  state = tx.init(ours)
  for g in grads:
    updates, state = tx.update({p: jnp.asarray(v) for p, v in g.items()}, state, ours)
    ours = optax.apply_updates(ours, updates)

  theirs = {p: torch.tensor(v, requires_grad=True) for p, v in params.items()}
  groups = [{"params": [theirs["layers/q_proj/lora_a"]], "lr": 1e-2, "weight_decay": 0.1},
            {"params": [theirs["layers/q_proj/lora_b"]], "lr": 1e-2 * ratio, "weight_decay": 0.1},
            {"params": [theirs["layers/q_proj/bias"]], "lr": 1e-2, "weight_decay": 0.0}]
  torch_opt = torch.optim.AdamW(groups, betas=(opt.b1, opt.b2), eps=opt.eps)
  for g in grads:
    for p, t in theirs.items():
      t.grad = torch.tensor(g[p])
    torch_opt.step()
  # optax's bias correction is float32 (1 - 0.999 comes out 4.7e-5 off), torch's float64: B moves
  # 0.48 at lr 0.16 and lands 3.2e-6 from the float64 result, torch's 4.6e-7
  for p in params:
    np.testing.assert_allclose(np.asarray(ours[p]), theirs[p].detach().numpy(), rtol=0, atol=1e-5, err_msg=p)
  moved = {p: np.abs(np.asarray(ours[p]) - params[p]).mean() for p in params}
  assert moved["layers/q_proj/lora_b"] > 0.5 * ratio * moved["layers/q_proj/lora_a"]


@pytest.mark.parametrize("schedule,shape,warmup,decay", [
    ("constant", "", 0, 0), ("constant", "", 4, 0), ("linear", "", 3, 0), ("cosine", "", 0, 0), ("cosine", "", 5, 0),
    ("wsd", "linear", 4, 6), ("wsd", "cosine", 0, 7), ("wsd", "1-sqrt", 3, 0)])
def test_schedules_match_transformers(schedule, shape, warmup, decay):
  """Each update's learning rate (update k uses schedule(k - 1), as torch's LambdaLR after k - 1
  scheduler steps) equals transformers' schedule of the same name, over a 30-step run."""
  import transformers
  from jaxtune.optimizer import learning_rate_schedule
  steps, lr = 30, 1e-3
  opt = optimizer_config()
  opt.update(dict(learning_rate=lr, schedule=schedule, warmup_steps=warmup, decay_steps=decay,
                  decay_shape=shape or "cosine"))
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
  if schedule == "wsd":
    theirs = transformers.get_wsd_schedule(torch_opt, warmup, decay or 3, num_training_steps=steps, decay_type=shape)
  else:
    theirs = transformers.get_scheduler(schedule if schedule != "constant" else "constant_with_warmup", torch_opt,
                                        num_warmup_steps=warmup, num_training_steps=steps)
  expected = []
  for _ in range(steps):
    expected.append(torch_opt.param_groups[0]["lr"])
    torch_opt.step()
    theirs.step()
  ours = [float(learning_rate_schedule(opt, steps)(k)) for k in range(steps)]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9)
