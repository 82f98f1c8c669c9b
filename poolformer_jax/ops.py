"""The numerical kernels behind the model's layers, and the scheduling tricks they need.

`model.py` says WHAT the network computes, in the paper's terms; this module says HOW some of
it is computed fast, with the same numbers:

* `moments`, `normalize`: the norms' float32 statistics, and the norm (its backward pass
  optionally written out).
* `avg_pool_exclude_pad`: PyTorch's AvgPool2d(count_include_pad=False) as shifted sums.
* `pooling_residual`: PoolFormer's whole token-mixing step, `x + ls * (pool(n) - n)` with
  `n = norm(x)`, as one op with the norm folded in; its backward reads only x and the
  gradient.
* `gelu_exact`: PyTorch's erf GELU.
* `mlp_apply`: the channel MLP and its layer scale, with the backward pass written out.
* `materialize_grad`, `run_after`, `run_after_on_cpu`: barriers for the compilers' schedulers.

Training on TPU, a v1 block's whole MLP half (norm2 to residual add) is two Pallas kernels
instead: `mlp_kernel.py`.

What is fastest differs between XLA:CPU and the accelerators' compilers, so some choices are
made by the platform a program is LOWERED for (`lax.platform_dependent`), never by the
default backend of the process: a TPU program compiled ahead of time on a CPU host gets the
TPU's choices. Every function here is tested against its plain definition (values and
gradients) on CPU; the TPU choices were measured by compiling for a TPU topology
(benchmarks/results/tpu_ablations.md).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# ---------------------------------------------------------------------------
# Barriers.
# ---------------------------------------------------------------------------


def _cpu_barrier(token, fn, *args):
  """XLA:CPU's barrier: a conditional on one element of `token` whose branches are both fn.

  XLA:CPU turns `optimization_barrier` into control dependencies before fusion and
  scheduling, so it does not stop a recomputation from being hoisted or merged; a
  conditional does.
  """
  return lax.cond(jnp.isnan(token.ravel()[0]), fn, fn, *args)


def _barrier(token, fn, *args):
  """`fn(*args)` with its inputs tied to `token` by an optimization barrier."""
  _, args = lax.optimization_barrier((token, args))
  return fn(*args)


def run_after(token: jax.Array, fn: Callable, *args):
  """`fn(*args)`, computed only once `token` exists, and never merged with code outside it.

  Used by backward passes that recompute a forward value: without it the compiler hoists
  the recomputation into the forward pass or merges it with the forward's own copy, which
  then stays alive until the backward pass (the memory the recomputation was meant to save).
  An optimization barrier says so to the TPU and GPU compilers; XLA:CPU needs a conditional
  instead (`_cpu_barrier`), which an accelerator must not get: it would cost a
  host-visible branch and block fusion. The choice is made by the platform the program is
  lowered for. A barrier also materialises every value it holds: see `run_after_on_cpu`.
  """
  return lax.platform_dependent(*args, cpu=functools.partial(_cpu_barrier, token, fn),
                                default=functools.partial(_barrier, token, fn))


def run_after_on_cpu(token: jax.Array, fn: Callable, *args):
  """`run_after` on XLA:CPU, a plain call elsewhere: for backward passes whose inputs the
  accelerators' compilers are better left free to recompute (a norm fused into a matmul's
  input loop: a barrier would write the normalised map to HBM and read it back)."""
  return lax.platform_dependent(*args, cpu=functools.partial(_cpu_barrier, token, fn),
                                default=fn)


@jax.custom_vjp
def materialize_grad(x):
  """The identity, whose gradient XLA:CPU computes once and stores.

  Placed on each residual-stream tensor. Without it XLA:CPU leaves the gradient of the
  residual stream as a chain of elementwise ops across blocks and re-computes the whole chain
  inside every consumer, which made a training step 1.2x to 2x slower. Other compilers
  materialise that gradient anyway: for them it is the plain identity.
  """
  return x


def _materialize_grad_fwd(x):
  return x, None


def _materialize_grad_bwd(_, g):
  return (lax.platform_dependent(g, cpu=lambda g: _cpu_barrier(g, lambda g: g * 1, g),
                                 default=lambda g: g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)

# ---------------------------------------------------------------------------
# Pooling.
# ---------------------------------------------------------------------------


def _window_counts(n: int, size: int) -> np.ndarray:
  """How many of the `size` window cells centred on each of n positions lie inside [0, n)."""
  p = size // 2
  i = np.arange(n)
  return np.minimum(i + p, n - 1) - np.maximum(i - p, 0) + 1


def _inverse_counts(h: int, w: int, size: int) -> np.ndarray:
  """[h, w, 1] float32: 1 / the number of valid cells of each window (4, 6 or 9 for 3x3)."""
  inv = 1.0 / np.outer(_window_counts(h, size), _window_counts(w, size))
  return inv[:, :, None].astype(np.float32)


def _separable_window_sum(x: jax.Array, size: int) -> jax.Array:
  """Zero-padded `size` x `size` window sums as row sums, then column sums."""
  p = size // 2
  h, w = x.shape[1], x.shape[2]
  rows = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)))
  x = sum(rows[:, i:i + h] for i in range(size))
  cols = jnp.pad(x, ((0, 0), (0, 0), (p, p), (0, 0)))
  return sum(cols[:, :, j:j + w] for j in range(size))


def avg_pool_exclude_pad(x: jax.Array, size: int = 3) -> jax.Array:
  """Stride-1 `size` x `size` average that does not count padding cells, as PyTorch's
  AvgPool2d(count_include_pad=False).

  Separable zero-padded sums (rows, then columns) times a precomputed constant, the
  reciprocal of the number of valid cells (4 at corners, 6 on edges, 9 inside for 3x3).
  Flax's avg_pool is a reduce_window divided by a second reduce_window over ones; plain
  shifted adds fuse with the surrounding elementwise ops instead (5-7% of the forward pass).
  """
  inv = _inverse_counts(x.shape[1], x.shape[2], size)
  return _separable_window_sum(x, size) * jnp.asarray(inv, x.dtype)


def window_sum_separable(x: jax.Array, size: int, weights: np.ndarray | None = None):
  """float32 zero-padded `size` x `size` window sums of `x * weights` (weights [H, W, 1]):
  separable sums of a float32 copy (XLA:CPU's fastest form)."""
  xf = x.astype(jnp.float32)
  return _separable_window_sum(xf if weights is None else xf * weights, size)


def window_sum_taps(x: jax.Array, size: int, weights: np.ndarray | None = None):
  """`window_sum_separable`'s value as `size**2` shifted reads of one array padded in its own
  dtype, each converted to float32 where it is used (the TPU compiler's fastest form)."""
  p = size // 2
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  wp = None if weights is None else np.pad(weights, ((p, p), (p, p), (0, 0)))
  total = 0.0
  for i in range(size):
    for j in range(size):
      tap = xp[:, i:i + h, j:j + w].astype(jnp.float32)
      total = total + (tap if wp is None else tap * wp[i:i + h, j:j + w])
  return total


def _window_sum_f32(x: jax.Array, size: int, weights: np.ndarray | None = None) -> jax.Array:
  """float32 window sums of `x * weights`, in the form the target compiler handles best.

  The TPU compiler fuses the `size**2` shifted reads of `window_sum_taps` into the loop that
  consumes them; a separable sum, or a float32 copy to pad, is written to HBM and read back
  instead (measured: two extra passes over the map). XLA:CPU is fastest on separable sums.
  The two differ only in float32 rounding order.
  """
  return lax.platform_dependent(
      x, cpu=lambda x: window_sum_separable(x, size, weights),
      default=lambda x: window_sum_taps(x, size, weights))


def moments(x: jax.Array, axes: tuple[int, ...], eps: float):
  """Mean and 1/std of x over `axes` (kept, size 1), float32.

  Every norm of the model (`model.GroupNorm1`, `model.LayerNorm`) and every op with a norm
  folded in (`pooling_residual`, `mlp_kernel`) takes its statistics from here. PyTorch's two
  passes, E[(x - mean)^2], exact for inputs with a large mean, except for a 16-bit x reduced
  over more than its last axis (a one-group norm in bfloat16 training): one pass there,
  E[x^2] - mean^2 in float32, as Flax's `use_fast_variance`. On a TPU such a reduction
  streams the map from HBM once per pass, and XLA also wrote a float32 copy of a bfloat16 map
  between the two; over the last axis alone (a channel LayerNorm) XLA fuses both passes into
  one read, and the one-pass form measured worse (benchmarks/results/tpu_ablations.md). Its
  cancellation error, ~(mean / std)^2 * 2^-24 of the variance, is of the order of what x's
  own 8-bit mantissa already perturbs the variance by, ~(mean / std)^2 * 2^-19.
  """
  one_pass = jnp.finfo(x.dtype).bits <= 16 and {a % x.ndim for a in axes} != {x.ndim - 1}
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axes, keepdims=True)
  if one_pass:
    var = jnp.maximum(jnp.mean(jnp.square(x), axes, keepdims=True) - jnp.square(mean), 0.0)
  else:
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
  return mean, lax.rsqrt(var + eps)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, axes: tuple[int, ...],
              eps: float, dtype, *, recompute_backward: bool = False) -> jax.Array:
  """`(x - mean) * rstd * scale + bias` over `axes` (`moments`), with a per-channel (last
  axis) scale and optional bias: the norms of `model.py`. Float32 inside, `dtype` out.

  `recompute_backward`: the backward pass is written out and recomputes the normalised map
  from x once the incoming gradient exists (`run_after`). Left to autodiff, XLA shared the
  forward's float32 conversion of x with the backward and wrote it to HBM, a map twice x's
  size in bfloat16 (PoolFormerV2-S12 on a TPU v4: 6.7 MB per image,
  benchmarks/results/tpu_ablations.md); `model.GroupNorm1` says where it pays.
  """
  if recompute_backward:
    return _normalize_recomputed(x, scale, bias, axes, eps, dtype)
  return _normalize_fwd(x, scale, bias, axes, eps, dtype)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize_recomputed(x, scale, bias, axes, eps, dtype):
  return _normalize_fwd(x, scale, bias, axes, eps, dtype)[0]


def _normalize_fwd(x, scale, bias, axes, eps, dtype):
  mean, rstd = moments(x, axes, eps)
  y = (x.astype(jnp.float32) - mean) * (rstd * scale.astype(jnp.float32))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype), (x, scale, bias, mean, rstd)


def _normalize_bwd(axes, eps, dtype, res, dy):
  del eps, dtype
  return run_after(dy, functools.partial(_normalize_bwd_impl, axes), res, dy)


def _normalize_bwd_impl(axes, res, dy):
  x, scale, bias, mean, rstd = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dyf = dy.astype(jnp.float32)
  per_channel = tuple(range(x.ndim - 1))
  dscale = jnp.sum(dyf * xhat, per_channel).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(dyf, per_channel).astype(bias.dtype)
  g = dyf * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axes, keepdims=True)
               - xhat * jnp.mean(g * xhat, axes, keepdims=True))
  return dx.astype(x.dtype), dscale, dbias


_normalize_recomputed.defvjp(_normalize_fwd, _normalize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def pooling_residual(x: jax.Array, scale: jax.Array, skip: jax.Array, eps: float,
                     size: int = 3) -> jax.Array:
  """`skip * x + (avg_pool(n) - n) * ls` with `n = GroupNorm1(x)`: PoolFormer's token-mixing
  step (`skip`: the baselines' res scale, [1, 1, 1, C] float32; ones for v1's plain skip).

  The norm is a per-sample affine map of x with a per-channel gain and the pool averages
  with weights that sum to 1, so the norm's mean and bias cancel:
  `avg_pool(n) - n = (avg_pool(x) - x) * rstd(x) * norm_scale`. `scale` is
  `norm_scale * layer_scale`, optionally times the per-sample drop-path factor, shaped
  [1 or N, 1, 1, C], float32. Computed in float32 from x in its own dtype, one rounding at
  the end; the normalised map is never materialised.

  The backward pass (written out) recomputes the pool from x and needs only x, the
  per-sample statistics and the incoming gradient: two passes over them (one reduction,
  one elementwise), where autodiff stores float32 intermediates.
  """
  return _pooling_residual_fwd(x, scale, skip, eps, size)[0]


def _pooling_residual_fwd(x, scale, skip, eps, size):
  xf = x.astype(jnp.float32)
  mean, rstd = moments(x, tuple(range(1, x.ndim)), eps)
  inv = _inverse_counts(x.shape[1], x.shape[2], size)
  mixed = _window_sum_f32(x, size) * inv - xf
  return (xf * skip + mixed * (rstd * scale)).astype(x.dtype), (x, scale, skip, mean, rstd)


def _pooling_residual_bwd_impl(size, res, dy):
  x, scale, skip, mean, rstd = res
  xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
  inv = _inverse_counts(x.shape[1], x.shape[2], size)
  mixed = _window_sum_f32(x, size) * inv - xf
  r = jnp.sum(dyf * mixed, axis=(1, 2), keepdims=True)  # [N, 1, 1, C]
  dscale = jnp.sum(r * rstd, axis=0, keepdims=True) if scale.shape[0] == 1 else r * rstd
  # rstd = (var + eps)^-1/2 and d var / dx = 2 (x - mean) / M (the mean's own term is 0).
  drstd = jnp.sum(r * scale, axis=(1, 2, 3), keepdims=True)
  per_sample = -drstd * rstd ** 3 / (x.shape[1] * x.shape[2] * x.shape[3])
  # The pool's transpose: window sums of dy / count (the window is symmetric).
  pooled_t = _window_sum_f32(dy, size, inv) * scale
  dx = dyf * skip + rstd * (pooled_t - dyf * scale) + per_sample * (xf - mean)
  dskip = jnp.sum(dyf * xf, axis=(0, 1, 2), keepdims=True)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dskip.astype(skip.dtype)


def _pooling_residual_bwd(eps, size, res, dy):
  del eps
  return run_after(dy, functools.partial(_pooling_residual_bwd_impl, size), res, dy)


pooling_residual.defvjp(_pooling_residual_fwd, _pooling_residual_bwd)

# ---------------------------------------------------------------------------
# The channel MLP.
# ---------------------------------------------------------------------------


def gelu_exact(x: jax.Array) -> jax.Array:
  """GELU in PyTorch's own formula, `x/2 * (1 + erf(x / sqrt(2)))` (nn.GELU(), not tanh).

  jax.nn.gelu(approximate=False) evaluates the same function through erfc, which XLA:CPU
  computes about 2x slower than erf; this form is also the one PyTorch's CPU kernel uses.
  """
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(INV_SQRT2, x.dtype)))


# gelu's constants, here once: its cdf uses 1/sqrt(2), its derivative's pdf 1/sqrt(2 pi).
INV_SQRT2 = 1 / math.sqrt(2)
INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _sum_rows(x):
  """Sum over all but the last axis, accumulated in float32."""
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)), dtype=jnp.float32)


def _outer_sum(a, b):
  """sum over rows of a[..., i] * b[..., j]: a dense layer's weight gradient (as autodiff's)."""
  rows = tuple(range(a.ndim - 1))
  return lax.dot_general(a, b, ((rows, rows), ((), ())))


def mlp_reference(x, w1, b1, w2, b2, scale):
  """The channel MLP of PoolFormer v1 and its layer scale, as written in the release:
  `(gelu(x @ w1 + b1) @ w2 + b2) * scale`. The one reference of this maths: `mlp_apply`
  computes it with a leaner backward and `mlp_kernel` in Pallas; tests hold both to it."""
  return _fc2(jnp.dot(x, w1), b1, w2, b2, scale)


def _fc2(xw1, b1, w2, b2, scale):
  return (jnp.dot(gelu_exact(xw1 + b1), w2) + b2) * scale


@jax.custom_vjp
def mlp_apply(x, w1, b1, w2, b2, scale):
  """`(gelu(x @ w1 + b1) @ w2 + b2) * scale`: the channel MLP and its layer scale.

  Autodiff would keep the MLP's output (for the layer scale's gradient) and gelu's output
  and input (both 4C channels: the largest tensors of every block). The backward here needs
  neither the output (the layer scale's gradient comes from the fc2 weight gradient:
  `sum_k w2[k] * M[k] + b2 * sum(dout)` with `M = gelu^T @ dout`) nor, on XLA:CPU, gelu's
  output: it is recomputed inside the backward pass (in `run_after_on_cpu`, so it can be
  neither hoisted nor merged with the forward's copy): training peak memory drops by a third
  there.
  On TPU/GPU gelu's output is kept instead: their compilers evaluate erf once and store it
  either way, and reading gelu back is one pass cheaper than recomputing it (measured).
  """
  return mlp_reference(x, w1, b1, w2, b2, scale)


def _mlp_fwd(x, w1, b1, w2, b2, scale):
  xw1 = jnp.dot(x, w1)  # Stored without the bias: adding it inside gelu's loop costs nothing.

  def recompute_later(xw1):  # XLA:CPU: gelu's slot holds xw1 itself (no extra buffer).
    return _fc2(xw1, b1, w2, b2, scale), xw1, xw1

  def keep(xw1):  # The barrier makes the fc1 loop write gelu's output as the fc2 input.
    xw1, hidden = lax.optimization_barrier((xw1, gelu_exact(xw1 + b1)))
    return (jnp.dot(hidden, w2) + b2) * scale, xw1, hidden

  out, xw1, hidden = lax.platform_dependent(xw1, cpu=recompute_later, default=keep)
  return out, (x, xw1, hidden, b1, w1, w2, b2, scale)


def _mlp_bwd_impl(res, dout):
  x, xw1, hidden, b1, w1, w2, b2, scale = res
  h = xw1 + b1
  cdf = 0.5 * (1.0 + lax.erf(h * np.asarray(INV_SQRT2, h.dtype)))
  pdf = jnp.exp(-0.5 * h * h) * np.asarray(INV_SQRT_2PI, h.dtype)
  hidden = lax.platform_dependent(hidden, cpu=lambda _: h * cdf, default=lambda g: g)
  dh = jnp.dot(dout * scale, w2.T) * (cdf + h * pdf)  # d gelu(h) / dh = cdf + h * pdf
  # The weight gradients put the stored input first: XLA:CPU feeds that operand to the dot
  # through a transposed copy, and a copy of a stored array is cheap, where a copy of
  # `h * cdf` would re-evaluate erf in transposed (strided) order.
  m = _outer_sum(dout, hidden).T.astype(jnp.float32)  # [4C, C]
  sum_dout = _sum_rows(dout)
  f32 = lambda a: a.astype(jnp.float32)
  dscale = jnp.sum(f32(w2) * m, axis=0) + f32(b2) * sum_dout
  grads = (_outer_sum(x, dh), _sum_rows(dh), m * f32(scale), sum_dout * f32(scale), dscale)
  return (jnp.dot(dh, w1.T),) + tuple(
      d.astype(p.dtype) for d, p in zip(grads, (w1, b1, w2, b2, scale)))


def _mlp_bwd(res, dout):
  return run_after_on_cpu(dout, _mlp_bwd_impl, res, dout)


mlp_apply.defvjp(_mlp_fwd, _mlp_bwd)
