"""Pure loss functions and the one train step every method and objective shares.

`train_step(trainable, frozen, opt_state, batch, rng)`: gradients are taken w.r.t. the trainable
partition only; micro-batches (gradient accumulation) are scanned and the loss is token-weighted,
so 4 x 2 sequences give the same update as 8 at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxtune.models import fused_loss, llama, moe
from jaxtune.models.config import ModelConfig
from jaxtune.peft import partition

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a step (hashable)."""

  model: ModelConfig
  peft: llama.PeftRuntime = llama.PeftRuntime()
  compute_dtype: str = "float32"
  remat: str = ""  # "" (off) or a llama.REMAT_POLICIES key
  grad_accum: int = 1
  # > 0: compute logits only at the first `max_targets` weighted positions of each row. Exact when
  # no row has more weighted positions (the trainer sets it from the data); saves the LM head and
  # softmax on prompt tokens, most of a row in instruction data.
  max_targets: int = 0
  # MoE models: the loss adds this x the router load-balancing loss (moe.load_balancing_loss)
  router_aux_loss_coef: float = 0.0


def forward_logits(params, spec: StepSpec, batch: Batch, rng=None, prefix: str = "", hidden: bool = False,
                   router_stats: bool = False):
  """Logits (B x T x V), or with `hidden` the final-normed hidden states (B x T x D); with
  `router_stats` (MoE models) also the routers' statistics (llama.forward)."""
  out = llama.forward(
      params, spec.model, batch[prefix + "inputs"], batch[prefix + "positions"],
      batch[prefix + "segment_ids"], peft=spec.peft, rng=rng, remat=spec.remat,
      compute_dtype=jnp.dtype(spec.compute_dtype), return_hidden=hidden, router_stats=router_stats)
  return (out[0], out[2]) if router_stats else out[0]


def select_targets(weights_BxT, k: int):
  """Indices (B x k) of each row's first k weighted positions (then unweighted ones), in order."""
  return jnp.argsort(weights_BxT <= 0, axis=1, stable=True)[:, :k]


def at_targets(spec: StepSpec, hidden_BxTxD, targets_BxT, weights_BxT):
  """(hidden, targets, weights) at each row's first spec.max_targets weighted positions (all when 0)."""
  if not spec.max_targets or spec.max_targets >= targets_BxT.shape[1]:
    return hidden_BxTxD, targets_BxT, weights_BxT
  idx = select_targets(weights_BxT, spec.max_targets)
  return (jnp.take_along_axis(hidden_BxTxD, idx[..., None], axis=1), jnp.take_along_axis(targets_BxT, idx, 1),
          jnp.take_along_axis(weights_BxT, idx, 1))


def target_logps(params, spec: StepSpec, hidden_BxTxD, targets_BxT, weights_BxT):
  """(log p(target), weight) per position, float32, at the positions `at_targets` keeps: the LM head
  runs there only (DPO's responses, GRPO's completions)."""
  hidden, targets, weights = at_targets(spec, hidden_BxTxD, targets_BxT, weights_BxT)
  return -llama.token_nll(llama.lm_logits(params, hidden, spec.model), targets), weights


def lm_loss_sums(params, spec: StepSpec, batch: Batch, rng=None) -> tuple[jax.Array, jax.Array, Metrics]:
  """(sum of token NLL over weighted tokens, number of weighted tokens, extra metrics).

  The LM head and the loss are fused (`fused_loss`): no B x T x V logits are kept. With
  spec.router_aux_loss_coef the mean loss is NLL + coef x the router load-balancing loss, as
  transformers' MoE models compute it with output_router_logits=True.
  """
  if not spec.router_aux_loss_coef:
    hidden = forward_logits(params, spec, batch, rng, hidden=True)
  else:
    hidden, router = forward_logits(params, spec, batch, rng, hidden=True, router_stats=True)
  hidden, targets, weights = at_targets(spec, hidden, batch["targets"], batch["weights"].astype(jnp.float32))
  head = llama.head_kernel(params, hidden.dtype, spec.model)
  loss = fused_loss.weighted_nll_sum(hidden, head, targets, weights, spec.model.final_logit_softcap)
  if not spec.router_aux_loss_coef:
    return loss, jnp.sum(weights), {}
  aux = moe.load_balancing_loss(*router)
  return loss + spec.router_aux_loss_coef * aux * jnp.sum(weights), jnp.sum(weights), {"router_aux_loss": aux}


LossSums = Callable[[Any, StepSpec, Batch, Any], tuple[jax.Array, jax.Array, Metrics]]


def _micro_batches(batch: Batch, n: int) -> Batch:
  """B x ... -> n x (B/n) x ...; micro-batch i takes rows i, i+n, ... so each stays spread over the mesh."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulated_grads(loss_sums: LossSums, trainable, frozen, spec: StepSpec, batch: Batch, rng):
  """Token-weighted mean loss and its gradient w.r.t. `trainable`, over spec.grad_accum micro-batches."""

  def sums_and_grads(micro, micro_rng):
    def objective(tr):
      total, weight, metrics = loss_sums(partition.merge(tr, frozen), spec, micro, micro_rng)
      return total, (weight, metrics)
    (total, (weight, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    return total, weight, metrics, grads

  if spec.grad_accum == 1:
    total, weight, metrics, grads = sums_and_grads(batch, rng)
  else:
    micros = _micro_batches(batch, spec.grad_accum)
    rngs = jax.random.split(rng, spec.grad_accum)

    def body(carry, xs):
      total, weight, metrics, grads = sums_and_grads(*xs)
      acc = (total, weight, metrics, grads)
      return jax.tree.map(jnp.add, carry, acc), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_and_grads, jax.tree.map(lambda x: x[0], micros), rngs[0]))
    (total, weight, metrics, grads), _ = jax.lax.scan(body, zeros, (micros, rngs))
  weight = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  metrics = {k: v / spec.grad_accum for k, v in metrics.items()}
  return total / weight, weight, metrics, grads


def train_step(trainable, frozen, opt_state, batch: Batch, rng, *, spec: StepSpec,
               optimizer: optax.GradientTransformation, loss_sums: LossSums = lm_loss_sums):
  """One optimizer update. Returns (trainable, opt_state, metrics)."""
  loss, tokens, metrics, grads = accumulated_grads(loss_sums, trainable, frozen, spec, batch, rng)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  metrics = dict(metrics, loss=loss, tokens=tokens, grad_norm=optax.tree.norm(grads),
                 finite=finite.astype(jnp.float32), input_tokens=input_tokens(batch))
  return trainable, opt_state, metrics


def input_tokens(batch: Batch) -> jax.Array:
  """Non-padding input tokens of the global batch (every *segment_ids row set: DPO has two)."""
  return sum(jnp.count_nonzero(v) for k, v in batch.items() if k.endswith("segment_ids")).astype(jnp.int32)


def eval_step(trainable, frozen, batch: Batch, *, spec: StepSpec, loss_sums: LossSums = lm_loss_sums):
  """(summed loss, weight, metrics) of a batch, without gradients."""
  total, weight, metrics = loss_sums(partition.merge(trainable, frozen), spec, batch, None)
  return total, weight, metrics
