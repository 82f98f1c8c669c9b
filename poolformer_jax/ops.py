"""The numerical kernels behind the model's layers, and the scheduling tricks they need.

`model.py` says WHAT the network computes, in the paper's terms; this module says HOW some of
it is computed fast, with the same numbers:

* `avg_pool_exclude_pad`: PyTorch's AvgPool2d(count_include_pad=False) as shifted sums.
* `gelu_exact`: PyTorch's erf GELU.
* `mlp_apply`: the channel MLP with a backward pass that recomputes its widest activation.
* `materialize_grad`, `run_after`: barriers for XLA:CPU's scheduler. They are chosen by the
  platform a program is lowered for (`lax.platform_dependent`): a GPU or TPU program gets
  plain code, even when it is compiled ahead of time on a CPU host.

Every function here is tested against its plain definition (values and gradients).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

def _window_counts(n: int, size: int) -> np.ndarray:
  """How many of the `size` window cells centred on each of n positions lie inside [0, n)."""
  p = size // 2
  i = np.arange(n)
  return np.minimum(i + p, n - 1) - np.maximum(i - p, 0) + 1


def avg_pool_exclude_pad(x: jax.Array, size: int = 3) -> jax.Array:
  """Stride-1 `size` x `size` average that does not count padding cells, as PyTorch's
  AvgPool2d(count_include_pad=False).

  Separable zero-padded sums (rows, then columns) times a precomputed constant, the
  reciprocal of the number of valid cells (4 at corners, 6 on edges, 9 inside for 3x3).
  Flax's avg_pool is a reduce_window divided by a second reduce_window over ones; plain
  shifted adds fuse with the surrounding elementwise ops instead (5-7% of the forward pass).
  """
  p = size // 2
  h, w = x.shape[1], x.shape[2]
  rows = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)))
  x = sum(rows[:, i:i + h] for i in range(size))
  cols = jnp.pad(x, ((0, 0), (0, 0), (p, p), (0, 0)))
  x = sum(cols[:, :, j:j + w] for j in range(size))
  inv = 1.0 / np.outer(_window_counts(h, size), _window_counts(w, size))
  return x * jnp.asarray(inv[:, :, None], x.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
  """GELU in PyTorch's own formula, `x/2 * (1 + erf(x / sqrt(2)))` (nn.GELU(), not tanh).

  jax.nn.gelu(approximate=False) evaluates the same function through erfc, which XLA:CPU
  computes about 2x slower than erf; this form is also the one PyTorch's CPU kernel uses.
  """
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype)))


_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def run_after(token: jax.Array, fn: Callable, *args):
  """`fn(*args)`, scheduled only once `token` exists, and never merged with code outside it.

  In a program lowered for CPU this is a conditional on one element of `token` whose
  branches are both `fn`. It is the barrier XLA:CPU respects: it turns
  `optimization_barrier` (which jax.checkpoint relies on) into control dependencies before
  fusion and scheduling, so a backward-pass recomputation gets hoisted into the forward pass
  or merged with the forward's own copy, and chains of elementwise gradient ops get
  re-fused (and re-computed) into every consumer.

  For any other platform (GPU, TPU) it is a plain call: there a conditional costs a
  host-visible branch and blocks fusion. The choice is made by the platform the program is
  LOWERED for (`lax.platform_dependent`), not by the default backend of the process, so a
  TPU program compiled ahead of time on a CPU host never gets the CPU's conditional.
  """
  def on_cpu(*args):
    return lax.cond(jnp.isnan(token.ravel()[0]), fn, fn, *args)

  return lax.platform_dependent(*args, cpu=on_cpu, default=fn)


def _sum_rows(x):
  """Sum over all but the last axis, accumulated in float32."""
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)), dtype=jnp.float32)


def _outer_sum(a, b):
  """sum over rows of a[..., i] * b[..., j]: a dense layer's weight gradient (as autodiff's)."""
  rows = tuple(range(a.ndim - 1))
  return lax.dot_general(a, b, ((rows, rows), ((), ())))


@jax.custom_vjp
def mlp_apply(x, w1, b1, w2, b2):
  """`gelu(x @ w1 + b1) @ w2 + b2` whose backward keeps only x and `x @ w1`.

  Autodiff keeps gelu's output (the fc2 input, 4C channels: the largest tensor of every
  block) alive until the backward pass. Here the backward recomputes it, in the same
  elementwise pass as gelu's derivative, inside `run_after` so XLA:CPU can neither hoist the
  recomputation nor merge it with the forward's: training peak memory drops by a third.
  """
  return jnp.dot(gelu_exact(jnp.dot(x, w1) + b1), w2) + b2


def _mlp_fwd(x, w1, b1, w2, b2):
  xw1 = jnp.dot(x, w1)  # Stored without the bias: adding it inside gelu's loop costs nothing.
  return jnp.dot(gelu_exact(xw1 + b1), w2) + b2, (x, xw1, b1, w1, w2)


def _mlp_bwd_impl(res, g):
  x, xw1, b1, w1, w2 = res
  h = xw1 + b1
  cdf = 0.5 * (1.0 + lax.erf(h * np.asarray(_INV_SQRT2, h.dtype)))
  pdf = jnp.exp(-0.5 * h * h) * np.asarray(_INV_SQRT_2PI, h.dtype)
  dh = jnp.dot(g, w2.T) * (cdf + h * pdf)  # d gelu(h) / dh = cdf + h * pdf
  # The weight gradients put the stored input first: XLA:CPU feeds that operand to the dot
  # through a transposed copy, and a copy of a stored array is cheap, where a copy of
  # `h * cdf` would re-evaluate erf in transposed (strided) order.
  grads = (_outer_sum(x, dh), _sum_rows(dh), _outer_sum(g, h * cdf).T, _sum_rows(g))
  return (jnp.dot(dh, w1.T),) + tuple(d.astype(w.dtype) for d, w in zip(grads, (w1, b1, w2, w2)))


def _mlp_bwd(res, g):
  return run_after(g, _mlp_bwd_impl, res, g)


mlp_apply.defvjp(_mlp_fwd, _mlp_bwd)


@jax.custom_vjp
def materialize_grad(x):
  """The identity, whose gradient is computed once and stored (see `run_after`).

  Placed on each residual-stream tensor. Without it XLA:CPU leaves the gradient of the
  residual stream as a chain of elementwise ops across blocks and re-computes the whole chain
  inside every consumer, which made a training step 1.2x to 2x slower.
  """
  return x


def _materialize_grad_fwd(x):
  return x, None


def _materialize_grad_bwd(_, g):
  return (run_after(g, lambda g: g * 1, g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)
