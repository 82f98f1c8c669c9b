"""MetaFormer in Flax NNX: PoolFormer and the MetaFormer baselines in one skeleton.

Every model is a stem conv, four stages of residual blocks
`x = rs1 * x + ls1 * mixer(norm1(x))`, `x = rs2 * x + ls2 * mlp(norm2(x))` with a strided conv
between stages, and a head. What differs between the two releases is `MetaFormerConfig.version`:

* version 1, PoolFormer (arXiv 2111.11418): one-group GroupNorm with bias (eps 1e-5), exact (erf)
  GELU MLP with biases, layer scale, no norm around the stem and downsampling convs,
  head = GroupNorm -> mean(H, W) -> linear.
* version 2, the MetaFormer baselines (arXiv 2210.13452): IdentityFormer, RandFormer,
  PoolFormerV2, ConvFormer and CAFormer. Bias-free block norms (eps 1e-6) and a bias-free MLP
  with StarReLU, res scale on the skip of stages 3-4, a channel LayerNorm after the stem and
  before each downsampling conv, head = mean(H, W) -> LayerNorm -> linear or MLP head.

Both are faithful to the released PyTorch code at inference: symmetric explicit conv padding,
pooling that does not count padding cells, float32 norm statistics (with PyTorch's two-pass
variance in float32). Layout is NHWC.

Parameter paths follow timm's module names (`stem.norm`, `stages.i.downsample.norm`,
`stages.i.blocks.j.token_mixer.qkv`, `...mlp.act.scale`, `...res_scale1.scale`) with Flax's leaf
names (`kernel`, norm `scale`) and the release's head (`norm`, then `head` or `head.fc1`,
`head.norm`, `head.fc2`): timm's `head.norm.*` is our `norm.*`, timm's `head.fc.*` our `head.*`.

Variants are data: `VARIANTS` maps a name to a `MetaFormerConfig`; `create_model` builds one.
The token mixer of each stage is a config field, so the papers' ablations are the same skeleton
with other mixers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from poolformer_jax import mlp_kernel, ops, sepconv_kernel

Dtype = Any

# ---------------------------------------------------------------------------
# Configuration: one frozen dataclass per variant.
# ---------------------------------------------------------------------------

NORMS = ("group", "layer")
HEADS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class MetaFormerConfig:
  """Everything that defines a MetaFormer variant. Fields are what the papers vary."""

  depths: tuple[int, ...] = (2, 2, 6, 2)
  widths: tuple[int, ...] = (64, 128, 320, 512)
  # One of TOKEN_MIXERS for every stage, or a tuple with one per stage.
  token_mixer: str | tuple[str, ...] = "pooling"
  mixer_size: int = 3  # pool window / depthwise kernel (SepConv: 7)
  head_dim: int = 32  # attention mixer: channels per head (heads = width // head_dim)
  mlp_ratio: float = 4.0
  # 1: PoolFormer's details; 2: the MetaFormer baselines' (see the module docstring).
  version: int = 1
  norm: str = "group"  # block norms: "group" (one group: over H, W, C) or "layer" (over C)
  norm_eps: float = 1e-5
  layer_scale_init: float | None = 1e-5  # None: no layer scale on the branches
  # Per stage: None, or the init of a learnable per-channel scale on the skip path (res scale).
  res_scale_init: tuple[float | None, ...] | None = None
  drop_path_rate: float = 0.1  # rate of the LAST block; earlier ones scale linearly from 0
  head: str = "linear"  # "linear" or "mlp" (fc1 -> SquaredReLU -> LayerNorm -> fc2)
  head_dropout: float = 0.0  # dropout before the (last) linear layer of the head, in training
  # The MLP head's LayerNorm eps: the release uses PyTorch's default 1e-5, timm 1e-6.
  head_norm_eps: float = 1e-5
  in_channels: int = 3
  num_classes: int = 1000
  # Eval preprocessing of the release: resize short side to floor(size / crop_pct), center crop.
  crop_pct: float = 0.9

  def __post_init__(self):
    n = len(self.depths)
    if len(self.widths) != n:
      raise ValueError(f"depths {self.depths} and widths {self.widths} must have the same length")
    mixers = self.stage_token_mixers
    if len(mixers) != n:
      raise ValueError(f"token_mixer {self.token_mixer} must name one mixer or one per stage "
                       f"({n} stages)")
    for m in mixers:
      if m not in TOKEN_MIXERS:
        raise ValueError(f"unknown token_mixer {m!r}; valid: {sorted(TOKEN_MIXERS)}")
    if self.res_scale_init is not None and len(self.res_scale_init) != n:
      raise ValueError(f"res_scale_init {self.res_scale_init} must have one entry per stage ({n})")
    for name, value, valid in (("version", self.version, (1, 2)), ("norm", self.norm, NORMS),
                               ("head", self.head, HEADS)):
      if value not in valid:
        raise ValueError(f"{name}={value!r}; valid: {list(valid)}")
    for name in ("drop_path_rate", "head_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")

  @property
  def stage_token_mixers(self) -> tuple[str, ...]:
    if isinstance(self.token_mixer, str):
      return (self.token_mixer,) * len(self.depths)
    return tuple(self.token_mixer)

  @property
  def has_frozen_params(self) -> bool:
    """Whether some parameters are never trained (see `frozen_mask`)."""
    return "random" in self.stage_token_mixers

  @property
  def num_blocks(self) -> int:
    return sum(self.depths)

  def block_drop_rates(self) -> list[float]:
    """Stochastic-depth rate of each block: `rate * k / (n_blocks - 1)` for global index k."""
    n = self.num_blocks
    if n == 1:
      return [self.drop_path_rate]
    return [self.drop_path_rate * k / (n - 1) for k in range(n)]


# ---------------------------------------------------------------------------
# Initialisers that reproduce the release's.
# ---------------------------------------------------------------------------

# The release uses timm's trunc_normal_(std=.02) whose bounds are ABSOLUTE +-2, i.e. +-100 sigma:
# a plain normal in practice. jax's truncated_normal bounds are in sigmas, so we use normal().
_dense_init = nnx.initializers.normal(stddev=0.02)


def _torch_conv_bias_init(fan_in: int):
  """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
_torch_conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# ---------------------------------------------------------------------------
# Norms.
# ---------------------------------------------------------------------------


class GroupNorm1(nnx.Module):
  """One-group GroupNorm: statistics over (H, W, C) together, per-channel affine.

  This is NOT a channel LayerNorm (which normalises over C only). PoolFormer v1 uses PyTorch's
  eps 1e-5 and a bias; the v2 family 1e-6 and no bias (`use_bias=False`). Statistics are
  float32 whatever the compute dtype (`ops.moments`: PyTorch's two-pass variance, one pass
  for a one-group norm of a bfloat16 map). `moments` is public so a block can fold the
  normalisation into what follows (see `MetaFormerBlock`).

  `recompute_backward` takes `ops.normalize`'s recomputing backward, for norms next to a
  convolution (the stem and downsampling layers), which XLA does not fuse them into: left to
  autodiff it wrote a float32 copy of x to HBM for the backward. A norm before a matmul is
  left to autodiff: XLA fuses it into the matmul's input loops, where the backward's barrier
  would cost bytes instead (S12 on a TPU v4, every norm recomputed: +1.3 MB per image).
  """

  def __init__(self, num_features: int, eps: float, *, use_bias: bool = True,
               recompute_backward: bool = False, dtype, param_dtype, rngs=None):
    del rngs  # Deterministic init (ones / zeros), like nnx.GroupNorm's.
    self.eps = eps
    self.dtype = dtype
    self.recompute_backward = recompute_backward
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None

  def reduction_axes(self, x) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))

  def moments(self, x):
    """Mean and 1/std over `reduction_axes`, float32, with those axes kept (size 1)."""
    return ops.moments(x, self.reduction_axes(x), self.eps)

  def __call__(self, x):
    bias = None if self.bias is None else self.bias[...]
    return ops.normalize(x, self.scale[...], bias, self.reduction_axes(x), self.eps, self.dtype,
                         recompute_backward=self.recompute_backward)


class LayerNorm(GroupNorm1):
  """LayerNorm over the channels (the last axis) only, per position; same numerics otherwise.

  The v2 family's stem / downsampling norms and ConvFormer / CAFormer block norms (no bias,
  eps 1e-6) and its head norms (with bias). Written here rather than `nnx.LayerNorm` so every
  norm of the model shares one implementation of its float32 statistics.
  """

  def reduction_axes(self, x) -> tuple[int, ...]:
    return (x.ndim - 1,)


def group_norm(num_features: int, eps: float, *, dtype, param_dtype, rngs) -> GroupNorm1:
  return GroupNorm1(num_features, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _block_norm(dim: int, cfg: MetaFormerConfig, **kw) -> GroupNorm1:
  """norm1 / norm2 of a block: with a bias in v1, without in v2."""
  cls = GroupNorm1 if cfg.norm == "group" else LayerNorm
  return cls(dim, cfg.norm_eps, use_bias=cfg.version == 1, **kw)

# ---------------------------------------------------------------------------
# Stem and downsampling.
# ---------------------------------------------------------------------------


class ConvDown(nnx.Module):
  """Strided conv with symmetric explicit padding (the stem and the downsampling layers).

  "SAME" padding on a strided conv pads asymmetrically in XLA; PyTorch pads both sides
  equally, so the padding is spelled out. `norm` adds the v2 family's bias-free channel
  LayerNorm, "post" (after the conv: the stem) or "pre" (before it: downsampling); v2 also
  initialises the conv as the rest of its weights (normal(0.02), zero bias) where v1 keeps
  PyTorch's Conv2d default.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *,
               norm: str | None = None, norm_eps: float = 1e-6, dtype, param_dtype,
               rngs: nnx.Rngs):
    fan_in = in_ch * kernel * kernel
    if norm is None:
      init = dict(kernel_init=_torch_conv_kernel_init, bias_init=_torch_conv_bias_init(fan_in))
    else:
      init = dict(kernel_init=_dense_init, bias_init=nnx.initializers.zeros_init())
    self.conv = nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                         padding=((padding, padding), (padding, padding)), **init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_first = norm == "pre"
    self.norm = None if norm is None else LayerNorm(
        in_ch if self.norm_first else out_ch, norm_eps, use_bias=False, recompute_backward=True,
        dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    if self.norm is not None and self.norm_first:
      x = self.norm(x)
    x = self.conv(x)
    if self.norm is not None and not self.norm_first:
      x = self.norm(x)
    return x

# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------


def squared_relu(x):
  """relu(x)^2, the MLP head's activation (no parameters)."""
  return jnp.square(jax.nn.relu(x))


class StarReLU(nnx.Module):
  """`scale * relu(x)^2 + bias` with a learnable scalar scale and bias (shape (1,) each)."""

  def __init__(self, *, scale: float = 1.0, bias: float = 0.0, param_dtype):
    self.scale = nnx.Param(jnp.full((1,), scale, param_dtype))
    self.bias = nnx.Param(jnp.full((1,), bias, param_dtype))

  def __call__(self, x):
    return (self.scale[...].astype(x.dtype) * squared_relu(x)
            + self.bias[...].astype(x.dtype))

# ---------------------------------------------------------------------------
# Token mixers.
# ---------------------------------------------------------------------------


class Pooling(nnx.Module):
  """PoolFormer's token mixer: `avg_pool(x) - x`, stride 1, padding cells not counted.

  The `- x` is there because the block's residual adds x back: the block then computes
  `x + ls * (pool(x) - x)`, i.e. it moves each token towards its neighbourhood mean.
  No parameters.
  """

  def __init__(self, dim: int, size: int = 3, **_):
    del dim
    self.size = size

  def __call__(self, x):
    return ops.avg_pool_exclude_pad(x, self.size) - x


class Identity(nnx.Module):
  """No token mixing at all: the papers' lower bound for the skeleton (IdentityFormer)."""

  def __init__(self, dim: int, size: int = 3, **_):
    del dim, size

  def __call__(self, x):
    return x


class DepthwiseConv(nnx.Module):
  """A learnable k x k depthwise conv as the token mixer (one of the paper's ablations)."""

  def __init__(self, dim: int, size: int = 3, *, dtype, param_dtype, rngs: nnx.Rngs):
    p = size // 2
    self.conv = nnx.Conv(dim, dim, (size, size), padding=((p, p), (p, p)),
                         feature_group_count=dim, kernel_init=_torch_conv_kernel_init,
                         bias_init=_torch_conv_bias_init(size * size),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


def _dense(in_f: int, out_f: int, *, use_bias: bool = False, dtype, param_dtype, rngs):
  """A linear layer initialised as the v2 release's (normal(0.02), zero bias)."""
  return nnx.Linear(in_f, out_f, use_bias=use_bias, kernel_init=_dense_init,
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


class SepConv(nnx.Module):
  """ConvFormer's mixer, MobileNetV2's inverted separable conv, all bias-free:
  pointwise to 2C -> StarReLU -> k x k depthwise conv -> pointwise back to C.
  """

  def __init__(self, dim: int, size: int = 7, *, expansion: int = 2, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mid = expansion * dim
    p = size // 2
    self.size = size
    self.pwconv1 = _dense(dim, mid, **kw)
    self.act1 = StarReLU(param_dtype=param_dtype)
    self.dwconv = nnx.Conv(mid, mid, (size, size), padding=((p, p), (p, p)),
                           feature_group_count=mid, use_bias=False, kernel_init=_dense_init,
                           **kw)
    self.pwconv2 = _dense(mid, dim, **kw)

  def __call__(self, x):
    return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


class Attention(nnx.Module):
  """CAFormer's mixer: multi-head self-attention over the H*W tokens, no biases, no position
  embedding (so any input size works). The qkv kernel's output columns are [q | k | v], each
  head-major (timm's `reshape(B, N, 3, heads, head_dim)`); tokens are row-major (h * W + w).
  """

  def __init__(self, dim: int, head_dim: int = 32, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head_dim = head_dim
    self.num_heads = max(dim // head_dim, 1)
    inner = self.num_heads * head_dim
    self.qkv = _dense(dim, 3 * inner, **kw)
    self.proj = _dense(inner, dim, **kw)

  def __call__(self, x, kernels: mlp_kernel.TpuKernels | None = None):
    """`kernels`: the attention core as its TPU kernels (the block decides where they fit)."""
    b, h, w, c = x.shape
    qkv = self.qkv(x.reshape(b, h * w, c))
    if kernels is not None:
      out = kernels.attention(qkv, self.num_heads)
    else:
      qkv = qkv.reshape(b, h * w, 3, self.num_heads, self.head_dim)
      # Scale 1/sqrt(head_dim); logits and softmax in float32 whatever the compute dtype.
      out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, h * w, -1)).reshape(b, h, w, c)


# RandFormer's matrices are drawn for 224 x 224 input (stage maps 14 x 14 and 7 x 7), as released.
RANDOM_MIXING_INPUT_SIZE = 224


class RandomMixing(nnx.Module):
  """RandFormer's mixer: `out[m] = sum_n R[m, n] x[n]` over the H*W tokens with a fixed random
  row-stochastic R (softmax of uniform noise), one per block.

  R is an `nnx.Param` so it is saved and loaded with the other parameters (the released
  matrices were drawn without a seed: they cannot be regenerated), but it is never trained:
  its gradient is stopped here and the optimizer leaves it alone (see `frozen_mask`).
  """

  def __init__(self, num_tokens: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    del dtype
    noise = jax.random.uniform(rngs.params(), (num_tokens, num_tokens), jnp.float32)
    self.random_matrix = nnx.Param(jax.nn.softmax(noise, axis=-1).astype(param_dtype))

  def __call__(self, x):
    b, h, w, c = x.shape
    n = self.random_matrix.shape[0]
    if h * w != n:
      side = math.isqrt(n)
      raise ValueError(
          f"RandFormer mixes a fixed {side}x{side} token map here (its random matrices are "
          f"{n}x{n}, drawn for {RANDOM_MIXING_INPUT_SIZE}x{RANDOM_MIXING_INPUT_SIZE} input), "
          f"but got a {h}x{w} map: resize or crop the images to "
          f"{RANDOM_MIXING_INPUT_SIZE}x{RANDOM_MIXING_INPUT_SIZE}")
    r = lax.stop_gradient(self.random_matrix[...]).astype(x.dtype)
    return jnp.einsum("mn,bnc->bmc", r, x.reshape(b, n, c)).reshape(b, h, w, c)


# name -> builder(dim, cfg, stage, *, dtype, param_dtype, rngs).
TOKEN_MIXERS: dict[str, Callable[..., nnx.Module]] = {
    "pooling": lambda dim, cfg, stage, **kw: Pooling(dim, cfg.mixer_size),
    "identity": lambda dim, cfg, stage, **kw: Identity(dim),
    "dwconv": lambda dim, cfg, stage, **kw: DepthwiseConv(dim, cfg.mixer_size, **kw),
    "sepconv": lambda dim, cfg, stage, **kw: SepConv(dim, cfg.mixer_size, **kw),
    "attention": lambda dim, cfg, stage, **kw: Attention(dim, cfg.head_dim, **kw),
    "random": lambda dim, cfg, stage, **kw: RandomMixing(
        (RANDOM_MIXING_INPUT_SIZE // 2 ** (stage + 2)) ** 2, **kw),
}
# Parameters that are loaded and saved but never trained (leaf names).
FROZEN_PARAMS = frozenset({"random_matrix"})


def frozen_mask(params) -> Any:
  """True for each leaf of a parameter tree (a pure dict, as the trainer holds) that is frozen."""
  def frozen(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) in FROZEN_PARAMS

  return jax.tree_util.tree_map_with_path(frozen, params)

# ---------------------------------------------------------------------------
# Channel MLPs and the block.
# ---------------------------------------------------------------------------


class Mlp(nnx.Module):
  """PoolFormer v1's MLP: 1x1 conv -> exact GELU -> 1x1 conv, as dense layers over channels (NHWC).

  fc1 and fc2 stay `nnx.Linear` modules (parameter paths `mlp.fc1.kernel`, ...); the call
  goes through `ops.mlp_apply`, whose backward pass moves and keeps less than autodiff's.
  """

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(kernel_init=_dense_init, bias_init=nnx.initializers.zeros_init(),
              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)
    self.dtype = dtype

  def __call__(self, x, layer_scale: jax.Array | None = None):
    """`fc2(gelu(fc1(x)))`, times `layer_scale` (C,) when given (its gradient costs less
    inside `ops.mlp_apply` than outside)."""
    dtype = self.dtype or x.dtype
    if layer_scale is None:
      layer_scale = jnp.ones((self.fc2.out_features,), dtype)
    return ops.mlp_apply(x.astype(dtype), *self.weights(dtype), layer_scale.astype(dtype))

  def weights(self, dtype) -> list[jax.Array]:
    """fc1's kernel and bias, fc2's kernel and bias, in the compute dtype."""
    return [p[...].astype(dtype) for p in (self.fc1.kernel, self.fc1.bias, self.fc2.kernel,
                                           self.fc2.bias)]


class StarReLUMlp(nnx.Module):
  """The v2 family's MLP: fc1 -> StarReLU -> fc2, no biases (`mlp.fc1`, `mlp.act`, `mlp.fc2`)."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = _dense(dim, hidden, **kw)
    self.act = StarReLU(param_dtype=param_dtype)
    self.fc2 = _dense(hidden, dim, **kw)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Scale(nnx.Module):
  """Learnable per-channel scale, shape (C,): layer scale on a branch, res scale on a skip."""

  def __init__(self, dim: int, init: float, *, param_dtype):
    self.scale = nnx.Param(jnp.full((dim,), init, param_dtype))

  def __call__(self, x):
    return x * self.scale[...].astype(x.dtype)


def _maybe_scale(dim: int, init: float | None, param_dtype) -> Scale | None:
  return None if init is None else Scale(dim, init, param_dtype=param_dtype)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero the whole residual branch of a sample with probability `rate`.

  Kept samples are scaled by 1/(1-rate) so the expectation is unchanged. `key=None` means
  inference: the identity.
  """
  factor = drop_path_factor(x.shape, rate, key)
  if factor is None:
    return x
  return jnp.where(factor > 0, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path_factor(shape: tuple[int, ...], rate: float, key: jax.Array | None):
  """`drop_path` as a per-sample float32 factor, 0 or 1/(1-rate) (None: the identity)."""
  if key is None or rate == 0.0:
    return None
  mask = jax.random.bernoulli(key, 1.0 - rate, (shape[0],) + (1,) * (len(shape) - 1))
  return mask.astype(jnp.float32) / (1.0 - rate)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Elementwise dropout (the head's), scaled by 1/(1-rate); `key=None` means inference."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, jnp.zeros_like(x))


class MetaFormerBlock(nnx.Module):
  """`x = rs1 * x + drop_path(ls1 * mixer(norm1(x)))`, then the same with `mlp(norm2(x))`.

  Layer scales `ls` (v1) and res scales `rs` (v2, stages 3-4) are absent where the config has
  none. Both branches share the block's drop-path rate, as in the releases.

  Each half computes that formula. Its faster forms are chosen here, once, from the config and
  from `kernels` (what the caller lowers for; None: XLA everywhere), never from the ambient
  mesh: a pooling mixer after a one-group norm is one fused op (`fused_pooling`), every MLP
  half (v1's GELU MLP or the baselines' StarReLU one, after either norm) runs on the TPU
  kernels (`mlp_kernel`) where its shape fits them, and attention's core
  (`attention_kernel`) and ConvFormer's whole token-mixing half (`sepconv_kernel`) run as
  their kernels where they fit, in training and evaluation.
  """

  def __init__(self, dim: int, cfg: MetaFormerConfig, stage: int, drop_rate: float, *,
               dtype, param_dtype, rngs: nnx.Rngs,
               kernels: mlp_kernel.TpuKernels | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mixer = TOKEN_MIXERS[cfg.stage_token_mixers[stage]]
    res_init = None if cfg.res_scale_init is None else cfg.res_scale_init[stage]
    mlp_cls = Mlp if cfg.version == 1 else StarReLUMlp
    self.drop_rate = drop_rate
    self.norm1 = _block_norm(dim, cfg, **kw)
    self.token_mixer = mixer(dim, cfg, stage, **kw)
    self.layer_scale1 = _maybe_scale(dim, cfg.layer_scale_init, param_dtype)
    self.res_scale1 = _maybe_scale(dim, res_init, param_dtype)
    self.norm2 = _block_norm(dim, cfg, **kw)
    self.mlp = mlp_cls(dim, int(dim * cfg.mlp_ratio), **kw)
    self.layer_scale2 = _maybe_scale(dim, cfg.layer_scale_init, param_dtype)
    self.res_scale2 = _maybe_scale(dim, res_init, param_dtype)
    pooling = cfg.stage_token_mixers[stage] == "pooling"
    self.fused_pooling = pooling and cfg.norm == "group"
    self.kernels = kernels
    self.mlp_form = mlp_kernel.MlpForm(norm=cfg.norm, act="gelu" if cfg.version == 1
                                       else "starrelu", eps=cfg.norm_eps)

  def mix(self, x, key: jax.Array | None = None):
    """`x + drop_path(ls1 * token_mixer(norm1(x)))`: the token-mixing half of the block.

    `fused_pooling`: the norm is a per-channel affine map of x and the pool averages with
    weights that sum to 1, so the norm's mean and bias cancel in
    `pool(norm(x)) - norm(x) = rstd * scale * (pool(x) - x)`, and `ops.pooling_residual`
    computes statistics, pool, layer scale, drop path, res scale and residual add as one loop
    over x; the normalised map is never materialised. (A channel LayerNorm has per-position
    statistics, which do not cancel.)
    """
    if isinstance(self.token_mixer, SepConv) and "mix" in self.kernel_halves(x):
      return self._sepconv_kernel(x, key)
    if not self.fused_pooling:
      h = self.norm1(x)
      if isinstance(self.token_mixer, Attention):
        kernels = self.kernels if "mix" in self.kernel_halves(x) else None
        branch = self.token_mixer(h, kernels)
      else:
        branch = self.token_mixer(h)
      return self._residual(x, branch, self.layer_scale1, self.res_scale1, self.drop_rate, key)
    scale = self.norm1.scale[...].astype(jnp.float32)
    if self.layer_scale1 is not None:
      scale = scale * self.layer_scale1.scale[...].astype(jnp.float32)
    scale = scale.reshape(1, 1, 1, -1)
    keep = drop_path_factor(x.shape, self.drop_rate, key)
    if keep is not None:
      scale = scale * keep
    skip = (jnp.ones_like(scale[:1]) if self.res_scale1 is None
            else self.res_scale1.scale[...].astype(jnp.float32).reshape(1, 1, 1, -1))
    return ops.pooling_residual(x, scale, skip, self.norm1.eps, self.token_mixer.size)

  def channel_mlp(self, x, key: jax.Array | None = None):
    """`x + drop_path(ls2 * mlp(norm2(x)))` (res-scaled skip where the config has one): the
    MLP half. v1's layer scale goes inside the MLP's op, whose backward computes its
    gradient more cheaply than autodiff outside it."""
    if "channel_mlp" in self.kernel_halves(x, training=key is not None):
      return self._mlp_kernel(x, key)
    h = self.norm2(x)
    if isinstance(self.mlp, Mlp):
      ls = None if self.layer_scale2 is None else self.layer_scale2.scale[...]
      branch, scale = self.mlp(h, ls), None
    else:
      branch, scale = self.mlp(h), self.layer_scale2
    return self._residual(x, branch, scale, self.res_scale2, self.drop_rate, key)

  def kernel_halves(self, x, kernels: mlp_kernel.TpuKernels | None = None,
                    training: bool = True) -> tuple[str, ...]:
    """The halves ('mix', 'channel_mlp') that run on `kernels` (default: the block's) for an
    input shaped like `x`: attention's core or a SepConv half where its blocks fit, the MLP
    half where its shape fits, in evaluation only after a channel LayerNorm (which the forward
    kernel finishes itself; a one-group norm's statistics pass and layout copies cost more
    than XLA's fused forward there: PoolFormer S12's eval step 21.3 -> 21.8 MB per image).
    The one place that decides."""
    kernels = kernels or self.kernels
    if kernels is None:
      return ()
    _, h, w, _ = x.shape
    mixer = self.token_mixer
    halves = []
    if isinstance(mixer, Attention) and kernels.fits_attention(
        h * w, mixer.num_heads * mixer.head_dim, x.dtype):
      halves.append("mix")
    if isinstance(mixer, SepConv) and kernels.fits_sepconv(
        x.shape, mixer.pwconv1.out_features, mixer.size, x.dtype):
      halves.append("mix")
    if ((training or self.mlp_form.norm == "layer")
        and kernels.fits(x.shape, self.mlp.fc1.out_features, x.dtype)):
      halves.append("channel_mlp")
    return tuple(halves)

  @staticmethod
  def _residual(x, branch, scale: Scale | None, res_scale: Scale | None, rate, key):
    if scale is not None:
      branch = scale(branch)
    skip = x if res_scale is None else res_scale(x)
    return skip + drop_path(branch, rate, key)

  def __call__(self, x, key: jax.Array | None = None):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = ops.materialize_grad(self.mix(x, k1))
    return ops.materialize_grad(self.channel_mlp(x, k2))

  def _sepconv_kernel(self, x, key):
    """`mix` with a SepConv mixer as two Pallas kernels: `TpuKernels.sepconv_residual`, the
    terms this block lacks at their neutral values."""
    keep = drop_path_factor(x.shape, self.drop_rate, key)
    keep = jnp.ones(x.shape[:1], jnp.float32) if keep is None else keep.reshape(-1)
    dim, mixer = x.shape[-1], self.token_mixer
    dtype = mixer.pwconv1.dtype or x.dtype
    value = lambda module, absent: absent if module is None else module.scale[...]
    params = sepconv_kernel.SepConvParams(
        gamma=self.norm1.scale[...],
        beta=jnp.zeros((dim,), jnp.float32) if self.norm1.bias is None else self.norm1.bias[...],
        w1=mixer.pwconv1.kernel[...].astype(dtype),
        act=jnp.concatenate([mixer.act1.scale[...], mixer.act1.bias[...]]),
        dw=mixer.dwconv.kernel[...][:, :, 0, :].astype(dtype),
        w2=mixer.pwconv2.kernel[...].astype(dtype),
        ls=value(self.layer_scale1, None),
        rs=value(self.res_scale1, jnp.ones((dim,), jnp.float32)))
    return self.kernels.sepconv_residual(x, keep, params, self.norm1.eps)

  def _mlp_kernel(self, x, key):
    """`channel_mlp` as Pallas kernels (training: two; evaluation: the forward, which then
    stores nothing for a backward): `TpuKernels.mlp_residual`, the terms this block lacks at
    their neutral values."""
    keep = drop_path_factor(x.shape, self.drop_rate, key)
    keep = jnp.ones(x.shape[:1], jnp.float32) if keep is None else keep.reshape(-1)
    dim, mlp, dtype = x.shape[-1], self.mlp, self.mlp.fc1.dtype or x.dtype
    zeros, ones = jnp.zeros((dim,), jnp.float32), jnp.ones((dim,), jnp.float32)
    value = lambda module, absent: absent if module is None else module.scale[...]
    if isinstance(mlp, Mlp):
      w1, b1, w2, b2 = mlp.weights(dtype)
      act = jnp.zeros((2,), jnp.float32)
    else:
      w1, w2 = (fc.kernel[...].astype(dtype) for fc in (mlp.fc1, mlp.fc2))
      b1, b2 = jnp.zeros((w1.shape[1],), jnp.float32), zeros
      act = jnp.concatenate([mlp.act.scale[...], mlp.act.bias[...]])
    beta = zeros if self.norm2.bias is None else self.norm2.bias[...]
    params = mlp_kernel.MlpParams(
        gamma=self.norm2.scale[...], beta=beta, w1=w1, b1=b1, w2=w2, b2=b2,
        ls=value(self.layer_scale2, ones), rs=value(self.res_scale2, ones), act=act)
    return self.kernels.mlp_residual(x, keep, params, self.mlp_form)


class Stage(nnx.Module):
  """Optional downsampling conv, then a sequence of MetaFormer blocks at one width."""

  def __init__(self, downsample: ConvDown | None, blocks: list[MetaFormerBlock]):
    self.downsample = downsample
    self.blocks = nnx.List(blocks)

# ---------------------------------------------------------------------------
# Head and model.
# ---------------------------------------------------------------------------

_MLP_HEAD_RATIO = 4


class MlpHead(nnx.Module):
  """ConvFormer / CAFormer head: fc1 (4x) -> SquaredReLU -> LayerNorm -> dropout -> fc2."""

  def __init__(self, dim: int, num_classes: int, *, norm_eps: float, dropout_rate: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = _MLP_HEAD_RATIO * dim
    self.dropout_rate = dropout_rate
    self.fc1 = _dense(dim, hidden, use_bias=True, **kw)
    self.norm = LayerNorm(hidden, norm_eps, **kw)
    self.fc2 = _dense(hidden, num_classes, use_bias=True, **kw)

  def __call__(self, x, key: jax.Array | None = None):
    x = self.norm(squared_relu(self.fc1(x)))
    return self.fc2(dropout(x, self.dropout_rate, key))


class MetaFormer(nnx.Module):
  """The MetaFormer skeleton. With the `poolformer_*` configs it is PoolFormer v1.

  Call with `train=True` and a `key` to enable stochastic depth and head dropout; otherwise it
  is deterministic. With `features_only=True` there is no head and the call returns the four
  stage maps (strides 4, 8, 16, 32), for dense prediction: in v1 each through its own
  GroupNorm, as the PoolFormer release's detection and segmentation backbones; in v2 as they
  are, as timm's `features_only` returns them (that release has no dense-prediction code).

  `remat=True` wraps every block in jax.checkpoint: the backward pass recomputes a block's
  activations from its input instead of storing them, trading about a third more compute
  for memory on TPU and GPU. `remat_stages` limits that to some stages (1-4): the early,
  high-resolution ones hold most of the activations. On XLA:CPU it saves nothing (the CPU
  compiler drops the optimization barriers jax.checkpoint relies on and hoists the
  recomputation; measured 1.0 GB of buffers instead of 0.8 GB for S12 at batch 16), hence off
  by default.

  `kernels` (`mlp_kernel.for_mesh`): the TPU training kernels the blocks may use, chosen by
  whoever lowers the program for its mesh (the trainer); None (default): XLA only.
  """

  def __init__(self, cfg: MetaFormerConfig, *, features_only: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: bool = False, remat_stages: Sequence[int] | None = None,
               kernels: mlp_kernel.TpuKernels | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.features_only = features_only
    stages = range(1, len(cfg.depths) + 1)
    if remat_stages and not set(remat_stages) <= set(stages):
      raise ValueError(f"remat_stages={tuple(remat_stages)}: stages are numbered "
                       f"{stages[0]}-{stages[-1]}")
    self.remat_stages = tuple(s for s in stages if remat and (  # None or (): every stage
        not remat_stages or s in remat_stages))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    v2 = cfg.version == 2
    down_norm = dict(norm_eps=cfg.norm_eps)
    self.stem = ConvDown(cfg.in_channels, cfg.widths[0], kernel=7, stride=4, padding=2,
                         norm="post" if v2 else None, **down_norm, **kw)
    rates = iter(cfg.block_drop_rates())
    stages = []
    for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
      down = None if i == 0 else ConvDown(cfg.widths[i - 1], width, 3, 2, 1,
                                          norm="pre" if v2 else None, **down_norm, **kw)
      blocks = [MetaFormerBlock(width, cfg, i, next(rates), kernels=kernels, **kw)
                for _ in range(depth)]
      stages.append(Stage(down, blocks))
    self.stages = nnx.List(stages)
    if features_only:
      if not v2:
        self.feature_norms = nnx.List(
            [group_norm(w, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for w in cfg.widths])
      return
    width = cfg.widths[-1]
    if v2:  # LayerNorm of the pooled vector.
      self.norm = LayerNorm(width, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    else:  # GroupNorm of the final map, before pooling.
      self.norm = group_norm(width, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    if cfg.head == "mlp":
      self.head = MlpHead(width, cfg.num_classes, norm_eps=cfg.head_norm_eps,
                          dropout_rate=cfg.head_dropout, **kw)
    else:
      self.head = nnx.Linear(width, cfg.num_classes, kernel_init=_dense_init,
                             bias_init=nnx.initializers.zeros_init(), **kw)

  def forward_features(self, x, key: jax.Array | None = None) -> list[jax.Array]:
    """The output of each stage (before any feature norm), strides 4, 8, 16, 32."""
    if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"expected NHWC input with {self.cfg.in_channels} channels, "
                       f"got shape {x.shape}")
    x = self.stem(x)
    plain = lambda block, x, key: block(x, key)
    rematted = nnx.remat(plain)
    outs = []
    block_index = 0
    for number, stage in enumerate(self.stages, 1):
      if stage.downsample is not None:
        x = stage.downsample(x)
      run_block = rematted if number in self.remat_stages else plain
      for block in stage.blocks:
        block_key = None if key is None else jax.random.fold_in(key, block_index)
        x = run_block(block, x, block_key)
        block_index += 1
      outs.append(x)
    return outs

  def forward_head(self, x, key: jax.Array | None = None):
    """Logits from the last stage's map; `key` (training) enables head dropout."""
    if self.cfg.version == 1:
      x = jnp.mean(self.norm(x), axis=(1, 2))  # GroupNorm over the final map, THEN the mean.
    else:
      x = self.norm(jnp.mean(x, axis=(1, 2)))
    if isinstance(self.head, MlpHead):
      return self.head(x, key)
    return self.head(dropout(x, self.cfg.head_dropout, key))

  def __call__(self, x, *, train: bool = False, key: jax.Array | None = None):
    """Logits `[N, num_classes]`, or the four stage maps in features mode.

    `train=True` enables stochastic depth and head dropout and then needs `key`: randomness
    is explicit, so a train step is a pure function of (params, batch, key).
    """
    cfg = self.cfg
    if train and key is None and (cfg.drop_path_rate > 0 or cfg.head_dropout > 0):
      raise ValueError("train=True with drop_path_rate or head_dropout > 0 needs a PRNG `key`")
    key = key if train else None
    feats = self.forward_features(x, key)
    if self.features_only:
      if cfg.version == 1:
        return [norm(f) for norm, f in zip(self.feature_norms, feats)]
      return feats
    head_key = None if key is None else jax.random.fold_in(key, cfg.num_blocks)
    return self.forward_head(feats[-1], head_key)


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


_S, _M = (64, 128, 320, 512), (96, 192, 384, 768)
# IdentityFormer, RandFormer, PoolFormerV2: size -> (depths, widths).
_SIZES = {"s12": ((2, 2, 6, 2), _S), "s24": ((4, 4, 12, 4), _S), "s36": ((6, 6, 18, 6), _S),
          "m36": ((6, 6, 18, 6), _M), "m48": ((8, 8, 24, 8), _M)}
# ConvFormer, CAFormer (M36 ends in 576, not 768).
_CONV_SIZES = {"s18": ((3, 3, 9, 3), _S), "s36": ((3, 12, 18, 3), _S),
               "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
               "b36": ((3, 12, 18, 3), (128, 256, 512, 768))}


def _v2(sizes: tuple, token_mixer, drop_path_rate: float, **fields) -> MetaFormerConfig:
  """A MetaFormer-baselines variant: what all of them share, plus its own fields."""
  depths, widths = sizes
  return MetaFormerConfig(depths=depths, widths=widths, token_mixer=token_mixer,
                          drop_path_rate=drop_path_rate, version=2, norm_eps=1e-6,
                          layer_scale_init=None, res_scale_init=(None, None, 1.0, 1.0),
                          crop_pct=1.0, **fields)


# The released models. Drop-path rates and head dropout are the release's training recipe.
# v1 first: a checkpoint converter that matches by depths and widths finds PoolFormer v1 first.
VARIANTS: dict[str, MetaFormerConfig] = {
    "poolformer_s12": MetaFormerConfig(depths=(2, 2, 6, 2), widths=(64, 128, 320, 512),
                                       layer_scale_init=1e-5, drop_path_rate=0.1, crop_pct=0.9),
    "poolformer_s24": MetaFormerConfig(depths=(4, 4, 12, 4), widths=(64, 128, 320, 512),
                                       layer_scale_init=1e-5, drop_path_rate=0.1, crop_pct=0.9),
    "poolformer_s36": MetaFormerConfig(depths=(6, 6, 18, 6), widths=(64, 128, 320, 512),
                                       layer_scale_init=1e-6, drop_path_rate=0.2, crop_pct=0.9),
    "poolformer_m36": MetaFormerConfig(depths=(6, 6, 18, 6), widths=(96, 192, 384, 768),
                                       layer_scale_init=1e-6, drop_path_rate=0.3, crop_pct=0.95),
    "poolformer_m48": MetaFormerConfig(depths=(8, 8, 24, 8), widths=(96, 192, 384, 768),
                                       layer_scale_init=1e-6, drop_path_rate=0.4, crop_pct=0.95),
}
# size: drop-path rate of (IdentityFormer, RandFormer, PoolFormerV2).
for _size, (_id, _rand, _pool) in {"s12": (.1, .1, .1), "s24": (.1, .1, .1), "s36": (.2, .2, .2),
                                    "m36": (.3, .3, .3), "m48": (.4, .3, .4)}.items():
  _sizes = _SIZES[_size]
  VARIANTS[f"identityformer_{_size}"] = _v2(_sizes, "identity", _id)
  VARIANTS[f"randformer_{_size}"] = _v2(_sizes, ("identity", "identity", "random", "random"),
                                        _rand)
  VARIANTS[f"poolformerv2_{_size}"] = _v2(_sizes, "pooling", _pool)
# size: drop-path rate of ConvFormer, of CAFormer; CAFormer's head dropout (ConvFormer's is 0).
for _size, (_conv, _ca, _ca_head) in {"s18": (.2, .15, 0.), "s36": (.3, .3, .4),
                                      "m36": (.4, .4, .4), "b36": (.6, .6, .5)}.items():
  _sizes, _fields = _CONV_SIZES[_size], dict(mixer_size=7, norm="layer", head="mlp")
  VARIANTS[f"convformer_{_size}"] = _v2(_sizes, "sepconv", _conv, **_fields)
  VARIANTS[f"caformer_{_size}"] = _v2(_sizes, ("sepconv", "sepconv", "attention", "attention"),
                                      _ca, head_dropout=_ca_head, **_fields)


# The fields that decide the parameter tensors (the head's size aside): weights saved from one
# config load into another only where these agree.
ARCHITECTURE_FIELDS = ("depths", "widths", "token_mixer", "mixer_size", "mlp_ratio",
                       "in_channels", "version", "norm", "head", "head_dim")


def list_models() -> list[str]:
  """Names accepted by `create_model`."""
  return sorted(VARIANTS)


def get_config(name: str, **overrides) -> MetaFormerConfig:
  """The variant's config with `overrides` applied (any `MetaFormerConfig` field)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
  fields = {f.name for f in dataclasses.fields(MetaFormerConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown override(s) {bad} for {name}; valid: {sorted(fields)}")
  return dataclasses.replace(VARIANTS[name], **overrides)


def create_model(name: str, *, num_classes: int = 1000, rngs: nnx.Rngs,
                 features_only: bool = False, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, remat: bool = False,
                 remat_stages: Sequence[int] | None = None, **overrides) -> MetaFormer:
  """Builds a registered variant, e.g. `create_model("caformer_s18", rngs=nnx.Rngs(0))`.

  `overrides` replace config fields (e.g. `token_mixer="identity"`, `drop_path_rate=0.`).
  `remat` is MetaFormer's (recompute block activations in the backward pass).
  """
  cfg = get_config(name, num_classes=num_classes, **overrides)
  return MetaFormer(cfg, features_only=features_only, dtype=dtype, param_dtype=param_dtype,
                    remat=remat, remat_stages=remat_stages, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's `nnx.Param`s (RandFormer's frozen matrices included)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
