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


def torch_newton_schulz_float32(grad, ns_coefficients, ns_steps, eps):
  """torch.optim.Muon's iteration (torch/optim/_muon.py) without its cast to bfloat16."""
  a, b, c = ns_coefficients
  x = grad.float()
  if grad.size(0) > grad.size(1):
    x = x.T
  x = x / x.norm().clamp(min=eps)
  for _ in range(ns_steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if grad.size(0) > grad.size(1) else x


@pytest.mark.parametrize("torch_precision,atol", [("bfloat16", 5e-4), ("float32", 2e-6)])
def test_muon_matches_torch_muon_and_adamw(monkeypatch, torch_precision, atol):
  """optimizer.name=muon: each layer's in x out kernel follows torch's Muon (adjust_lr_fn=
  "match_rms_adamw", on the out x in weight as nn.Linear holds it), the embedding and norms torch's
  AdamW (no decay on norms), over 3 steps of random gradients. torch orthogonalizes in bfloat16 and
  jaxtune in float32 (one Muon update moves an entry by ~1e-2 here); with torch's iteration run in
  float32 the two agree to float32 rounding."""
  if torch_precision == "float32":
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", torch_newton_schulz_float32)
  rng = np.random.default_rng(0)
  L, lr, wd = 2, 1e-2, 0.1
  shapes = {"layers/mlp/up_proj/kernel": (L, 16, 24), "layers/mlp/down_proj/kernel": (L, 24, 16),
            "layers/input_layernorm": (L, 16), "embed_tokens": (10, 16)}
  params = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
  grads = [{p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()} for _ in range(3)]
  opt = optimizer_config(name="muon")
  opt.learning_rate, opt.weight_decay = lr, wd
  tx = build_optimizer(opt, 3, params.keys())
  state = tx.init(params)

  matrices = {(p, i): torch.nn.Parameter(torch.tensor(np.asarray(params[p][i]).T.copy()))
              for p in shapes if p.endswith("kernel") for i in range(L)}
  norm = torch.nn.Parameter(torch.tensor(np.asarray(params["layers/input_layernorm"])))
  embed = torch.nn.Parameter(torch.tensor(np.asarray(params["embed_tokens"])))
  muon = torch.optim.Muon(list(matrices.values()), lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                          adjust_lr_fn="match_rms_adamw")
  adamw = torch.optim.AdamW([{"params": [embed], "weight_decay": wd}, {"params": [norm], "weight_decay": 0.0}],
                            lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps)
  for g in grads:
    updates, state = tx.update({p: jnp.asarray(v) for p, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    for (p, i), w in matrices.items():
      w.grad = torch.tensor(g[p][i].T.copy())
    norm.grad, embed.grad = torch.tensor(g["layers/input_layernorm"]), torch.tensor(g["embed_tokens"])
    muon.step()
    adamw.step()
  for (p, i), w in matrices.items():
    np.testing.assert_allclose(np.asarray(params[p][i]), w.detach().numpy().T, atol=atol, err_msg=f"{p}[{i}]")
  np.testing.assert_allclose(params["layers/input_layernorm"], norm.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["embed_tokens"], embed.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_muon_full_fine_tuning_reduces_the_loss(tiny_setup, tmp_path):
  from jaxtune import trainer
  from train_helpers import losses, tiny_config
  rows = trainer.run(tiny_config(*tiny_setup, **{"peft.method": "full", "optimizer.name": "muon",
                                                 "optimizer.learning_rate": 2e-2}), str(tmp_path))
  series = losses(rows)
  assert series[-1] < series[0] - 0.5, series
