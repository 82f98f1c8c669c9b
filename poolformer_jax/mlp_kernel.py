"""The second half of a PoolFormer v1 block, `x + drop_path(ls * mlp(norm2(x)))`, for TPU
training: two Pallas kernels.

XLA compiles a training MLP into five kernels around its 4C-channel hidden map (fc1 writing
gelu's input and output; fc2; in the backward pass the gelu derivative, two weight gradients
and the input gradient), which read or write that map eight times, plus the norm's own
passes: on TPU the largest share of a train step's HBM traffic. Here the forward kernel
reads x once, normalises it, and writes the block's output and fc1's output (the only
4C-channel map that reaches HBM, stored for the backward pass); the backward kernel reads x,
fc1's output and the incoming gradient once and keeps gelu, its derivative and the hidden
gradient on chip, accumulating every weight gradient as it goes. One elementwise pass outside
finishes the norm's backward (it needs per-sample sums over the whole map).

The kernels work on the map transposed to [H*W, C, N] (batch on the 128 lanes, channels on
sublanes): the layout XLA:TPU picks for most of these activations anyway, so most transposes
cost nothing, and C=64 is not padded to 128 lanes. Per-sample statistics are per-lane vectors.

Numerics: the same function as the XLA path (`GroupNorm1`, `ops.mlp_apply`, drop path,
residual add): compute-dtype (bf16) matmul operands, float32 accumulation and elementwise
math, one rounding per stored value. Tested against the model's XLA path on CPU through
Pallas' interpreter (values and every gradient), and compiled for TPU ahead of time
(`main.py --mode=compile`); not yet run on a TPU.

The choice is explicit: whoever lowers the program decides once, with `for_mesh` (the trainer:
from its mesh and `config.kernels`), and hands the model a `TpuKernels` (None: the XLA path
everywhere). The model then takes the kernels in training for the shapes that fit on chip
(`TpuKernels.fits`): per chip, a multiple of 128 samples and at least 128 per TensorCore (256
on v4 and v5p); S12's first three stages (the fourth's weight gradients do not fit a v4
core's 16 MiB of VMEM next to its blocks). Nothing here reads an ambient mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from poolformer_jax import ops
from poolformer_jax.ops import INV_SQRT2, INV_SQRT_2PI

KERNEL_OPTIONS = ("auto", "xla")  # config.kernels: 'auto' takes them where they fit
_LANES = 128  # samples per kernel block: one vreg's lanes
_VMEM_LIMIT = 16 * 2**20  # a v4 core's VMEM, the smallest of the TPUs targeted
_VMEM_BUDGET = 14 * 2**20  # what the blocks are sized for: the rest is Mosaic's own scratch


def _f32(x):
  return x.astype(jnp.float32)


def _dot(a, b, contract_b: int = 0):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1), float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _gelu_parts(a, b1):
  h = _f32(a) + b1
  cdf = 0.5 * (1.0 + lax.erf(h * INV_SQRT2))
  return h, cdf


# ---------------------------------------------------------------------------
# Kernels. Blocks: x, out, dout [P, C, L] and a [P, 4C, L] (P pixels of L = _LANES samples
# per grid step); per-sample rows [k, L] and per-channel columns [C, k], float32; weights
# whole. Grid (lane block j, pixel block i); the backward accumulates over i per j.
# ---------------------------------------------------------------------------


def _forward_kernel(x_ref, stats_ref, keep_ref, cols_ref, w1t_ref, b1_ref, w2t_ref,
                    out_ref, a_ref, *, chunk: int):
  mean, rstd = stats_ref[0:1], stats_ref[1:2]
  gamma, beta, b2, ls = (cols_ref[:, k:k + 1] for k in range(4))
  scale = ls * keep_ref[...]  # [C, L]
  hid = a_ref.shape[1]

  def pixel(p, carry):
    x = _f32(x_ref[p])
    xn = ((x - mean) * rstd * gamma + beta).astype(w1t_ref.dtype)
    z = b2
    for k in range(0, hid, chunk):  # the hidden map, a chunk of channels at a time
      a = _dot(w1t_ref[k:k + chunk], xn).astype(a_ref.dtype)
      a_ref[p, k:k + chunk] = a
      h, cdf = _gelu_parts(a, b1_ref[k:k + chunk])
      z = z + _dot(w2t_ref[:, k:k + chunk], (h * cdf).astype(w2t_ref.dtype))
    out_ref[p] = (x + z * scale).astype(out_ref.dtype)
    return carry

  lax.fori_loop(0, x_ref.shape[0], pixel, 0)


def _backward_kernel(x_ref, a_ref, dout_ref, stats_ref, keep_ref, cols_ref, w1_ref, b1_ref,
                     w2_ref, t_ref, r_ref, dw1_ref, db1_ref, m_ref, cacc_ref, *, chunk: int):
  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in (r_ref, dw1_ref, db1_ref, m_ref, cacc_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  mean, rstd = stats_ref[0:1], stats_ref[1:2]
  keep = keep_ref[...]
  gamma, beta, ls = cols_ref[:, 0:1], cols_ref[:, 1:2], cols_ref[:, 3:4]
  dtype = w1_ref.dtype
  hid = a_ref.shape[1]

  def pixel(p, carry):
    x, dout = _f32(x_ref[p]), _f32(dout_ref[p])
    yhat = (x - mean) * rstd
    xn = (yhat * gamma + beta).astype(dtype)
    dk = dout * keep  # the gradient of the branch before the layer scale, [C, L]
    dz, dk16 = (dk * ls).astype(dtype), dk.astype(dtype)
    dxn = 0.0
    for k in range(0, hid, chunk):
      h, cdf = _gelu_parts(a_ref[p, k:k + chunk], b1_ref[k:k + chunk])
      pdf = jnp.exp(-0.5 * h * h) * INV_SQRT_2PI
      dh = (_dot(w2_ref[k:k + chunk], dz) * (cdf + h * pdf)).astype(dtype)  # [chunk, L]
      dxn = dxn + _dot(w1_ref[:, k:k + chunk], dh)  # [C, L]
      dw1_ref[0, :, k:k + chunk] += _dot(xn, dh, 1)
      m_ref[0, k:k + chunk] += _dot((h * cdf).astype(dtype), dk16, 1)
      db1_ref[0, k:k + chunk] += jnp.sum(_f32(dh), axis=1, keepdims=True)
    cacc_ref[0, :, 0:1] += jnp.sum(dk, axis=1, keepdims=True)
    cacc_ref[0, :, 1:2] += jnp.sum(dxn * yhat, axis=1, keepdims=True)
    cacc_ref[0, :, 2:3] += jnp.sum(dxn, axis=1, keepdims=True)
    g = dxn * gamma
    r_ref[0:1] += jnp.sum(g, axis=0, keepdims=True)
    r_ref[1:2] += jnp.sum(g * yhat, axis=0, keepdims=True)
    t_ref[p] = (dout + rstd * g).astype(t_ref.dtype)
    return carry

  lax.fori_loop(0, x_ref.shape[0], pixel, 0)


# ---------------------------------------------------------------------------
# Blocking and the calls.
# ---------------------------------------------------------------------------


def relative_difference(a, b) -> float:
  """Largest |a - b| relative to b's largest magnitude: how far a kernel's tensor is from the
  reference's, in units that mean the same for an activation and a weight gradient."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def _chunk(hid: int) -> int:
  """Hidden channels per step of a kernel's inner loop: float32 temporaries stay small."""
  return max(d for d in range(8, min(hid, 512) + 1, 8) if hid % d == 0)


def _vmem_bytes(pixels: int, c: int, hid: int, itemsize: int) -> int:
  """The backward kernel's VMEM (the larger of the two), as Mosaic allocates it: double-
  buffered map blocks and single-buffered weights of `itemsize` bytes (the compute dtype),
  float32 accumulators, float32 temporaries of one chunk of one pixel, columns padded to 128
  lanes."""
  lanes_pad = lambda n: -(-n // 128) * 128
  maps = 2 * pixels * _LANES * itemsize * (3 * c + hid)
  weights = 2 * c * hid * itemsize + 4 * (c * hid + hid * lanes_pad(c))
  columns = 4 * 128 * (2 * c + 2 * hid)
  temps = 4 * _LANES * (8 * _chunk(hid) + 8 * c)
  return maps + weights + columns + temps


def _pixels_per_step(hw: int, c: int, hid: int, itemsize: int) -> int | None:
  fitting = [p for p in range(1, 33)
             if hw % p == 0 and _vmem_bytes(p, c, hid, itemsize) <= _VMEM_BUDGET]
  return max(fitting) if fitting else None


@dataclasses.dataclass(frozen=True)
class TpuKernels:
  """The kernels' setting, chosen once (`for_mesh`): the mesh they run on, one shard_map
  instance per device over `batch_axes` (None: a single device), its TensorCores per chip,
  and `interpret` (Pallas' interpreter: how the tests run them on CPU)."""

  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None
  batch_axes: tuple[str, ...] = ()
  cores: int = 1
  interpret: bool = False

  def fits(self, shape: tuple[int, ...], hidden: int, dtype) -> bool:
    """Whether a [N, H, W, C] map of `dtype` with `hidden` MLP channels takes the kernels:
    each device's samples fill whole lane blocks, at least one per TensorCore (a megacore
    chip, v4 or v5p, splits the lane blocks between its two), and a block fits in VMEM
    (float32 maps take twice bfloat16's)."""
    n, h, w, c = shape
    devices = 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.batch_axes)
    return (n % (devices * _LANES) == 0 and n // (devices * _LANES) >= self.cores
            and c % 8 == 0 and hidden % 8 == 0
            and _pixels_per_step(h * w, c, hidden, jnp.dtype(dtype).itemsize) is not None)

  def mlp_residual(self, x, keep, gamma, beta, w1, b1, w2, b2, ls, eps: float):
    """`x + keep * ls * mlp(GroupNorm1(x))` (mlp: fc1, exact gelu, fc2) for x [N, H, W, C].

    keep: the per-sample drop-path factor [N] (0 or 1/(1-rate); ones without drop path).
    Call only where `fits(x.shape, hidden, x.dtype)` (or interpreted).
    """
    return _mlp_residual(self, x, keep, gamma, beta, w1, b1, w2, b2, ls, eps)


def for_mesh(mesh: jax.sharding.Mesh, batch_axes: Sequence[str], option: str = "auto", *,
             interpret: bool = False) -> TpuKernels | None:
  """The kernels for programs lowered on `mesh` with the batch split over `batch_axes`: None
  (the XLA path) unless `option` is 'auto' and the mesh is made of TPUs (or `interpret`:
  Pallas' interpreter on any device, for tests)."""
  if option not in KERNEL_OPTIONS:
    raise ValueError(f"kernels={option!r}; use one of {KERNEL_OPTIONS}")
  device = mesh.abstract_mesh.abstract_device
  on_tpu = device is not None and device.platform == "tpu"
  if option == "xla" or not (on_tpu or interpret):
    return None
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
  return TpuKernels(mesh, axes, cores=(device.num_cores or 1) if on_tpu else 1,
                    interpret=interpret)


def _compiler_params(*semantics):
  """Mosaic's scoped VMEM limit set to what the blocks are sized for, not left to its default."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=_VMEM_LIMIT)


def _map_spec(pixels: int, channels: int):  # [P, C, N] blocks, grid (lane block j, pixels i)
  return pl.BlockSpec((pixels, channels, _LANES), lambda j, i: (i, 0, j))


def _rows_spec(rows: int):  # per-sample rows [rows, N]
  return pl.BlockSpec((rows, _LANES), lambda j, i: (0, j))


def _whole_spec(*shape):  # the same block at every step: fetched once
  return pl.BlockSpec(shape, lambda j, i: (0,) * len(shape), pipeline_mode=pl.Buffered(1))


def _partial_spec(*shape):  # one accumulator per lane block, summed afterwards
  return pl.BlockSpec((1,) + shape, lambda j, i: (j,) + (0,) * len(shape),
                      pipeline_mode=pl.Buffered(1))


def _forward_local(xt, stats, keep, cols, w1, b1, w2, *, interpret):
  p, c, n = xt.shape
  hid = w1.shape[1]
  pixels = _pixels_per_step(p, c, hid, xt.dtype.itemsize)
  isz = xt.dtype.itemsize
  cost = pl.CostEstimate(  # matmuls, plus ~8 flops per hidden and per input element
      flops=4 * p * n * c * hid + 8 * p * n * (c + hid), transcendentals=p * n * hid,
      bytes_accessed=isz * (2 * p * c * n + p * hid * n + 2 * c * hid)
      + 4 * (3 * n + 4 * c + hid))
  return pl.pallas_call(
      functools.partial(_forward_kernel, chunk=_chunk(hid)), grid=(n // _LANES, p // pixels),
      in_specs=[_map_spec(pixels, c), _rows_spec(2), _rows_spec(1), _whole_spec(c, 4),
                _whole_spec(hid, c), _whole_spec(hid, 1), _whole_spec(c, hid)],
      out_specs=[_map_spec(pixels, c), _map_spec(pixels, hid)],
      out_shape=[jax.ShapeDtypeStruct((p, c, n), xt.dtype),
                 jax.ShapeDtypeStruct((p, hid, n), xt.dtype)],
      compiler_params=None if interpret else _compiler_params("parallel", "parallel"),
      cost_estimate=cost, interpret=interpret,
  )(xt, stats, keep, cols, w1.T, b1.reshape(-1, 1), w2.T)


def _backward_local(xt, at, dt, stats, keep, cols, w1, b1, w2, *, interpret):
  p, c, n = xt.shape
  hid = w1.shape[1]
  pixels = _pixels_per_step(p, c, hid, xt.dtype.itemsize)
  blocks = n // _LANES
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  isz = xt.dtype.itemsize
  cost = pl.CostEstimate(  # matmuls, plus ~16 flops per hidden and per input element
      flops=8 * p * n * c * hid + 16 * p * n * (c + hid), transcendentals=2 * p * n * hid,
      bytes_accessed=isz * (3 * p * c * n + p * hid * n + 2 * c * hid)
      + 4 * (5 * n + 4 * c + hid + blocks * (2 * c * hid + hid + 3 * c)))
  t, r, dw1, db1, m, cacc = pl.pallas_call(
      functools.partial(_backward_kernel, chunk=_chunk(hid)), grid=(blocks, p // pixels),
      in_specs=[_map_spec(pixels, c), _map_spec(pixels, hid), _map_spec(pixels, c),
                _rows_spec(2), _rows_spec(1), _whole_spec(c, 4), _whole_spec(c, hid),
                _whole_spec(hid, 1), _whole_spec(hid, c)],
      out_specs=[_map_spec(pixels, c), _rows_spec(2), _partial_spec(c, hid),
                 _partial_spec(hid, 1), _partial_spec(hid, c), _partial_spec(c, 3)],
      out_shape=[jax.ShapeDtypeStruct((p, c, n), xt.dtype), f32(2, n), f32(blocks, c, hid),
                 f32(blocks, hid, 1), f32(blocks, hid, c), f32(blocks, c, 3)],
      compiler_params=None if interpret else _compiler_params("parallel", "arbitrary"),
      cost_estimate=cost, interpret=interpret,
  )(xt, at, dt, stats, keep, cols, w1, b1.reshape(-1, 1), w2)
  return t, r, dw1.sum(0), db1.sum(0)[:, 0], m.sum(0), cacc.sum(0)


def _on_mesh(kernels: TpuKernels, fn, n_split_in: int, n_split_out: int):
  """fn on each device's samples (the last axis of the first `n_split_in` arguments and
  `n_split_out` results); other arguments replicated, other results summed over devices."""
  mesh, axes = kernels.mesh, kernels.batch_axes
  if mesh is None or not axes:
    return fn
  split, whole = jax.sharding.PartitionSpec, jax.sharding.PartitionSpec()

  def local(*args):
    out = fn(*args)
    return tuple(out[:n_split_out]) + tuple(lax.psum(o, axes) for o in out[n_split_out:])

  def wrapped(*args):
    in_specs = tuple(split(*([None] * (a.ndim - 1)), axes) if i < n_split_in else whole
                     for i, a in enumerate(args))
    outs = jax.eval_shape(fn, *args)
    out_specs = tuple(split(*([None] * (o.ndim - 1)), axes) if i < n_split_out else whole
                      for i, o in enumerate(outs))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)

  return wrapped


# ---------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------


def _to_kernel(x):  # [N, H, W, C] -> [H*W, C, N]
  n, h, w, c = x.shape
  return jnp.transpose(x, (1, 2, 3, 0)).reshape(h * w, c, n)


def _from_kernel(xt, shape):  # [H*W, C', N] -> [N, H, W, C']
  n, h, w, _ = shape
  return jnp.transpose(xt.reshape(h, w, xt.shape[1], n), (3, 0, 1, 2))


def _moments(x, eps):
  """GroupNorm1's per-sample mean and 1/std, shaped [N]."""
  mean, rstd = ops.moments(x, (1, 2, 3), eps)
  return mean.reshape(-1), rstd.reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 10))
def _mlp_residual(kernels, x, keep, gamma, beta, w1, b1, w2, b2, ls, eps):
  return _mlp_residual_fwd(kernels, x, keep, gamma, beta, w1, b1, w2, b2, ls, eps)[0]


def _per_sample(x, keep, gamma, beta, b2, ls, eps):
  """The kernels' small operands: stats [2, N] (mean, 1/std), keep [1, N] and the
  per-channel columns [C, 4] (gamma, beta, b2, ls), float32."""
  mean, rstd = _moments(x, eps)
  cols = jnp.stack([_f32(v) for v in (gamma, beta, b2, ls)], axis=1)
  return jnp.stack([mean, rstd]), _f32(keep).reshape(1, -1), cols


def _mlp_residual_fwd(kernels, x, keep, gamma, beta, w1, b1, w2, b2, ls, eps):
  stats, keep_row, cols = _per_sample(x, keep, gamma, beta, b2, ls, eps)
  fwd = _on_mesh(kernels, functools.partial(_forward_local, interpret=kernels.interpret), 3, 2)
  out, a = fwd(_to_kernel(x), stats, keep_row, cols, w1, _f32(b1), w2)
  return _from_kernel(out, x.shape), (x, a, stats, keep_row, cols, keep, gamma, beta, w1, b1,
                                      w2, b2, ls)


def _mlp_residual_bwd(kernels, eps, res, dout):
  del eps
  x, a, stats, keep_row, cols, keep, *params = res
  _, _, w1, b1, w2, _, _ = params
  bwd = _on_mesh(kernels, functools.partial(_backward_local, interpret=kernels.interpret), 5, 2)
  t, r, dw1, db1, m, cacc = bwd(_to_kernel(x), a, _to_kernel(dout), stats, keep_row, cols,
                                w1, _f32(b1), w2)
  # The norm's backward: dx = dout + rstd * (g - mean(g) - yhat * mean(g * yhat)), g the
  # gradient of the normalised map times gamma; t = dout + rstd * g, r = the two sums.
  # Computed in the kernels' layout: one pass over t and x.
  mean, rstd = stats[0:1], stats[1:2]
  count = x.shape[1] * x.shape[2] * x.shape[3]
  yhat = (_f32(_to_kernel(x)) - mean) * rstd
  dx = _from_kernel((_f32(t) - rstd * (r[0:1] / count + yhat * (r[1:2] / count))).astype(x.dtype),
                    x.shape)
  _, _, b2, ls = (cols[:, k] for k in range(4))
  sum_dk, dgamma, dbeta = cacc[:, 0], cacc[:, 1], cacc[:, 2]
  dls = jnp.sum(_f32(w2) * m, axis=0) + b2 * sum_dk
  grads = (dgamma, dbeta, dw1, db1, m * ls, sum_dk * ls, dls)
  return ((dx, jnp.zeros_like(keep))
          + tuple(g.astype(p.dtype) for g, p in zip(grads, params)))


_mlp_residual.defvjp(_mlp_residual_fwd, _mlp_residual_bwd)
