"""CAFormer's attention core, `softmax(q k^T / sqrt(d)) v` for every head, as two Pallas kernels
that keep the scores on chip.

XLA's attention for CAFormer's 196 and 49 tokens (head_dim 32) writes float32 score-sized
arrays to HBM four times in training (the logits, the softmax and the two halves of its
backward) and copies q, k and v into head-major layouts: half of CAFormer-S18's train-step
bytes (benchmarks/results/tpu_ablations.md). One sample's scores, all heads, fit in VMEM.
Here the forward kernel reads the qkv projection's output [N, T, 3C] as it is (no head-major
copy; a head is a 32-lane slice) and writes the attention output [N, T, C]; the backward
kernel reads qkv and the output's gradient and writes the gradient of qkv, recomputing the
scores (a few matmuls on chip, instead of storing them or their log-sum-exp). The row sums
of the softmax's backward come from the recomputed probabilities, `sum_j p_ij dp_ij`, so the
forward's output is not read again.

Numerics as `jax.nn.dot_product_attention` computes them: compute-dtype operands, float32
logits and softmax, probabilities cast to the compute dtype for the second matmul. Tested in
Pallas' interpreter against it (values and gradients), and compiled for TPU ahead of time;
not yet run on a TPU. Chosen like the MLP kernels, by `mlp_kernel.TpuKernels`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def _dot(a, b, contract_a: int, contract_b: int):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _probabilities(q, k, scale):
  s = _dot(q, k, 1, 1) * scale  # [T, T] float32
  e = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
  return e / jnp.sum(e, axis=1, keepdims=True)


def _head(h: int, which: int, heads: int, d: int) -> slice:
  """Lanes of head `h` of q (which=0), k (1) or v (2) in a [T, 3C] row."""
  start = which * heads * d + h * d
  return slice(start, start + d)


def _forward_kernel(qkv_ref, o_ref, *, heads: int, d: int):
  scale = d ** -0.5
  for h in range(heads):
    q, k, v = (qkv_ref[0, :, _head(h, i, heads, d)] for i in range(3))
    p = _probabilities(q, k, scale).astype(v.dtype)
    o_ref[0, :, h * d:(h + 1) * d] = _dot(p, v, 1, 0).astype(o_ref.dtype)


def _backward_kernel(qkv_ref, do_ref, dqkv_ref, *, heads: int, d: int):
  scale = d ** -0.5
  for h in range(heads):
    q, k, v = (qkv_ref[0, :, _head(h, i, heads, d)] for i in range(3))
    do = do_ref[0, :, h * d:(h + 1) * d]
    p = _probabilities(q, k, scale)
    dp = _dot(do, v, 1, 1)
    ds = (p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))).astype(q.dtype)
    dqkv_ref[0, :, _head(h, 0, heads, d)] = (_dot(ds, k, 1, 0) * scale).astype(dqkv_ref.dtype)
    dqkv_ref[0, :, _head(h, 1, heads, d)] = (_dot(ds, q, 0, 0) * scale).astype(dqkv_ref.dtype)
    dqkv_ref[0, :, _head(h, 2, heads, d)] = _dot(p.astype(do.dtype), do, 0, 0).astype(
        dqkv_ref.dtype)


def vmem_bytes(tokens: int, channels: int, itemsize: int) -> int:
  """The backward kernel's VMEM (the larger): double-buffered qkv, output-gradient and qkv-
  gradient blocks, and ~6 float32 score-sized temporaries of one head."""
  pad = lambda n, m: -(-n // m) * m
  rows = pad(tokens, 8)
  blocks = 2 * rows * itemsize * (pad(3 * channels, 128) * 2 + pad(channels, 128))
  return blocks + 6 * 4 * rows * pad(tokens, 128)


def _call(kernel, args, out_channels: int, heads: int, d: int, *, interpret: bool,
          compiler_params, flops: int, transcendentals: int):
  n, t, _ = args[0].shape
  specs = [pl.BlockSpec((1, t, a.shape[2]), lambda b: (b, 0, 0)) for a in args]
  return pl.pallas_call(
      functools.partial(kernel, heads=heads, d=d), grid=(n,), in_specs=specs,
      out_specs=pl.BlockSpec((1, t, out_channels), lambda b: (b, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((n, t, out_channels), args[0].dtype),
      compiler_params=compiler_params, interpret=interpret,
      cost_estimate=pl.CostEstimate(
          flops=flops, transcendentals=transcendentals,
          bytes_accessed=sum(a.size * a.dtype.itemsize for a in args)
          + n * t * out_channels * args[0].dtype.itemsize),
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def attention(qkv, heads: int, interpret: bool, compiler_params):
  """[N, T, 3C] (q | k | v, each head-major, heads of C / heads channels) -> [N, T, C]."""
  return _attention_fwd(qkv, heads, interpret, compiler_params)[0]


def _attention_fwd(qkv, heads, interpret, compiler_params):
  n, t, c3 = qkv.shape
  c = c3 // 3
  d = c // heads
  out = _call(_forward_kernel, [qkv], c, heads, d, interpret=interpret,
              compiler_params=compiler_params, flops=4 * n * t * t * c,
              transcendentals=n * heads * t * t)
  return out, qkv


def _attention_bwd(heads, interpret, compiler_params, qkv, dout):
  n, t, c3 = qkv.shape
  c = c3 // 3
  d = c // heads
  dqkv = _call(_backward_kernel, [qkv, dout.astype(qkv.dtype)], c3, heads, d,
               interpret=interpret, compiler_params=compiler_params,
               flops=10 * n * t * t * c, transcendentals=n * heads * t * t)
  return (dqkv,)


attention.defvjp(_attention_fwd, _attention_bwd)
