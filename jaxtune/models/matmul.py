"""x @ w in the compute dtype, accumulated in float32, with every backward dot in a fast form.

XLA:CPU runs a bfloat16 dot natively (YNNPACK; AMX tiles on recent Xeons, ~4x its float32 rate)
only when the output is float32 and both operands are row-major with the contraction on the
left operand's last dimension. Any other bfloat16 dot is silently converted to float32, and
autodiff of `x @ w` produces one of those: the weight gradient x^T @ g contracts x's first
dimension, and XLA folds a transpose into the dot's dimension numbers rather than moving data.
On CPU, `matmul` asks for float32 accumulation and computes x^T with a real copy, in a custom
gradient. float32 operands take the plain `x @ w`; `weight_gradient` copies x^T for them too (the
LM head's 256 x 1024 x 8192 gradient: 325 -> 410 GFLOP/s on a 2-core AMD EPYC).

On TPU and GPU every operand takes the plain `x @ w`: their bfloat16 dots accumulate in float32
in any layout, and autodiff's dots stay visible to remat policies (`remat_policy=dots` cannot see
a dot inside a custom gradient, so it would recompute the projections in the backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cpu_layouts() -> bool:
  """Whether dots compile for XLA:CPU, whose one fast bfloat16 form the copies here exist for."""
  return jax.default_backend() == "cpu"


def matmul(x_NxK, w_KxM):
  """x @ w for 2-d x, in x's dtype; low-precision operands accumulate in float32."""
  w_KxM = w_KxM.astype(x_NxK.dtype)
  if x_NxK.dtype == jnp.float32 or not cpu_layouts():
    return x_NxK @ w_KxM
  return _low_precision_matmul(x_NxK, w_KxM)


def swapped(x, axis1: int, axis2: int):
  """x with two axes swapped, as a row-major copy on CPU (through a reshape XLA cannot fold into a
  later dot, whose low-precision form would then run in float32); a plain swap elsewhere."""
  if not cpu_layouts():
    return jnp.swapaxes(x, axis1, axis2)
  a, b = axis1 % x.ndim, axis2 % x.ndim
  shape = list(x.shape)
  shape[a], shape[b] = shape[b], shape[a]
  return jnp.swapaxes(x.reshape(x.shape + (1,)), a, b).reshape(shape)


def transposed(x_NxK):
  """x with its last two axes swapped (see `swapped`)."""
  return swapped(x_NxK, -2, -1)


def weight_gradient(x_NxK, g_NxM):
  """x^T @ g in float32 (the gradient of a weight from its input x and output cotangent g).

  The narrower of x and g is the one transposed: a LoRA A's gradient moves N x r, not N x K.
  """
  if x_NxK.shape[1] <= 4 * g_NxM.shape[1]:  # transposing g only pays when it is much narrower
    return jnp.dot(transposed(x_NxK), g_NxM, preferred_element_type=jnp.float32)
  return transposed(jnp.dot(transposed(g_NxM), x_NxK, preferred_element_type=jnp.float32))


@jax.custom_vjp
def _low_precision_matmul(x_NxK, w_KxM):
  return jnp.dot(x_NxK, w_KxM, preferred_element_type=jnp.float32).astype(x_NxK.dtype)


def _low_precision_matmul_fwd(x_NxK, w_KxM):
  return _low_precision_matmul(x_NxK, w_KxM), (x_NxK, w_KxM)


def _low_precision_matmul_bwd(residuals, g_NxM):
  x_NxK, w_KxM = residuals
  d_x = jnp.einsum("nm,km->nk", g_NxM, w_KxM, preferred_element_type=jnp.float32)
  return d_x.astype(x_NxK.dtype), weight_gradient(x_NxK, g_NxM).astype(w_KxM.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)
