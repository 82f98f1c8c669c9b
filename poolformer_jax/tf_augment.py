"""timm's RandAugment on the host, in TensorFlow with stateless randomness (the default,
`config.data.randaugment_on='host'`; poolformer_jax.augment has the same ops for the device).

Why the host by default: on a TPU, the device version's per-sample geometric warps are gathers
with per-sample indices, which XLA counts at ~0.5 GB per image and layer for 224x224 images
(S12's whole train step moves 77 MB per image); see augment.py.

timm's RandAugment and RandomErasing, re-implemented in TensorFlow with stateless randomness.

Hand-written because no maintained TF library implements timm's exact policy
('rand-m9-mstd0.5-inc1': 15 ops with the "increasing" magnitude mappings, Gaussian magnitude
noise, each of the 2 chosen ops applied with probability 0.5), and because every random draw
must come from a per-example seed so that resuming reproduces the same augmentations.

Images are float32 HWC holding integer values in 0..255 (PIL's uint8 semantics: each op rounds
and clips). Geometric ops fill with the dataset mean colour like timm and use bilinear sampling
(timm picks bilinear or bicubic at random; TF's projective transform has no bicubic).
"""

from __future__ import annotations

import math

import tensorflow as tf

# The policy, its parsing and the ops' constants are shared with the device version.
from poolformer_jax.augment import (  # pylint: disable=unused-import
    _ENHANCE, _LEVEL_DENOM, _ROTATE_DEG, _SHEAR, _TRANSLATE_PCT, DEFAULT_OPS, INCREASING_OPS,
    RandAugmentPolicy, parse_randaugment)


# --- helpers ---------------------------------------------------------------


def _q(image):
  """Back to uint8 semantics."""
  return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  return _q(degenerate + factor * (image - degenerate))


def _grayscale(image):
  """PIL 'L' conversion (ITU-R 601-2 luma)."""
  return _q(tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True))


def _affine(image, matrix, fill):
  """PIL Image.transform(AFFINE, matrix): output pixel (x, y) samples input at matrix @ (x, y, 1).

  `matrix` is in PIL's continuous coordinates (pixel centres at +0.5); TF's projective transform
  uses pixel indices, so the offsets are shifted accordingly. Outside pixels get `fill`.
  """
  a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
  c = c + 0.5 * (a + b) - 0.5
  f = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  shape = tf.shape(image)[:2]
  ones = tf.ones_like(image[..., :1])
  stacked = tf.concat([image, ones], -1)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=stacked, transforms=transform, output_shape=shape, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  inside = out[..., 3:]
  return _q(out[..., :3] + (1.0 - inside) * tf.constant(fill, tf.float32))


# --- ops: (image, magnitude in 0..10, sign +-1, fill) -> image ------------------


def _auto_contrast(image, m, s, fill):
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.clip_by_value(tf.floor(image * scale + offset), 0.0, 255.0)


def _equalize_channel(channel):
  """PIL ImageOps.equalize for one channel (lut[i] = (step // 2 + cumsum_excl[i]) // step)."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def apply():
    lut = (step // 2 + tf.concat([[0], tf.cumsum(hist)[:-1]], 0)) // tf.maximum(step, 1)
    return tf.cast(tf.gather(tf.clip_by_value(lut, 0, 255), values), tf.float32)

  return tf.cond(step > 0, apply, lambda: channel)


def _equalize(image, m, s, fill):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _invert(image, m, s, fill):
  return 255.0 - image


def _rotate(image, m, s, fill):
  """PIL Image.rotate: counter-clockwise about the image centre (w / 2, h / 2)."""
  theta = -math.pi / 180.0 * s * m / _LEVEL_DENOM * _ROTATE_DEG
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = w / 2.0, h / 2.0
  c, sn = tf.cos(theta), tf.sin(theta)
  matrix = tf.stack([c, sn, cx - c * cx - sn * cy, -sn, c, cy + sn * cx - c * cy])
  return _affine(image, matrix, fill)


def _shear_x(image, m, s, fill):
  return _affine(image, tf.stack([1.0, s * m / _LEVEL_DENOM * _SHEAR, 0.0, 0.0, 1.0, 0.0]), fill)


def _shear_y(image, m, s, fill):
  return _affine(image, tf.stack([1.0, 0.0, 0.0, s * m / _LEVEL_DENOM * _SHEAR, 1.0, 0.0]), fill)


def _translate_x_rel(image, m, s, fill):
  pixels = s * m / _LEVEL_DENOM * _TRANSLATE_PCT * tf.cast(tf.shape(image)[1], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill)


def _translate_y_rel(image, m, s, fill):
  pixels = s * m / _LEVEL_DENOM * _TRANSLATE_PCT * tf.cast(tf.shape(image)[0], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill)


def _posterize_bits(image, bits):
  shift = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
  return tf.floor(image / shift) * shift


def _posterize(image, m, s, fill):
  return _posterize_bits(image, tf.floor(m / _LEVEL_DENOM * 4.0))


def _posterize_increasing(image, m, s, fill):
  return _posterize_bits(image, 4.0 - tf.floor(m / _LEVEL_DENOM * 4.0))


def _solarize_at(image, threshold):
  return tf.where(image < threshold, image, 255.0 - image)


def _solarize(image, m, s, fill):
  return _solarize_at(image, tf.floor(m / _LEVEL_DENOM * 256.0))


def _solarize_increasing(image, m, s, fill):
  return _solarize_at(image, 256.0 - tf.floor(m / _LEVEL_DENOM * 256.0))


def _solarize_add(image, m, s, fill):
  add = tf.floor(m / _LEVEL_DENOM * 110.0)
  return tf.where(image < 128.0, tf.minimum(image + add, 255.0), image)


def _enhance_factor(m, s, increasing):
  if increasing:
    return 1.0 + s * m / _LEVEL_DENOM * _ENHANCE
  return m / _LEVEL_DENOM * 1.8 + 0.1


def _color(image, factor):
  return _blend(_grayscale(image), image, factor)


def _contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def _brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def _sharpness(image, factor):
  """PIL ImageFilter.SMOOTH on the interior (border pixels unchanged), then blend."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = _q(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = mask * degenerate + (1.0 - mask) * image
  return _blend(degenerate, image, factor)


def _enhance(fn, increasing):
  return lambda image, m, s, fill: fn(image, _enhance_factor(m, s, increasing))


OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize_increasing,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize_increasing, "SolarizeAdd": _solarize_add,
    "Color": _enhance(_color, False), "ColorIncreasing": _enhance(_color, True),
    "Contrast": _enhance(_contrast, False), "ContrastIncreasing": _enhance(_contrast, True),
    "Brightness": _enhance(_brightness, False), "BrightnessIncreasing": _enhance(_brightness, True),
    "Sharpness": _enhance(_sharpness, False), "SharpnessIncreasing": _enhance(_sharpness, True),
    "ShearX": _shear_x, "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel, "TranslateYRel": _translate_y_rel,
}


def apply_op(image, name, magnitude, sign, fill=(128.0, 128.0, 128.0)):
  """One named op at a given magnitude (0..10) and sign; exposed for tests."""
  image = tf.convert_to_tensor(image, tf.float32)
  return OPS[name](image, tf.convert_to_tensor(magnitude, tf.float32),
                   tf.convert_to_tensor(sign, tf.float32), fill)


def randaugment(image, policy: RandAugmentPolicy, seed):
  """timm RandAugment: num_layers ops drawn with replacement, each applied with prob `policy.prob`."""
  branches = [OPS[name] for name in policy.ops]
  for layer in range(policy.num_layers):
    s = [tf.random.experimental.stateless_fold_in(seed, 4 * layer + k) for k in range(4)]
    op = tf.random.stateless_uniform([], s[0], 0, len(branches), dtype=tf.int32)
    apply = tf.random.stateless_uniform([], s[1]) < policy.prob
    magnitude = tf.constant(policy.magnitude, tf.float32)
    if policy.magnitude_std > 0:
      magnitude += policy.magnitude_std * tf.random.stateless_normal([], s[2])
    magnitude = tf.clip_by_value(magnitude, 0.0, policy.magnitude_max)
    sign = tf.where(tf.random.stateless_uniform([], s[3]) < 0.5, -1.0, 1.0)

    def run(image=image, op=op, magnitude=magnitude, sign=sign):
      fns = [lambda f=f: f(image, magnitude, sign, policy.fill) for f in branches]
      return tf.switch_case(op, fns)

    image = tf.cond(apply, run, lambda image=image: image)
    image = tf.ensure_shape(image, [None, None, 3])
  return image


def random_erasing(image, prob, seed, min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
  """timm RandomErasing, mode 'pixel', one box: per-pixel N(0, 1) noise on a normalised image."""
  s = [tf.random.experimental.stateless_fold_in(seed, k) for k in range(6)]
  h = tf.shape(image)[0]
  w = tf.shape(image)[1]
  area = tf.cast(h * w, tf.float32)
  target = tf.random.stateless_uniform([attempts], s[0], min_area, max_area) * area
  log_ratio = tf.random.stateless_uniform([attempts], s[1], math.log(min_aspect), -math.log(min_aspect))
  ratio = tf.exp(log_ratio)
  eh = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  ew = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  valid = (eh < h) & (ew < w)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)  # First attempt that fits.
  eh, ew = eh[first], ew[first]
  do = (tf.random.stateless_uniform([], s[2]) < prob) & tf.reduce_any(valid)
  top = tf.random.stateless_uniform([], s[3], 0, tf.maximum(h - eh, 0) + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], s[4], 0, tf.maximum(w - ew, 0) + 1, dtype=tf.int32)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & do
  # Noise is drawn only when erasing happens (3 in 4 images skip it at p=0.25).
  return tf.cond(do, lambda: tf.where(box[..., None], tf.random.stateless_normal(tf.shape(image), s[5]), image),
                 lambda: image)
