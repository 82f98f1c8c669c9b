"""timm's RandAugment and RandomErasing on the device, per sample, inside the compiled train step.

The host hands over uint8 crops (poolformer_jax.input_pipeline); `augment_batch` turns them into
the normalised float32 batch timm's transform would give: RandAugment on uint8 values (PIL's
semantics: each op rounds and clips) when `config.data.randaugment_on='device'`, normalisation,
random erasing. Mixup/CutMix (mixup.py) follow in the step. Every random draw comes from the
step's key, one key per sample, so a resumed run reproduces an uninterrupted one and a sharded
step computes what one device does.

RandAugment stays on the host by default (poolformer_jax.tf_augment): measured with compile mode
(S12, v4-8, 1024 images per chip), XLA counts each layer here at ~0.5 GB per image, nearly all
of it the warp (Rotate, Shear, Translate: bilinear sampling at per-sample coordinates, a gather
with per-sample indices), against 77 MB for S12's whole train step; Equalize's one-hot
histogram and lookup add ~0.3 GFLOP per image and layer. Normalisation and random erasing cost
~1 MB and ~25 MFLOP per image and stay here.

The policy is timm's `rand-m9-mstd0.5-inc1` (or any `rand-...` string): `num_layers` ops drawn
uniformly with replacement from the 15, each applied with probability 0.5 at a magnitude drawn
from N(m, mstd) clipped to [0, 10], geometric ops filling with the dataset mean colour. The
formulas are those of the host's TensorFlow implementation (poolformer_jax.tf_augment, itself
tested against PIL), which the tests hold these to within one grey level.

Every layer is the same program for every sample, whatever op it drew: an affine warp (the
identity unless the op is Rotate, Shear or Translate), the point ops as elementwise selects
(fused into one pass), and two blends (the identity unless the op is Color or Sharpness).

Not augmax or dm-pix: neither has timm's ops (no Equalize, AutoContrast, Posterize,
SolarizeAdd or PIL's Sharpness; additive brightness and per-channel contrast where PIL blends
with black and the grey mean; float images without PIL's rounding between ops; a scalar fill
colour), and timm's policy (one op per layer, drawn per sample) is not an augmax Chain. The warp
samples with `jax.scipy.ndimage.map_coordinates`, which dm-pix's affine_transform wraps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.scipy import ndimage
import jax.numpy as jnp

from poolformer_jax.errors import ConfigError

_LEVEL_DENOM = 10.0
_TRANSLATE_PCT = 0.45
_ROTATE_DEG = 30.0
_SHEAR = 0.3
_ENHANCE = 0.9

# timm's _RAND_INCREASING_TRANSFORMS (inc1) and _RAND_TRANSFORMS (inc0), in timm's order.
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
DEFAULT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
               "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
  ops: tuple[str, ...]
  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_DENOM
  prob: float = 0.5  # Each chosen op is applied with this probability (timm's AugmentOp default).
  fill: tuple[float, float, float] = (128.0, 128.0, 128.0)


def parse_randaugment(spec: str, mean: tuple[float, ...]) -> RandAugmentPolicy:
  """Parses a timm RandAugment string like 'rand-m9-mstd0.5-inc1' (keys m, n, mstd, mmax, inc, p).

  `mean` (0..1 scale, the dataset's normalisation) is the fill colour of geometric ops.
  """
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ConfigError(f"RandAugment spec {spec!r} must start with 'rand', e.g. 'rand-m9-mstd0.5-inc1'.")
  kw = dict(ops=DEFAULT_OPS, fill=tuple(float(min(255, round(255 * m))) for m in mean))
  fields = {"mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "ops", "m": "magnitude",
            "n": "num_layers", "p": "prob"}  # Longest prefix first.
  for part in parts[1:]:
    key = next((k for k in fields if part.startswith(k)), None)
    try:
      value = float(part[len(key):]) if key else None
    except ValueError:
      value = None
    if key is None or value is None:
      raise ConfigError(f"Unknown RandAugment field {part!r} in {spec!r}; supported: m<magnitude>, "
                        "n<num ops>, mstd<std>, mmax<max>, inc<0|1>, p<prob>.")
    if key == "inc":
      value = INCREASING_OPS if value else DEFAULT_OPS
    kw[fields[key]] = int(value) if key == "n" else value
  return RandAugmentPolicy(**kw)


# ---------------------------------------------------------------------------
# One layer: warp, lookup table, colour blend, sharpness blend.
# ---------------------------------------------------------------------------

_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_BLENDS = ("Color", "ColorIncreasing", "Sharpness", "SharpnessIncreasing")


def _q(x):
  """Back to uint8 values (PIL's semantics), kept as float32."""
  return jnp.round(jnp.clip(x, 0.0, 255.0))


def _grey(image):
  """PIL 'L' conversion (ITU-R 601-2 luma), [H, W, 1]."""
  return _q(jnp.sum(image * jnp.array([0.299, 0.587, 0.114], jnp.float32), -1, keepdims=True))


def _affine_matrix(name, m, s, height, width):
  """PIL Image.transform(AFFINE) coefficients (a, b, c, d, e, f): output (x, y) samples the input
  at (a x + b y + c, d x + e y + f), pixel centres at +0.5 (PIL's continuous coordinates)."""
  level = s * m / _LEVEL_DENOM
  zero, one = jnp.zeros_like(m), jnp.ones_like(m)
  if name == "Rotate":  # PIL Image.rotate: counter-clockwise about (w / 2, h / 2).
    theta = -math.pi / 180.0 * level * _ROTATE_DEG
    cx, cy = width / 2.0, height / 2.0
    c, sn = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([c, sn, cx - c * cx - sn * cy, -sn, c, cy + sn * cx - c * cy])
  if name == "ShearX":
    return jnp.stack([one, level * _SHEAR, zero, zero, one, zero])
  if name == "ShearY":
    return jnp.stack([one, zero, zero, level * _SHEAR, one, zero])
  if name == "TranslateXRel":
    return jnp.stack([one, zero, level * _TRANSLATE_PCT * width, zero, one, zero])
  if name == "TranslateYRel":
    return jnp.stack([one, zero, zero, zero, one, level * _TRANSLATE_PCT * height])
  return jnp.stack([one, zero, zero, zero, one, zero])  # Every other op: the identity.


def _warp(image, matrix, fill):
  """Bilinear affine warp (PIL's matrix convention); taps outside the image read `fill`.

  The identity matrix samples exact pixel centres, so it returns the image unchanged.
  """
  a, b, c, d, e, f = matrix
  height, width = image.shape[:2]
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                      indexing="ij")
  # Pixel indices (centres at integers): shift PIL's +0.5 convention.
  src_x = a * x + b * y + (c + 0.5 * (a + b) - 0.5)
  src_y = d * x + e * y + (f + 0.5 * (d + e) - 0.5)
  sample = lambda channel: ndimage.map_coordinates(channel, [src_y, src_x], order=1,
                                                   mode="constant", cval=0.0)
  out = jax.vmap(sample, in_axes=2, out_axes=2)(image)

  def inside(src, size):  # The weight of the taps that fall inside, along one axis.
    low = jnp.floor(src)
    frac = src - low
    return (jnp.where((low >= 0) & (low < size), 1.0 - frac, 0.0)
            + jnp.where((low + 1 >= 0) & (low + 1 < size), frac, 0.0))

  weight = (inside(src_y, height) * inside(src_x, width))[..., None]
  return _q(out + (1.0 - weight) * fill)


def _equalize(image):
  """PIL ImageOps.equalize per channel: lut[i] = (step // 2 + cumsum_excl[i]) // step.

  The histogram and the table lookup as sums over a one-hot encoding (the lookup a matmul):
  XLA counts a per-pixel gather from a 256-entry table as hundreds of MB per image on TPU.
  """
  values = image.reshape(-1, 3)
  onehot = (values[..., None] == jnp.arange(256, dtype=jnp.float32)).astype(jnp.bfloat16)
  hist = jnp.sum(onehot, axis=0, dtype=jnp.float32)  # [3, 256], exact counts.
  last = jnp.take_along_axis(hist, (255 - jnp.argmax(hist[:, ::-1] > 0, axis=1))[:, None], 1)
  step = jnp.floor((jnp.sum(hist, axis=1, keepdims=True) - last) / 255.0)
  cumsum = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.clip(jnp.floor((jnp.floor(step / 2.0) + cumsum) / jnp.maximum(step, 1.0)), 0, 255)
  lut = jnp.where(step > 0, lut, jnp.arange(256, dtype=jnp.float32))  # Integers: exact in bf16.
  out = jnp.einsum("nck,ck->nc", onehot, lut.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)
  return out.reshape(image.shape)


def _point(name, m, s, v):
  """The point op `name` on image v (each pixel a function of its value and of per-image
  statistics), or None for the other ops."""
  level = m / _LEVEL_DENOM

  def posterize(bits):
    shift = jnp.power(2.0, 8.0 - bits)
    return jnp.floor(v / shift) * shift

  def solarize(threshold):
    return jnp.where(v < threshold, v, 255.0 - v)

  def blend(degenerate, factor):
    return _q(degenerate + factor * (v - degenerate))

  if name == "AutoContrast":  # PIL ImageOps.autocontrast (cutoff 0), per channel.
    lo = jnp.min(v, axis=(0, 1))
    hi = jnp.max(v, axis=(0, 1))
    scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1.0), 1.0)
    offset = jnp.where(hi > lo, -lo * scale, 0.0)
    return jnp.clip(jnp.floor(v * scale + offset), 0.0, 255.0)
  if name == "Equalize":
    return _equalize(v)
  if name == "Invert":
    return 255.0 - v
  if name == "Posterize":
    return posterize(jnp.floor(level * 4.0))
  if name == "PosterizeIncreasing":
    return posterize(4.0 - jnp.floor(level * 4.0))
  if name == "Solarize":
    return solarize(jnp.floor(level * 256.0))
  if name == "SolarizeIncreasing":
    return solarize(256.0 - jnp.floor(level * 256.0))
  if name == "SolarizeAdd":
    return jnp.where(v < 128.0, jnp.minimum(v + jnp.floor(level * 110.0), 255.0), v)
  if name in ("Brightness", "BrightnessIncreasing"):
    return blend(0.0, _enhance_factor(name, m, s))
  if name in ("Contrast", "ContrastIncreasing"):
    return blend(jnp.floor(jnp.mean(_grey(v)) + 0.5), _enhance_factor(name, m, s))
  return None


def _smooth(image):
  """PIL ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) inside, border unchanged."""
  height, width = image.shape[:2]
  total = sum(image[1 + dy:height - 1 + dy, 1 + dx:width - 1 + dx]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  inner = _q((total + 4.0 * image[1:-1, 1:-1]) / 13.0)
  return image.at[1:-1, 1:-1].set(inner)


def _enhance_factor(name, m, s):
  if not name:
    return jnp.ones_like(m)  # No blend.
  if name.endswith("Increasing"):
    return 1.0 + s * m / _LEVEL_DENOM * _ENHANCE
  return m / _LEVEL_DENOM * 1.8 + 0.1


def _layer(image, op, m, s, policy: RandAugmentPolicy):
  """One RandAugment layer on one image (float32 [H, W, 3] of uint8 values): op index `op`
  into policy.ops (len(policy.ops): no op) at magnitude m, sign s."""
  height, width = image.shape[:2]
  names = policy.ops

  def pick(value, applies):
    """The value of the op drawn (`value(name)` where `applies(name)`), else `value('')`."""
    return jnp.stack([value(n if applies(n) else "") for n in names] + [value("")])[op]

  matrix = pick(lambda n: _affine_matrix(n, m, s, height, width), lambda n: n in _GEOMETRIC)
  image = _warp(image, matrix, jnp.asarray(policy.fill, jnp.float32))
  point = image  # Elementwise selects: XLA fuses them into one pass over the image.
  for i, name in enumerate(names):
    out = _point(name, m, s, image)
    if out is not None:
      point = jnp.where(op == i, out, point)
  image = point
  color = pick(lambda n: _enhance_factor(n, m, s), lambda n: n.startswith("Color"))
  image = _q(_grey(image) + color * (image - _grey(image)))
  sharp = pick(lambda n: _enhance_factor(n, m, s), lambda n: n.startswith("Sharpness"))
  smooth = _smooth(image)
  return _q(smooth + sharp * (image - smooth))


def sample_layers(key, policy: RandAugmentPolicy):
  """timm's draws for one image: (ops, magnitudes, signs) per layer, op len(policy.ops) where
  the layer is skipped (probability 1 - policy.prob)."""
  k_op, k_apply, k_mag, k_sign = jax.random.split(key, 4)
  n = policy.num_layers
  op = jax.random.randint(k_op, (n,), 0, len(policy.ops))
  applied = jax.random.uniform(k_apply, (n,)) < policy.prob
  magnitude = jnp.full((n,), policy.magnitude, jnp.float32)
  if policy.magnitude_std > 0:
    magnitude += policy.magnitude_std * jax.random.normal(k_mag, (n,))
  magnitude = jnp.clip(magnitude, 0.0, policy.magnitude_max)
  sign = jnp.where(jax.random.uniform(k_sign, (n,)) < 0.5, -1.0, 1.0)
  return jnp.where(applied, op, len(policy.ops)), magnitude, sign


def randaugment(key, image, policy: RandAugmentPolicy):
  """One image, float32 [H, W, 3] holding uint8 values -> the same, augmented."""
  ops, magnitudes, signs = sample_layers(key, policy)
  for i in range(policy.num_layers):
    image = _layer(image, ops[i], magnitudes[i], signs[i], policy)
  return image


def apply_op(image, name, magnitude, sign, fill=(128.0, 128.0, 128.0)):
  """One named op on one image at a given magnitude (0..10) and sign: for tests."""
  policy = RandAugmentPolicy(ops=(name,), num_layers=1, fill=tuple(fill))
  image = jnp.asarray(image, jnp.float32)
  return _layer(image, jnp.int32(0), jnp.float32(magnitude), jnp.float32(sign), policy)


def random_erasing(key, image, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
  """timm RandomErasing, mode 'pixel', one box: per-pixel N(0, 1) noise on a normalised image."""
  k_area, k_ratio, k_do, k_top, k_left, k_noise = jax.random.split(key, 6)
  height, width = image.shape[:2]
  target = jax.random.uniform(k_area, (attempts,), minval=min_area, maxval=max_area) * height * width
  ratio = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(min_aspect),
                                     maxval=-math.log(min_aspect)))
  eh = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  valid = (eh < height) & (ew < width)
  first = jnp.argmax(valid)  # The first attempt that fits.
  eh, ew = eh[first], ew[first]
  do = (jax.random.uniform(k_do) < prob) & jnp.any(valid)
  top = jax.random.randint(k_top, (), 0, jnp.maximum(height - eh, 0) + 1)
  left = jax.random.randint(k_left, (), 0, jnp.maximum(width - ew, 0) + 1)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & do
  return jnp.where(box[..., None], jax.random.normal(k_noise, image.shape, image.dtype), image)


def normalize(images, mean, std):
  """uint8 images -> float32 (x / 255 - mean) / std, mean and std in 0..1 units."""
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def augment_batch(key, images, data_config):
  """uint8 [B, H, W, 3] -> float32 normalised, with random erasing and (with
  randaugment_on='device') RandAugment, each sample drawing from its own key."""
  cfg = data_config
  on_device = cfg.randaugment and cfg.get("randaugment_on", "host") == "device"
  policy = parse_randaugment(cfg.randaugment, mean=cfg.mean) if on_device else None
  erasing = float(cfg.random_erasing)

  def one(k, image):
    k_ra, k_erase = jax.random.split(k)
    if policy is not None:
      image = randaugment(k_ra, image.astype(jnp.float32), policy)
    image = normalize(image, cfg.mean, cfg.std)
    if erasing:
      image = random_erasing(k_erase, image, erasing)
    return image

  if policy is None and not erasing:
    return normalize(images, cfg.mean, cfg.std)
  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)
