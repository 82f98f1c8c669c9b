"""PoolFormer: the MetaFormer skeleton with a pluggable token mixer, in Flax NNX.

Faithful to the released PyTorch PoolFormer v1 (arXiv 2111.11418) at inference:
one-group GroupNorm with eps 1e-5, exact (erf) GELU, symmetric explicit conv padding,
pooling that does not count padding cells, and head = GroupNorm -> mean(H, W) -> linear.

Layout is NHWC. Parameter paths follow timm's naming (stem / stages.i.downsample /
stages.i.blocks.j / head), which keeps the weight converter's table short.

Variants are data: `VARIANTS` maps a name to a `MetaFormerConfig`; `create_model` builds one.
The token mixer is a config field, so the paper's ablations (identity, depthwise conv)
are the same skeleton with another mixer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from poolformer_jax import ops

Dtype = Any

# ---------------------------------------------------------------------------
# Configuration: one frozen dataclass per variant.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetaFormerConfig:
  """Everything that defines a MetaFormer variant. Fields are what the paper varies."""

  depths: tuple[int, ...] = (2, 2, 6, 2)
  widths: tuple[int, ...] = (64, 128, 320, 512)
  token_mixer: str = "pooling"  # one of TOKEN_MIXERS
  mixer_size: int = 3  # pool window / depthwise kernel
  mlp_ratio: float = 4.0
  layer_scale_init: float = 1e-5
  drop_path_rate: float = 0.1  # rate of the LAST block; earlier ones scale linearly from 0
  norm_eps: float = 1e-5
  in_channels: int = 3
  num_classes: int = 1000
  # Eval preprocessing of the release: resize short side to floor(size / crop_pct), center crop.
  crop_pct: float = 0.9

  @property
  def num_blocks(self) -> int:
    return sum(self.depths)

  def block_drop_rates(self) -> list[float]:
    """Stochastic-depth rate of each block: `rate * k / (n_blocks - 1)` for global index k."""
    n = self.num_blocks
    if n == 1:
      return [self.drop_path_rate]
    return [self.drop_path_rate * k / (n - 1) for k in range(n)]


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
# Layers.
# ---------------------------------------------------------------------------


class GroupNorm1(nnx.Module):
  """One-group GroupNorm: statistics over (H, W, C) together, per-channel affine.

  This is NOT a channel LayerNorm (which normalises over C only). Flax's default eps is 1e-6;
  the release uses PyTorch's 1e-5. Statistics are float32 whatever the compute dtype, with the
  two-pass variance E[(x - mean)^2] that PyTorch uses: it stays exact for inputs with a large
  mean, and on XLA:CPU it measured as fast as a one-pass E[x^2] - mean^2 (each pass is one
  vectorised reduction over data that is still in cache). `moments` is public so a block can
  fold the normalisation into what follows (see `MetaFormerBlock`).
  """

  def __init__(self, num_features: int, eps: float, *, dtype, param_dtype, rngs=None):
    del rngs  # Deterministic init (ones / zeros), like nnx.GroupNorm's.
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def moments(self, x):
    """Per-sample mean and 1/std, float32, shaped [N, 1, 1, 1]."""
    x = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return mean, lax.rsqrt(var + self.eps)

  def __call__(self, x):
    mean, rstd = self.moments(x)
    scale = self.scale[...].astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean) * (rstd * scale) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def group_norm(num_features: int, eps: float, *, dtype, param_dtype, rngs) -> GroupNorm1:
  return GroupNorm1(num_features, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ConvDown(nnx.Module):
  """Strided conv with symmetric explicit padding (the stem and the downsampling layers).

  "SAME" padding on a strided conv pads asymmetrically in XLA; PyTorch pads both sides
  equally, so the padding is spelled out.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    fan_in = in_ch * kernel * kernel
    self.conv = nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                         padding=((padding, padding), (padding, padding)),
                         kernel_init=_torch_conv_kernel_init,
                         bias_init=_torch_conv_bias_init(fan_in),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


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
  """No token mixing at all: the paper's lower bound for the skeleton."""

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


TOKEN_MIXERS: dict[str, Callable[..., nnx.Module]] = {
    "pooling": Pooling,
    "identity": Identity,
    "dwconv": DepthwiseConv,
}


class Mlp(nnx.Module):
  """1x1 conv -> exact GELU -> 1x1 conv, written as dense layers over channels (NHWC).

  fc1 and fc2 stay `nnx.Linear` modules (parameter paths `mlp.fc1.kernel`, ...); the call
  goes through `ops.mlp_apply`, whose backward pass needs less memory than autodiff's.
  """

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(kernel_init=_dense_init, bias_init=nnx.initializers.zeros_init(),
              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    params = [p[...].astype(dtype) for p in (self.fc1.kernel, self.fc1.bias, self.fc2.kernel,
                                             self.fc2.bias)]
    return ops.mlp_apply(x.astype(dtype), *params)


class LayerScale(nnx.Module):
  """Learnable per-channel scale, shape (C,)."""

  def __init__(self, dim: int, init: float, *, param_dtype):
    self.scale = nnx.Param(jnp.full((dim,), init, param_dtype))

  def __call__(self, x):
    return x * self.scale[...].astype(x.dtype)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero the whole residual branch of a sample with probability `rate`.

  Kept samples are scaled by 1/(1-rate) so the expectation is unchanged. `key=None` means
  inference: the identity.
  """
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MetaFormerBlock(nnx.Module):
  """`x += drop_path(ls1 * mixer(norm1(x)))`, then `x += drop_path(ls2 * mlp(norm2(x)))`."""

  def __init__(self, dim: int, cfg: MetaFormerConfig, drop_rate: float, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    mixer_cls = TOKEN_MIXERS[cfg.token_mixer]
    self.drop_rate = drop_rate
    self.norm1 = group_norm(dim, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_mixer = mixer_cls(dim, cfg.mixer_size, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.layer_scale1 = LayerScale(dim, cfg.layer_scale_init, param_dtype=param_dtype)
    self.norm2 = group_norm(dim, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)
    self.layer_scale2 = LayerScale(dim, cfg.layer_scale_init, param_dtype=param_dtype)

  def mix(self, x):
    """`token_mixer(norm1(x))`.

    For pooling it is computed as `rstd * scale * (pool(x) - x)`: the norm is a per-channel
    affine map of x and the pool averages with weights that sum to 1, so the norm's mean and
    bias cancel in `pool(norm(x)) - norm(x)`. The normalised map is then never materialised:
    the statistics, pool, layer scale and residual add become one fused loop over x.
    """
    if not isinstance(self.token_mixer, Pooling):
      return self.token_mixer(self.norm1(x))
    _, rstd = self.norm1.moments(x)
    gain = rstd * self.norm1.scale[...].astype(jnp.float32)
    return (self.token_mixer(x.astype(jnp.float32)) * gain).astype(x.dtype)

  def __call__(self, x, key: jax.Array | None = None):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = ops.materialize_grad(x + drop_path(self.layer_scale1(self.mix(x)), self.drop_rate, k1))
    x = x + drop_path(self.layer_scale2(self.mlp(self.norm2(x))), self.drop_rate, k2)
    return ops.materialize_grad(x)


class Stage(nnx.Module):
  """Optional downsampling conv, then a sequence of MetaFormer blocks at one width."""

  def __init__(self, downsample: ConvDown | None, blocks: list[MetaFormerBlock]):
    self.downsample = downsample
    self.blocks = nnx.List(blocks)


class MetaFormer(nnx.Module):
  """The MetaFormer skeleton. With `token_mixer="pooling"` it is PoolFormer v1.

  Call with `train=True` and a `key` to enable stochastic depth; otherwise it is
  deterministic. With `features_only=True` the head is replaced by one GroupNorm per stage
  and the call returns the four stage maps (strides 4, 8, 16, 32), for dense prediction.

  `remat=True` wraps every block in jax.checkpoint: the backward pass recomputes a block's
  activations from its input instead of storing them, trading about a third more compute
  for memory on TPU and GPU. On XLA:CPU it saves nothing (the CPU compiler drops the
  optimization barriers jax.checkpoint relies on and hoists the recomputation; measured
  1.0 GB of buffers instead of 0.8 GB for S12 at batch 16), hence off by default.
  """

  def __init__(self, cfg: MetaFormerConfig, *, features_only: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    if len(cfg.depths) != len(cfg.widths):
      raise ValueError(f"depths {cfg.depths} and widths {cfg.widths} must have the same length")
    if cfg.token_mixer not in TOKEN_MIXERS:
      raise ValueError(f"unknown token_mixer {cfg.token_mixer!r}; "
                       f"valid: {sorted(TOKEN_MIXERS)}")
    self.cfg = cfg
    self.features_only = features_only
    self.remat = remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = ConvDown(cfg.in_channels, cfg.widths[0], kernel=7, stride=4, padding=2, **kw)
    rates = iter(cfg.block_drop_rates())
    stages = []
    for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
      down = None if i == 0 else ConvDown(cfg.widths[i - 1], width, 3, 2, 1, **kw)
      blocks = [MetaFormerBlock(width, cfg, next(rates), **kw) for _ in range(depth)]
      stages.append(Stage(down, blocks))
    self.stages = nnx.List(stages)
    if features_only:
      self.feature_norms = nnx.List(
          [group_norm(w, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
           for w in cfg.widths])
    else:
      self.norm = group_norm(cfg.widths[-1], cfg.norm_eps, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
      self.head = nnx.Linear(cfg.widths[-1], cfg.num_classes, kernel_init=_dense_init,
                             bias_init=nnx.initializers.zeros_init(), **kw)

  def forward_features(self, x, key: jax.Array | None = None) -> list[jax.Array]:
    """The output of each stage (before any feature norm), strides 4, 8, 16, 32."""
    if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"expected NHWC input with {self.cfg.in_channels} channels, "
                       f"got shape {x.shape}")
    x = self.stem(x)
    run_block = lambda block, x, key: block(x, key)
    if self.remat:
      run_block = nnx.remat(run_block)
    outs = []
    block_index = 0
    for stage in self.stages:
      if stage.downsample is not None:
        x = stage.downsample(x)
      for block in stage.blocks:
        block_key = None if key is None else jax.random.fold_in(key, block_index)
        x = run_block(block, x, block_key)
        block_index += 1
      outs.append(x)
    return outs

  def __call__(self, x, *, train: bool = False, key: jax.Array | None = None):
    """Logits `[N, num_classes]`, or the four normed stage maps in features mode.

    `train=True` enables stochastic depth and then needs `key`: randomness is explicit, so a
    train step is a pure function of (params, batch, key).
    """
    if train and key is None and self.cfg.drop_path_rate > 0:
      raise ValueError("train=True with drop_path_rate > 0 needs a PRNG `key`")
    feats = self.forward_features(x, key if train else None)
    if self.features_only:
      return [norm(f) for norm, f in zip(self.feature_norms, feats)]
    x = self.norm(feats[-1])  # GroupNorm over the final map, THEN the spatial mean.
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x)


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


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
                 **overrides) -> MetaFormer:
  """Builds a registered variant, e.g. `create_model("poolformer_s12", rngs=nnx.Rngs(0))`.

  `overrides` replace config fields (e.g. `token_mixer="identity"`, `drop_path_rate=0.`).
  `remat` is MetaFormer's (recompute block activations in the backward pass).
  """
  cfg = get_config(name, num_classes=num_classes, **overrides)
  return MetaFormer(cfg, features_only=features_only, dtype=dtype, param_dtype=param_dtype,
                    remat=remat, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's `nnx.Param`s."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
