"""The MLP half of every MetaFormer block, `rs * x + drop_path(ls * mlp(norm2(x)))`, for TPU
training: two Pallas kernels.

XLA compiles a training MLP into five kernels around its 4C-channel hidden map (fc1 writing
the activation's input and output; fc2; in the backward pass the activation's derivative, two
weight gradients and the input gradient), which read or write that map eight times, plus the
norm's own passes: on TPU the largest share of a train step's HBM traffic. Here the forward
kernel reads x once, normalises it, and writes the block's output and fc1's output (the only
4C-channel map that reaches HBM, stored for the backward pass); the backward kernel reads x,
fc1's output and the incoming gradient once and keeps the activation, its derivative and the
hidden gradient on chip, accumulating every weight gradient as it goes.

One kernel family for every MetaFormer (`MlpForm`, `MlpParams`): PoolFormer v1's GELU MLP
with biases, layer scale and a one-group norm with a bias; the baselines' bias-free StarReLU
MLP (its scalar scale and bias trained too) after a bias-free one-group norm (PoolFormerV2,
IdentityFormer, RandFormer) or channel LayerNorm (ConvFormer, CAFormer), with a res-scaled
skip in stages 3-4. A one-group norm's backward needs per-sample sums over the whole map: one
elementwise pass outside finishes it. A channel LayerNorm's statistics and backward are each
pixel's own: the kernels compute them and nothing is left outside.

The kernels work on the map transposed to [H*W, C, N] (batch on the 128 lanes, channels on
sublanes): the layout XLA:TPU picks for most of these activations anyway, so most transposes
cost nothing, and C=64 is not padded to 128 lanes. Per-sample statistics are per-lane vectors.

Numerics: the same function as the XLA path (the block's norm, MLP, scales, drop path and
residual add): compute-dtype (bf16) matmul operands, float32 accumulation and elementwise
math, one rounding per stored value. Tested against the model's XLA path on CPU through
Pallas' interpreter (values and every gradient), and compiled for TPU ahead of time
(`main.py --mode=compile`); not yet run on a TPU.

The choice is explicit: whoever lowers the program decides once, with `for_mesh` (the trainer:
from its mesh and `config.kernels`), and hands the model a `TpuKernels` (None: the XLA path
everywhere). The model then takes the kernels (in training both, in evaluation the forward,
which then writes only the output) for the shapes that fit on chip
(`TpuKernels.fits`): per chip, a multiple of 128 samples and at least 128 per TensorCore (256
on v4 and v5p), and blocks that fit the core's VMEM (`chips`: 16 MiB on v4, where a 512-wide
stage's weight gradients do not fit next to its blocks; 64-128 MiB on v5e, v5p and v6e, where
every stage fits). Nothing here reads an ambient mesh. `TpuKernels` carries attention's
kernels (`attention_kernel`) and ConvFormer's token-mixing half (`sepconv_kernel`) the same
way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from poolformer_jax import attention_kernel, chips, ops, sepconv_kernel
from poolformer_jax.ops import INV_SQRT2, INV_SQRT_2PI

KERNEL_OPTIONS = ("auto", "xla")  # config.kernels: 'auto' takes them where they fit
_LANES = 128  # samples per kernel block: one vreg's lanes
_VMEM_SMALLEST = 16 * 2**20  # a v4 core's VMEM, the smallest of the TPUs targeted
_VMEM_RESERVE = 2 * 2**20  # left to Mosaic's own scratch: the blocks are sized for the rest


def _f32(x):
  return x.astype(jnp.float32)


def _dot(a, b, contract_b: int = 0):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1), float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class MlpForm:
  """Which MLP half the kernels compute: the block norm (`norm`: 'group', one group per sample
  over H, W, C, or 'layer', per position over C) with its `eps`, and the activation (`act`:
  'gelu', PoolFormer v1's exact GELU, or 'starrelu', the baselines' `s * relu(h)^2 + b`)."""

  norm: str = "group"
  act: str = "gelu"
  eps: float = 1e-5

  def __post_init__(self):
    if self.norm not in ("group", "layer") or self.act not in ("gelu", "starrelu"):
      raise ValueError(f"no MLP kernel for norm={self.norm!r}, act={self.act!r}")


class MlpParams(NamedTuple):
  """The MLP half's parameters, one formula for every MetaFormer:
  `rs * x + keep * ls * (w2^T act(w1^T norm(x) + b1) + b2)`, `norm(x) = yhat * gamma + beta`.
  A variant without a term passes its neutral value (zero biases, unit scales) and drops that
  gradient. `act` holds StarReLU's scalar scale and bias, shape [2] (unused by GELU)."""

  gamma: jax.Array
  beta: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array
  ls: jax.Array
  rs: jax.Array
  act: jax.Array


def _activation(h, hcols_ref, k: int, chunk: int, act: str):
  """act(h) and its derivative, and for StarReLU relu(h)^2 (the gradient of its scale)."""
  if act == "gelu":
    cdf = 0.5 * (1.0 + lax.erf(h * INV_SQRT2))
    pdf = jnp.exp(-0.5 * h * h) * INV_SQRT_2PI
    return h * cdf, cdf + h * pdf, None
  s, b = hcols_ref[k:k + chunk, 1:2], hcols_ref[k:k + chunk, 2:3]
  r = jnp.maximum(h, 0.0)
  return s * r * r + b, 2.0 * s * r, r * r


def _pixel_stats(x, stats_ref, form: MlpForm):
  """Mean and 1/std [1, L]: per sample (given) or, for a channel LayerNorm, of this pixel."""
  if form.norm == "group":
    return stats_ref[0:1], stats_ref[1:2]
  return ops.moments(x, (0,), form.eps)


# ---------------------------------------------------------------------------
# Kernels. Blocks: x, out, dout [P, C, L] and a [P, 4C, L] (P pixels of L = _LANES samples
# per grid step); per-sample rows [k, L], per-channel columns cols [C, 5] (gamma, beta, b2,
# ls, rs) and per-hidden-channel columns hcols [hid, 3] (b1, StarReLU's s and b), float32;
# weights whole. Grid (lane block j, pixel block i); the backward accumulates over i per j.
# ---------------------------------------------------------------------------


def _forward_kernel(x_ref, stats_ref, keep_ref, cols_ref, w1t_ref, hcols_ref, w2t_ref,
                    out_ref, a_ref=None, *, chunk: int, form: MlpForm):
  """a_ref: where fc1's output is stored for the backward (None in evaluation)."""
  gamma, beta, b2, ls, rs = (cols_ref[:, k:k + 1] for k in range(5))
  scale = ls * keep_ref[...]  # [C, L]
  hid = w1t_ref.shape[0]

  def pixel(p, carry):
    x = _f32(x_ref[p])
    mean, rstd = _pixel_stats(x, stats_ref, form)
    xn = ((x - mean) * rstd * gamma + beta).astype(w1t_ref.dtype)
    z = b2
    for k in range(0, hid, chunk):  # the hidden map, a chunk of channels at a time
      a = _dot(w1t_ref[k:k + chunk], xn).astype(out_ref.dtype)
      if a_ref is not None:
        a_ref[p, k:k + chunk] = a
      y, _, _ = _activation(_f32(a) + hcols_ref[k:k + chunk, 0:1], hcols_ref, k, chunk,
                            form.act)
      z = z + _dot(w2t_ref[:, k:k + chunk], y.astype(w2t_ref.dtype))
    out_ref[p] = (rs * x + z * scale).astype(out_ref.dtype)
    return carry

  lax.fori_loop(0, x_ref.shape[0], pixel, 0)


def _backward_kernel(x_ref, a_ref, dout_ref, stats_ref, keep_ref, cols_ref, w1_ref, hcols_ref,
                     w2_ref, t_ref, r_ref, dw1_ref, hacc_ref, m_ref, cacc_ref, *, chunk: int,
                     form: MlpForm):
  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in (r_ref, dw1_ref, hacc_ref, m_ref, cacc_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  keep = keep_ref[...]
  gamma, beta, ls, rs = (cols_ref[:, k:k + 1] for k in (0, 1, 3, 4))
  dtype = w1_ref.dtype
  hid = a_ref.shape[1]

  def pixel(p, carry):
    x, dout = _f32(x_ref[p]), _f32(dout_ref[p])
    mean, rstd = _pixel_stats(x, stats_ref, form)
    yhat = (x - mean) * rstd
    xn = (yhat * gamma + beta).astype(dtype)
    dk = dout * keep  # the gradient of the branch before the layer scale, [C, L]
    dz, dk16 = (dk * ls).astype(dtype), dk.astype(dtype)
    dxn = 0.0
    for k in range(0, hid, chunk):
      y, dy_dh, r2 = _activation(_f32(a_ref[p, k:k + chunk]) + hcols_ref[k:k + chunk, 0:1],
                                 hcols_ref, k, chunk, form.act)
      dy = _dot(w2_ref[k:k + chunk], dz)  # [chunk, L]
      dh = (dy * dy_dh).astype(dtype)
      dxn = dxn + _dot(w1_ref[:, k:k + chunk], dh)  # [C, L]
      dw1_ref[0, :, k:k + chunk] += _dot(xn, dh, 1)
      m_ref[0, k:k + chunk] += _dot(y.astype(dtype), dk16, 1)
      hacc_ref[0, k:k + chunk, 0:1] += jnp.sum(_f32(dh), axis=1, keepdims=True)
      if r2 is not None:
        hacc_ref[0, k:k + chunk, 1:2] += jnp.sum(dy * r2, axis=1, keepdims=True)
        hacc_ref[0, k:k + chunk, 2:3] += jnp.sum(dy, axis=1, keepdims=True)
    for col, v in enumerate((dk, dxn * yhat, dxn, dout * x)):
      cacc_ref[0, :, col:col + 1] += jnp.sum(v, axis=1, keepdims=True)
    g = dxn * gamma
    if form.norm == "layer":  # the norm's backward is this pixel's: finished here
      g = g - jnp.mean(g, axis=0, keepdims=True) - yhat * jnp.mean(g * yhat, axis=0,
                                                                    keepdims=True)
    else:  # per-sample sums over the whole map: finished outside (`_mlp_residual_bwd`)
      r_ref[0:1] += jnp.sum(g, axis=0, keepdims=True)
      r_ref[1:2] += jnp.sum(g * yhat, axis=0, keepdims=True)
    t_ref[p] = (rs * dout + rstd * g).astype(t_ref.dtype)
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


def _pixels_per_step(hw: int, c: int, hid: int, itemsize: int, vmem: int) -> int | None:
  fitting = [p for p in range(1, 33)
             if hw % p == 0 and _vmem_bytes(p, c, hid, itemsize) <= vmem - _VMEM_RESERVE]
  return max(fitting) if fitting else None


@dataclasses.dataclass(frozen=True)
class TpuKernels:
  """The kernels' setting, chosen once (`for_mesh`): the mesh they run on, one shard_map
  instance per device over `batch_axes` (None: a single device), its TensorCores per chip,
  the VMEM of each (bytes: what the blocks are sized by) and `interpret` (Pallas'
  interpreter: how the tests run them on CPU)."""

  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None
  batch_axes: tuple[str, ...] = ()
  cores: int = 1
  vmem: int = _VMEM_SMALLEST
  interpret: bool = False

  @property
  def devices(self) -> int:
    """How many devices split the batch: each runs the kernels on its own samples."""
    return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.batch_axes)

  def fits(self, shape: tuple[int, ...], hidden: int, dtype) -> bool:
    """Whether a [N, H, W, C] map of `dtype` with `hidden` MLP channels takes the kernels:
    each device's samples fill whole lane blocks, at least one per TensorCore (a megacore
    chip, v4 or v5p, splits the lane blocks between its two), and a block fits in VMEM
    (float32 maps take twice bfloat16's)."""
    n, h, w, c = shape
    return (n % (self.devices * _LANES) == 0 and n // (self.devices * _LANES) >= self.cores
            and c % 8 == 0 and hidden % 8 == 0
            and _pixels_per_step(h * w, c, hidden, jnp.dtype(dtype).itemsize,
                                 self.vmem) is not None)

  def fits_attention(self, tokens: int, channels: int, dtype) -> bool:
    """Whether attention over `tokens` with `channels` (all heads) takes its kernels: one
    sample's blocks and one head's scores fit in VMEM (CAFormer's 196 and 49 tokens do)."""
    return (attention_kernel.vmem_bytes(tokens, channels, jnp.dtype(dtype).itemsize)
            <= self.vmem - _VMEM_RESERVE)

  def fits_sepconv(self, shape: tuple[int, ...], hidden: int, size: int, dtype) -> bool:
    """Whether ConvFormer's token-mixing half of a [N, H, W, C] map (SepConv with `hidden`
    channels and a `size` x `size` depthwise conv) takes its kernels: each device's samples
    split evenly between its TensorCores, and one sample's maps fit in VMEM."""
    n, h, w, c = shape
    return (n % (self.devices * self.cores) == 0 and sepconv_kernel.fits(
        h, w, c, hidden, size, jnp.dtype(dtype).itemsize, self.vmem))

  def sepconv_residual(self, x, keep, params: sepconv_kernel.SepConvParams, eps: float):
    """`rs * x + keep * ls * sepconv(layernorm(x))` for x [N, H, W, C] (see
    `sepconv_kernel.SepConvParams`); keep as for `mlp_residual`. Call only where
    `fits_sepconv` (or interpreted)."""
    return _sepconv_residual(self, eps, x, keep, params)

  def attention(self, qkv, heads: int):
    """`attention_kernel.attention` of qkv [N, T, 3C] on each device's samples -> [N, T, C].
    Call only where `fits_attention(T, C, qkv.dtype)` (or interpreted)."""
    params = None if self.interpret else _compiler_params(self.vmem, "parallel")
    fn = lambda qkv: (attention_kernel.attention(qkv, heads, self.interpret, params),)
    return _on_mesh(self, fn, 1, 1, batch_dim=0)(qkv)[0]

  def mlp_residual(self, x, keep, params: MlpParams, form: MlpForm):
    """`rs * x + keep * ls * mlp(norm(x))` for x [N, H, W, C] (see `MlpParams`).

    keep: the per-sample drop-path factor [N] (0 or 1/(1-rate); ones without drop path).
    Call only where `fits(x.shape, hidden, x.dtype)` (or interpreted).
    """
    return _mlp_residual(self, form, x, keep, params)


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
  chip = chips.chip_of(device) if on_tpu else None
  return TpuKernels(mesh, axes, cores=(device.num_cores or 1) if on_tpu else 1,
                    vmem=chip.vmem_bytes if chip and chip.vmem_bytes else _VMEM_SMALLEST,
                    interpret=interpret)


def _compiler_params(vmem: int, *semantics):
  """Mosaic's scoped VMEM limit set to the core's VMEM, not left to its default."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem)


def _map_spec(pixels: int, channels: int):  # [P, C, N] blocks, grid (lane block j, pixels i)
  return pl.BlockSpec((pixels, channels, _LANES), lambda j, i: (i, 0, j))


def _rows_spec(rows: int):  # per-sample rows [rows, N]
  return pl.BlockSpec((rows, _LANES), lambda j, i: (0, j))


def _whole_spec(*shape):  # the same block at every step: fetched once
  return pl.BlockSpec(shape, lambda j, i: (0,) * len(shape), pipeline_mode=pl.Buffered(1))


def _partial_spec(*shape):  # one accumulator per lane block, summed afterwards
  return pl.BlockSpec((1,) + shape, lambda j, i: (j,) + (0,) * len(shape),
                      pipeline_mode=pl.Buffered(1))


def _forward_local(xt, stats, keep, cols, w1, hcols, w2, *, form, vmem, interpret,
                   store_hidden: bool = True):
  """The forward kernel: (output, fc1's output) in training, (output,) with store_hidden
  False (evaluation: x read once and the output written, nothing else)."""
  p, c, n = xt.shape
  hid = w1.shape[1]
  pixels = _pixels_per_step(p, c, hid, xt.dtype.itemsize, vmem)
  isz = xt.dtype.itemsize
  cost = pl.CostEstimate(  # matmuls, plus ~8 flops per hidden and per input element
      flops=4 * p * n * c * hid + 8 * p * n * (c + hid), transcendentals=p * n * hid,
      bytes_accessed=isz * (2 * p * c * n + store_hidden * p * hid * n + 2 * c * hid)
      + 4 * (3 * n + 5 * c + 3 * hid))
  outs = [(_map_spec(pixels, c), jax.ShapeDtypeStruct((p, c, n), xt.dtype))]
  if store_hidden:
    outs.append((_map_spec(pixels, hid), jax.ShapeDtypeStruct((p, hid, n), xt.dtype)))
  return pl.pallas_call(
      functools.partial(_forward_kernel, chunk=_chunk(hid), form=form),
      grid=(n // _LANES, p // pixels),
      in_specs=[_map_spec(pixels, c), _rows_spec(2), _rows_spec(1), _whole_spec(c, 5),
                _whole_spec(hid, c), _whole_spec(hid, 3), _whole_spec(c, hid)],
      out_specs=[spec for spec, _ in outs],
      out_shape=[shape for _, shape in outs],
      compiler_params=None if interpret else _compiler_params(vmem, "parallel", "parallel"),
      cost_estimate=cost, interpret=interpret,
  )(xt, stats, keep, cols, w1.T, hcols, w2.T)


def _backward_local(xt, at, dt, stats, keep, cols, w1, hcols, w2, *, form, vmem, interpret):
  p, c, n = xt.shape
  hid = w1.shape[1]
  pixels = _pixels_per_step(p, c, hid, xt.dtype.itemsize, vmem)
  blocks = n // _LANES
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  isz = xt.dtype.itemsize
  cost = pl.CostEstimate(  # matmuls, plus ~16 flops per hidden and per input element
      flops=8 * p * n * c * hid + 16 * p * n * (c + hid), transcendentals=2 * p * n * hid,
      bytes_accessed=isz * (3 * p * c * n + p * hid * n + 2 * c * hid)
      + 4 * (5 * n + 5 * c + 3 * hid + blocks * (2 * c * hid + 3 * hid + 4 * c)))
  t, r, dw1, hacc, m, cacc = pl.pallas_call(
      functools.partial(_backward_kernel, chunk=_chunk(hid), form=form),
      grid=(blocks, p // pixels),
      in_specs=[_map_spec(pixels, c), _map_spec(pixels, hid), _map_spec(pixels, c),
                _rows_spec(2), _rows_spec(1), _whole_spec(c, 5), _whole_spec(c, hid),
                _whole_spec(hid, 3), _whole_spec(hid, c)],
      out_specs=[_map_spec(pixels, c), _rows_spec(2), _partial_spec(c, hid),
                 _partial_spec(hid, 3), _partial_spec(hid, c), _partial_spec(c, 4)],
      out_shape=[jax.ShapeDtypeStruct((p, c, n), xt.dtype), f32(2, n), f32(blocks, c, hid),
                 f32(blocks, hid, 3), f32(blocks, hid, c), f32(blocks, c, 4)],
      compiler_params=None if interpret else _compiler_params(vmem, "parallel", "arbitrary"),
      cost_estimate=cost, interpret=interpret,
  )(xt, at, dt, stats, keep, cols, w1, hcols, w2)
  return t, r, dw1.sum(0), hacc.sum(0), m.sum(0), cacc.sum(0)


def _on_mesh(kernels: TpuKernels, fn, n_split_in: int, n_split_out: int, batch_dim: int = -1):
  """fn on each device's samples (axis `batch_dim`, by default the last, of the first
  `n_split_in` arguments and `n_split_out` results); other arguments replicated, other results
  summed over devices."""
  mesh, axes = kernels.mesh, kernels.batch_axes
  if mesh is None or not axes:
    return fn
  whole = jax.sharding.PartitionSpec()

  def split(ndim):
    dims = [None] * ndim
    dims[batch_dim] = axes
    return jax.sharding.PartitionSpec(*dims)

  def local(*args):
    out = fn(*args)
    return tuple(out[:n_split_out]) + tuple(lax.psum(o, axes) for o in out[n_split_out:])

  def wrapped(*args):
    in_specs = tuple(split(a.ndim) if i < n_split_in else whole for i, a in enumerate(args))
    outs = jax.eval_shape(fn, *args)
    out_specs = tuple(split(o.ndim) if i < n_split_out else whole for i, o in enumerate(outs))
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


def _operands(form: MlpForm, x, keep, params: MlpParams):
  """The kernels' small operands, float32: stats [2, N] (a one-group norm's per-sample mean
  and 1/std; zeros for a LayerNorm, whose statistics the kernels take per pixel), keep
  [1, N], the per-channel columns [C, 5] and the per-hidden-channel columns [hid, 3]."""
  if form.norm == "group":
    mean, rstd = ops.moments(x, (1, 2, 3), form.eps)
    stats = jnp.stack([mean.reshape(-1), rstd.reshape(-1)])
  else:
    stats = jnp.zeros((2, x.shape[0]), jnp.float32)
  p = params
  cols = jnp.stack([_f32(v) for v in (p.gamma, p.beta, p.b2, p.ls, p.rs)], axis=1)
  hid = p.w1.shape[1]
  hcols = jnp.stack([_f32(p.b1)] + [jnp.full((hid,), v) for v in _f32(p.act)], axis=1)
  return stats, _f32(keep).reshape(1, -1), cols, hcols


def _mlp_forward(kernels, form, x, keep, params, store_hidden: bool):
  operands = _operands(form, x, keep, params)
  stats, keep_row, cols, hcols = operands
  fwd = _on_mesh(kernels, functools.partial(
      _forward_local, form=form, vmem=kernels.vmem, interpret=kernels.interpret,
      store_hidden=store_hidden), 3, 1 + store_hidden)
  outs = fwd(_to_kernel(x), stats, keep_row, cols, params.w1, hcols, params.w2)
  return _from_kernel(outs[0], x.shape), outs[1:], operands


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mlp_residual(kernels, form, x, keep, params):
  return _mlp_forward(kernels, form, x, keep, params, store_hidden=False)[0]  # not differentiated


def _mlp_residual_fwd(kernels, form, x, keep, params):
  out, (a,), (stats, keep_row, cols, hcols) = _mlp_forward(kernels, form, x, keep, params,
                                                            store_hidden=True)
  return out, (x, a, stats, keep_row, cols, hcols, keep, params)


def _mlp_residual_bwd(kernels, form, res, dout):
  x, a, stats, keep_row, cols, hcols, keep, params = res
  bwd = _on_mesh(kernels, functools.partial(_backward_local, form=form, vmem=kernels.vmem,
                                            interpret=kernels.interpret), 5, 2)
  t, r, dw1, hacc, m, cacc = bwd(_to_kernel(x), a, _to_kernel(dout), stats, keep_row, cols,
                                 params.w1, hcols, params.w2)
  if form.norm == "group":
    # The norm's backward: dx = rs * dout + rstd * (g - mean(g) - yhat * mean(g * yhat)), g
    # the gradient of the normalised map times gamma; t = rs * dout + rstd * g, r = the two
    # sums. Computed in the kernels' layout: one pass over t and x.
    mean, rstd = stats[0:1], stats[1:2]
    count = x.shape[1] * x.shape[2] * x.shape[3]
    yhat = (_f32(_to_kernel(x)) - mean) * rstd
    t = (_f32(t) - rstd * (r[0:1] / count + yhat * (r[1:2] / count))).astype(x.dtype)
  dx = _from_kernel(t, x.shape)
  b2, ls = cols[:, 2], cols[:, 3]
  sum_dk, dgamma, dbeta, drs = (cacc[:, k] for k in range(4))
  grads = MlpParams(gamma=dgamma, beta=dbeta, w1=dw1, b1=hacc[:, 0], w2=m * ls, b2=sum_dk * ls,
                    ls=jnp.sum(_f32(params.w2) * m, axis=0) + b2 * sum_dk, rs=drs,
                    act=jnp.stack([jnp.sum(hacc[:, 1]), jnp.sum(hacc[:, 2])]))
  return (dx, jnp.zeros_like(keep),
          MlpParams(*(g.astype(p.dtype) for g, p in zip(grads, params))))


_mlp_residual.defvjp(_mlp_residual_fwd, _mlp_residual_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sepconv_residual(kernels, eps, x, keep, params):
  return _sepconv_residual_fwd(kernels, eps, x, keep, params)[0]


def _sepconv_residual_fwd(kernels, eps, x, keep, params):
  _, h, w, _ = x.shape
  operands = sepconv_kernel.operands(x, keep, params)
  params_ = None if kernels.interpret else _compiler_params(kernels.vmem, "parallel")
  fwd = _on_mesh(kernels, lambda *a: (sepconv_kernel.forward(
      a, h, w, eps=eps, interpret=kernels.interpret, compiler_params=params_),), 2, 1,
                 batch_dim=0)
  return fwd(*operands)[0].reshape(x.shape), (operands, x.shape, keep, params)


def _sepconv_residual_bwd(kernels, eps, res, dout):
  operands, shape, keep, params = res
  _, h, w, _ = shape
  params_ = (None if kernels.interpret
             else _compiler_params(kernels.vmem, "parallel", "arbitrary"))
  bwd = _on_mesh(kernels, lambda xf, dout, *rest: sepconv_kernel.backward(
      (xf,) + rest, dout, h, w, kernels.cores, eps=eps, layer_scale=params.ls is not None,
      interpret=kernels.interpret, compiler_params=params_), 3, 1, batch_dim=0)
  xf, keep_col, *rest = operands
  dx, *accumulators = bwd(xf, dout.reshape(xf.shape).astype(xf.dtype), keep_col, *rest)
  return (dx.reshape(shape), jnp.zeros_like(keep),
          sepconv_kernel.gradients(params, *accumulators))


_sepconv_residual.defvjp(_sepconv_residual_fwd, _sepconv_residual_bwd)
