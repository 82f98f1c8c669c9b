"""ConvFormer's token-mixing half, `rs * x + keep * ls * sepconv(layernorm(x))`, as two Pallas
kernels for TPU, training and evaluation.

The SepConv (pointwise to 2C, StarReLU, 7x7 depthwise, pointwise back) after a channel
LayerNorm: XLA writes each 2C-channel map between its ops (the first matmul's output, the
activation's, the depthwise conv's) and reads them back, in the backward pass again with their
gradients: ~53 activation-sized transfers per block (benchmarks/results/tpu_ablations.md).
One sample's maps fit in VMEM. Here the forward kernel reads x and writes the half's output;
the backward kernel reads x and the output's gradient, recomputes the forward on chip and
writes the input's gradient, accumulating every parameter's gradient as it goes: ~5 transfers.

Layout: one grid step per sample, its map as [H*W, C] (pixels on sublanes, channels on lanes),
so both matmuls are plain [rows, C] x [C, 2C] products, taken over chunks of up to 64 pixels
so that a chunk's values stay small. The depthwise conv reads its input from a zero-padded
float32 copy in VMEM at the 49 offsets `(dy - 3) * W + (dx - 3)` of the flattened map; a tap
whose column falls outside the row is masked (the zero padding takes care of the rows). Its
transpose (the backward) is the same conv with the taps mirrored. VMEM as Mosaic allocates
it decides where the kernels fit (`fits`: every ConvFormer-S18 stage on a v4 core).

Numerics: the XLA path's (`model.SepConv` after `model.LayerNorm`): compute-dtype (bf16)
matmul operands, float32 accumulation and elementwise maths, the values XLA stores rounded to
the compute dtype. Tested in Pallas' interpreter against the block's XLA path (values and
every gradient) and compiled for TPU ahead of time; not yet run on a TPU. Chosen like the MLP
kernels, by `mlp_kernel.TpuKernels`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from poolformer_jax import ops


class SepConvParams(NamedTuple):
  """`rs * x + keep * ls * (w2^T dw(act(w1^T norm(x))))`, `norm(x) = yhat * gamma + beta`
  per pixel, `act(h) = s * relu(h)^2 + b` with act = [s, b], dw the depthwise taps
  [k, k, 2C]. A variant without a term passes its neutral value (zero bias, unit res scale);
  `ls=None`: no layer scale (ConvFormer's), which spares the backward a matmul."""

  gamma: jax.Array
  beta: jax.Array
  w1: jax.Array
  act: jax.Array
  dw: jax.Array
  w2: jax.Array
  ls: jax.Array | None
  rs: jax.Array


def _f32(x):
  return x.astype(jnp.float32)


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _rows_sum(v):
  return jnp.sum(v, axis=0, keepdims=True)


def _pad_rows(width: int, size: int) -> int:
  """Zero rows above the flattened map in the padded copies: a tap's furthest reach, 8-aligned."""
  reach = (size // 2) * width + size // 2
  return -(-reach // 8) * 8


def _padded_rows(hw: int, width: int, size: int) -> int:
  """Rows of a padded copy: the map between two pads, and an aligned load's slack below."""
  return hw + 2 * _pad_rows(width, size) + 8


def _chunk_rows(hw: int) -> int:
  """Pixels per step of the kernels' loops: a multiple of 8 that divides the map, at most 64,
  so that a chunk's values stay small; a map without one (14x14, 7x7) is one chunk. (Unrolled
  chunks would each keep their own weight-sized temporaries.)"""
  aligned = [r for r in range(8, 65, 8) if hw % r == 0]
  return max(aligned) if aligned else hw


def _for_chunks(hw: int, body) -> None:
  """body(start, rows) over the map's chunks; `start` is the int 0 for a single chunk."""
  rows = _chunk_rows(hw)
  if rows == hw:
    body(0, hw)
    return

  def step(i, carry):
    body(pl.multiple_of(i * rows, 8), rows)
    return carry

  lax.fori_loop(0, hw // rows, step, 0)


def _shifted(pad_ref, start, rows: int, width: int, size: int, dy: int, dx: int):
  """Pixels start..start+rows of the padded map shifted by tap (dy, dx)'s offset
  `(dy - k//2) * width + (dx - k//2)`: read at that offset where `start` is static, else by an
  aligned load and a static slice (Mosaic loads at dynamic offsets only when aligned)."""
  half, top = size // 2, _pad_rows(width, size)
  base = top + (dy - half) * width + (dx - half)
  if isinstance(start, int):
    return pad_ref[start + base:start + base + rows, :]
  aligned = base // 8 * 8
  window = pad_ref[pl.ds(start + aligned, rows + 8), :]
  return window[base - aligned:base - aligned + rows]


def _column_inside(start, rows: int, width: int, size: int):
  """For each dx, whether the tap's column falls inside the image row, [rows, 1]."""
  column = (lax.broadcasted_iota(jnp.int32, (rows, 1), 0) + start) % width
  half = size // 2
  return [(column + dx - half >= 0) & (column + dx - half < width) for dx in range(size)]


def _depthwise(pad_ref, taps_ref, start, rows: int, width: int, size: int, flip: bool):
  """The depthwise conv, at pixels start..start+rows, of the map held in pad_ref. Its
  transpose (flip=True) is the same conv with the taps mirrored."""
  inside = _column_inside(start, rows, width, size)
  out = None
  for dx in range(size):
    part = None
    for dy in range(size):
      tap = (size - 1 - dy) * size + (size - 1 - dx) if flip else dy * size + dx
      term = _shifted(pad_ref, start, rows, width, size, dy, dx) * taps_ref[tap:tap + 1, :]
      part = term if part is None else part + term
    part = jnp.where(inside[dx], part, 0.0)
    out = part if out is None else out + part
  return out


def _zero_pads(pad_ref, hw: int, width: int, size: int):
  top = _pad_rows(width, size)
  pad_ref[0:top, :] = jnp.zeros((top, pad_ref.shape[1]), pad_ref.dtype)
  bottom = pad_ref.shape[0] - top - hw
  pad_ref[top + hw:, :] = jnp.zeros((bottom, pad_ref.shape[1]), pad_ref.dtype)


def _normalized(x_ref, cols_ref, start, rows: int, eps: float, dtype):
  """The LayerNorm at pixels start..start+rows: yhat, 1/std and norm(x) in the compute dtype."""
  x = _f32(x_ref[0, pl.ds(start, rows), :])
  mean, rstd = ops.moments(x, (1,), eps)
  yhat = (x - mean) * rstd
  return yhat, rstd, (yhat * cols_ref[0:1, :] + cols_ref[1:2, :]).astype(dtype)


def _activations(x_ref, cols_ref, w1_ref, hrows_ref, pad_ref, r_ref, *, width, size, eps):
  """StarReLU(w1^T norm(x)) of every pixel into pad_ref, between its zero pads, and where
  r_ref is given relu(w1^T norm(x)) into it (for the backward)."""
  dtype = w1_ref.dtype
  hw, k2 = x_ref.shape[1], size * size
  top = _pad_rows(width, size)
  s, b = hrows_ref[k2:k2 + 1, :], hrows_ref[k2 + 1:k2 + 2, :]
  _zero_pads(pad_ref, hw, width, size)

  def body(start, rows):
    xn = _normalized(x_ref, cols_ref, start, rows, eps, dtype)[2]
    h = _f32(_dot(xn, w1_ref[...]).astype(dtype))  # stored by XLA in the compute dtype
    r = jnp.maximum(h, 0.0)
    pad_ref[pl.ds(top + start, rows), :] = _f32((s * r * r + b).astype(dtype))
    if r_ref is not None:
      r_ref[pl.ds(start, rows), :] = r

  _for_chunks(hw, body)


def _forward_kernel(x_ref, keep_ref, cols_ref, w1_ref, hrows_ref, w2_ref, out_ref, pad_ref, *,
                    width: int, size: int, eps: float):
  dtype = w2_ref.dtype
  _activations(x_ref, cols_ref, w1_ref, hrows_ref, pad_ref, None, width=width, size=size,
               eps=eps)
  scale, rs = keep_ref[0] * cols_ref[2:3, :], cols_ref[3:4, :]

  def body(start, rows):
    conv = _depthwise(pad_ref, hrows_ref, start, rows, width, size, flip=False)
    y = _f32(_dot(conv.astype(dtype), w2_ref[...]).astype(dtype))
    x = _f32(x_ref[0, pl.ds(start, rows), :])
    out_ref[0, pl.ds(start, rows), :] = (rs * x + scale * y).astype(out_ref.dtype)

  _for_chunks(x_ref.shape[1], body)


def _backward_kernel(x_ref, dout_ref, keep_ref, cols_ref, w1_ref, hrows_ref, w2_ref,
                     dx_ref, dw1_ref, dw2_ref, dhrows_ref, dcols_ref, pad_ref, grad_ref,
                     r_ref=None, *, width: int, size: int, eps: float, layer_scale: bool):
  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in (dw1_ref, dw2_ref, dhrows_ref, dcols_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  dtype = w1_ref.dtype
  hw, k2 = x_ref.shape[1], size * size
  top = _pad_rows(width, size)
  keep = keep_ref[0]
  gamma, ls, rs = cols_ref[0:1, :], cols_ref[2:3, :], cols_ref[3:4, :]
  _activations(x_ref, cols_ref, w1_ref, hrows_ref, pad_ref, r_ref, width=width, size=size,
               eps=eps)
  _zero_pads(grad_ref, hw, width, size)

  def through_conv(start, rows):  # the second matmul and the conv, backwards
    conv = _depthwise(pad_ref, hrows_ref, start, rows, width, size, flip=False).astype(dtype)
    x = _f32(x_ref[0, pl.ds(start, rows), :])
    dout = _f32(dout_ref[0, pl.ds(start, rows), :])
    dk = dout * keep  # the gradient of the branch before the layer scale
    if layer_scale:  # its gradient needs the branch: the second matmul once more
      y = _f32(_dot(conv, w2_ref[...]).astype(dtype))
      dcols_ref[0, 0:1, :] += _rows_sum(dk * y)
    dcols_ref[0, 1:2, :] += _rows_sum(dout * x)
    dyb = (dk * ls).astype(dtype)
    for j in range(0, conv.shape[1], 128):  # [2C, C], 128 rows at a time: small temporaries
      dw2_ref[0, j:j + 128, :] += _dot(conv[:, j:j + 128], dyb, 0, 0)
    dconv = _dot(dyb, w2_ref[...], 1, 1)  # [rows, 2C]
    grad_ref[pl.ds(top + start, rows), :] = dconv
    for dx, inside in enumerate(_column_inside(start, rows, width, size)):
      masked = jnp.where(inside, dconv, 0.0)
      for dy in range(size):  # each tap's gradient: its input (the activation) times dconv
        tap = dy * size + dx
        dhrows_ref[0, tap:tap + 1, :] += _rows_sum(
            _shifted(pad_ref, start, rows, width, size, dy, dx) * masked)

  def through_mlp(start, rows):  # StarReLU, the first matmul and the norm, backwards
    da = _depthwise(grad_ref, hrows_ref, start, rows, width, size, flip=True)
    yhat, rstd, xn = _normalized(x_ref, cols_ref, start, rows, eps, dtype)
    if r_ref is None:  # recomputed
      r = jnp.maximum(_f32(_dot(xn, w1_ref[...]).astype(dtype)), 0.0)
    else:
      r = r_ref[pl.ds(start, rows), :]
    dhrows_ref[0, k2:k2 + 1, :] += _rows_sum(da * r * r)
    dhrows_ref[0, k2 + 1:k2 + 2, :] += _rows_sum(da)
    dh = (da * (2.0 * hrows_ref[k2:k2 + 1, :] * r)).astype(dtype)
    for j in range(0, dh.shape[1], 128):  # [C, 2C], 128 columns at a time
      dw1_ref[0, :, j:j + 128] += _dot(xn, dh[:, j:j + 128], 0, 0)
    dxn = _dot(dh, w1_ref[...], 1, 1)  # [rows, C]
    dcols_ref[0, 2:3, :] += _rows_sum(dxn * yhat)
    dcols_ref[0, 3:4, :] += _rows_sum(dxn)
    g = dxn * gamma
    g = g - jnp.mean(g, axis=1, keepdims=True) - yhat * jnp.mean(g * yhat, axis=1,
                                                                  keepdims=True)
    dout = _f32(dout_ref[0, pl.ds(start, rows), :])
    dx_ref[0, pl.ds(start, rows), :] = (rs * dout + rstd * g).astype(dx_ref.dtype)

  _for_chunks(hw, through_conv)  # every dconv is in grad_ref before the transposed conv
  _for_chunks(hw, through_mlp)


# ---------------------------------------------------------------------------
# Sizing and the calls.
# ---------------------------------------------------------------------------


# Measured against Mosaic's allocation on a v4 core (16 MiB): ConvFormer-S18's four stages,
# M36's first three and B36's first two compile within 16 MiB, and the estimate below admits
# them; M36's stage 4 and B36's stages 3-4 need more, and it refuses them.
_RESERVE = 2**19


def vmem_bytes(height: int, width: int, channels: int, hidden: int, size: int,
               itemsize: int) -> int:
  """The backward kernel's VMEM (the larger), as Mosaic allocates it: double-buffered map
  blocks; the weights, their float32 gradient accumulators, the matmuls' float32 weight-
  gradient results and transposed copies; three float32 hidden maps (two padded); ~6 float32
  values of one chunk. Sublanes padded to 8, lanes to 128."""
  lanes = lambda n: -(-n // 128) * 128
  rows = lambda n: -(-n // 8) * 8
  hw = height * width
  maps = 2 * 3 * rows(hw) * lanes(channels) * itemsize
  weights = ((2 * itemsize + 8) * (channels * lanes(hidden) + hidden * lanes(channels))
             + 2 * 4 * rows(size * size + 2) * lanes(hidden))
  scratch = 4 * lanes(hidden) * (2 * _padded_rows(hw, width, size) + _keeps_relu(hw) * rows(hw))
  temps = 6 * 4 * rows(_chunk_rows(hw)) * lanes(hidden)
  return maps + weights + scratch + temps


def fits(height: int, width: int, channels: int, hidden: int, size: int, itemsize: int,
         vmem: int) -> bool:
  """Whether one sample's maps fit a core's `vmem` bytes."""
  return vmem_bytes(height, width, channels, hidden, size, itemsize) <= vmem - _RESERVE


def operands(x, keep, p: SepConvParams):
  """The kernels' operands: x as [N, H*W, C], keep [N, 1, 1], the per-channel rows [4, C]
  (gamma, beta, ls, rs), w1, the hidden rows [k*k + 2, 2C] (the taps, StarReLU's s and b)
  and w2."""
  n, h, w, c = x.shape
  size = p.dw.shape[0]
  hidden = p.w1.shape[1]
  ls = jnp.ones((c,), jnp.float32) if p.ls is None else p.ls
  cols = jnp.stack([_f32(v) for v in (p.gamma, p.beta, ls, p.rs)])  # [4, C]
  act = _f32(p.act)
  hrows = jnp.concatenate([_f32(p.dw).reshape(size * size, hidden),
                           jnp.broadcast_to(act[:, None], (2, hidden))])  # [k*k + 2, 2C]
  return (x.reshape(n, h * w, c), _f32(keep).reshape(n, 1, 1), cols, p.w1, hrows, p.w2)


def _specs(n_split: int, shapes, index):
  """Per-sample blocks for the first `n_split` operands, the whole array for the others."""
  specs = []
  for i, shape in enumerate(shapes):
    if i < n_split:
      specs.append(pl.BlockSpec((1,) + tuple(shape[1:]), lambda *g, i=i: (index(*g), 0, 0)))
    else:
      specs.append(pl.BlockSpec(tuple(shape), lambda *g, nd=len(shape): (0,) * nd,
                                pipeline_mode=pl.Buffered(1)))
  return specs


def _keeps_relu(hw: int) -> bool:
  """Whether the backward keeps relu(h) from its first pass in VMEM, or recomputes it (one
  more matmul) where the map is one chunk: with the kept copy, Mosaic's allocation for a
  14x14 stage exceeds a v4 core's 16 MiB (22.6 MiB measured)."""
  return _chunk_rows(hw) < hw


def _scratch(height: int, width: int, hidden: int, size: int, backward: bool):
  """Float32 hidden maps: the activation, zero-padded; in the backward also its gradient,
  padded, and relu(h) where it is kept."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  hw = height * width
  padded = pltpu.VMEM((_padded_rows(hw, width, size), hidden), jnp.float32)
  if not backward:
    return [padded]
  return [padded, padded] + ([pltpu.VMEM((hw, hidden), jnp.float32)] if _keeps_relu(hw) else [])


def forward(operands, height: int, width: int, *, eps: float, interpret: bool,
            compiler_params):
  """The half's output. (cols' ls row is ones where there is no layer scale.)"""
  xf, keep, cols, w1, hrows, w2 = operands
  n, hw, c = xf.shape
  hidden, size = w1.shape[1], int(round((hrows.shape[0] - 2) ** 0.5))
  isz = xf.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_forward_kernel, width=width, size=size, eps=eps),
      grid=(n,),
      in_specs=_specs(2, [a.shape for a in operands], lambda i: i),
      out_specs=pl.BlockSpec((1, hw, c), lambda i: (i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(xf.shape, xf.dtype),
      scratch_shapes=_scratch(height, width, hidden, size, False),
      compiler_params=compiler_params, interpret=interpret,
      cost_estimate=pl.CostEstimate(
          flops=n * hw * (4 * c * hidden + 2 * size * size * hidden + 10 * c + 6 * hidden),
          transcendentals=n * hw, bytes_accessed=2 * n * hw * c * isz + 4 * c * hidden * isz),
  )(*operands)


def backward(operands, dout, height: int, width: int, blocks: int, *, eps: float,
             layer_scale: bool, interpret: bool, compiler_params):
  xf, keep, cols, w1, hrows, w2 = operands
  n, hw, c = xf.shape
  hidden, size = w1.shape[1], int(round((hrows.shape[0] - 2) ** 0.5))
  per_block = n // blocks
  isz = xf.dtype.itemsize
  f32 = lambda *shape: jax.ShapeDtypeStruct((blocks,) + shape, jnp.float32)
  partial = lambda *shape: pl.BlockSpec((1,) + shape, lambda j, i: (j,) + (0,) * len(shape),
                                        pipeline_mode=pl.Buffered(1))
  args = [xf, dout, keep, cols, w1, hrows, w2]
  dx, dw1, dw2, dhrows, dcols = pl.pallas_call(
      functools.partial(_backward_kernel, width=width, size=size, eps=eps,
                        layer_scale=layer_scale),
      grid=(blocks, per_block),
      in_specs=_specs(3, [a.shape for a in args], lambda j, i: j * per_block + i),
      out_specs=[pl.BlockSpec((1, hw, c), lambda j, i: (j * per_block + i, 0, 0)),
                 partial(c, hidden), partial(hidden, c), partial(*hrows.shape),
                 partial(*cols.shape)],
      out_shape=[jax.ShapeDtypeStruct(xf.shape, xf.dtype), f32(c, hidden), f32(hidden, c),
                 f32(*hrows.shape), f32(*cols.shape)],
      scratch_shapes=_scratch(height, width, hidden, size, True),
      compiler_params=compiler_params, interpret=interpret,
      cost_estimate=pl.CostEstimate(
          # matmuls: h (twice where relu(h) is not kept), dw2, dconv, dw1, dxn (and the branch
          # for ls' gradient); convs: the forward, the taps' gradients, the transposed
          flops=n * hw * ((10 + 2 * layer_scale + 2 * (not _keeps_relu(hw))) * c * hidden
                          + 6 * size * size * hidden + 20 * c + 20 * hidden),
          transcendentals=n * hw, bytes_accessed=3 * n * hw * c * isz + 4 * c * hidden * isz
          + 4 * blocks * (2 * c * hidden + hrows.size + cols.size)),
  )(*args)
  return dx, dw1.sum(0), dw2.sum(0), dhrows.sum(0), dcols.sum(0)


def gradients(p: SepConvParams, dw1, dw2, dhrows, dcols) -> SepConvParams:
  """The parameters' gradients from the kernel's accumulators, in the parameters' dtypes."""
  size, hidden = p.dw.shape[0], p.w1.shape[1]
  k2 = size * size
  grads = SepConvParams(
      gamma=dcols[2], beta=dcols[3], w1=dw1,
      act=jnp.stack([jnp.sum(dhrows[k2]), jnp.sum(dhrows[k2 + 1])]),
      dw=dhrows[:k2].reshape(size, size, hidden), w2=dw2,
      ls=None if p.ls is None else dcols[0], rs=dcols[1])
  return SepConvParams(*(None if v is None else g.astype(v.dtype) for g, v in zip(grads, p)))
