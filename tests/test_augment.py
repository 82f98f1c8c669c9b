"""On-device augmentation: each RandAugment op against the TensorFlow op it replaces and PIL,
the policy's draws against timm's, random erasing, and the batch function the train step runs."""

import random

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

from poolformer_jax import augment
from poolformer_jax import defaults
from poolformer_jax import pretrained
from poolformer_jax import tf_augment


_FILL = (124.0, 116.0, 104.0)  # timm: round(255 * ImageNet mean).
_ALL_OPS = tuple(dict.fromkeys(augment.INCREASING_OPS + augment.DEFAULT_OPS))


def _photo(h=56, w=64):
  import skimage.data  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC))


def _smooth_image(rng, h, w):
  """Photo-like content: smooth colour waves plus mild noise."""
  y, x = np.mgrid[0:h, 0:w]
  img = 128 + 80 * np.sin(x[..., None] / 5.0 + y[..., None] / 7.0 + np.array([0, 1, 2]))
  return np.clip(img + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


_apply = jax.jit(augment.apply_op, static_argnums=(1, 4))


@pytest.mark.parametrize("name", _ALL_OPS)
def test_each_op_matches_the_tensorflow_op_within_one_grey_level(name):
  """The host's ops (poolformer_jax.tf_augment): same formulas, so every pixel within
  one grey level (float rounding at .5 boundaries) at every magnitude and sign. Few pixels
  differ at all; Contrast's grey mean, summed in another order, can land on the other side of
  a .5 and move the whole image's blend by one level (measured: 10% of pixels at one magnitude)."""
  image = _photo().astype(np.float32)
  for magnitude in (0.0, 2.5, 5.0, 9.0, 10.0):
    for sign in (1.0, -1.0):
      ours = np.asarray(_apply(image, name, magnitude, sign, _FILL))
      theirs = tf_augment.apply_op(image, name, magnitude, sign, _FILL).numpy()
      diff = np.abs(ours - theirs)
      assert diff.max() <= 1.0 and diff.mean() < 0.15, (name, magnitude, sign, diff.max())


def _pil_ops(pil, sign):
  f = 1 + sign * 0.9 * 0.9  # The 'Increasing' enhance factor at m=9.
  px = sign * 0.9 * 0.45
  fill = tuple(map(int, _FILL))
  affine = lambda m: pil.transform(pil.size, Image.AFFINE, m, resample=Image.BILINEAR,
                                   fillcolor=fill)
  lut = [min(255, i + int(0.9 * 110)) if i < 128 else i for i in range(256)] * 3
  return {
      "Invert": (ImageOps.invert(pil), 0), "AutoContrast": (ImageOps.autocontrast(pil), 1),
      "Equalize": (ImageOps.equalize(pil), 0),
      "PosterizeIncreasing": (ImageOps.posterize(pil, 4 - int(0.9 * 4)), 0),
      "SolarizeIncreasing": (ImageOps.solarize(pil, 256 - int(0.9 * 256)), 0),
      "SolarizeAdd": (pil.point(lut), 0),
      "ColorIncreasing": (ImageEnhance.Color(pil).enhance(f), 2),
      "ContrastIncreasing": (ImageEnhance.Contrast(pil).enhance(f), 2),
      "BrightnessIncreasing": (ImageEnhance.Brightness(pil).enhance(f), 2),
      "SharpnessIncreasing": (ImageEnhance.Sharpness(pil).enhance(f), 2),
      "Rotate": (pil.rotate(sign * 27, resample=Image.BILINEAR, fillcolor=fill), None),
      "ShearX": (affine((1, sign * 0.27, 0, 0, 1, 0)), None),
      "ShearY": (affine((1, 0, 0, sign * 0.27, 1, 0)), None),
      "TranslateXRel": (affine((1, 0, px * pil.size[0], 0, 1, 0)), None),
      "TranslateYRel": (affine((1, 0, 0, 0, 1, px * pil.size[1])), None),
  }


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_randaugment_ops_match_pil(sign):
  """Point ops: exact up to PIL's truncation (tolerance in grey levels given per op).

  Geometric ops: PIL clamps at the border where we blend in the fill colour, so a one-pixel
  band differs; we require <5% of pixels off by more than 3 levels and a small mean error.
  """
  image = _smooth_image(np.random.default_rng(1), 40, 48)
  refs = _pil_ops(Image.fromarray(image), sign)
  assert set(refs) == set(augment.INCREASING_OPS)
  for name, (ref, tol) in refs.items():
    out = np.asarray(_apply(image.astype(np.float32), name, 9.0, sign, _FILL))
    assert out.shape == image.shape
    diff = np.abs(out - np.asarray(ref, np.float32))
    if tol is None:
      assert (diff > 3).mean() < 0.05 and diff.mean() < 1.5, (name, (diff > 3).mean(), diff.mean())
    else:
      assert diff.max() <= tol, (name, diff.max())


def test_parse_randaugment():
  p = augment.parse_randaugment("rand-m9-mstd0.5-inc1", pretrained.IMAGENET_MEAN)
  assert (p.magnitude, p.magnitude_std, p.num_layers, p.ops) == (9.0, 0.5, 2, augment.INCREASING_OPS)
  assert p.fill == _FILL
  default = augment.parse_randaugment("rand-m7-n3", pretrained.IMAGENET_MEAN)
  assert default.ops == augment.DEFAULT_OPS and default.num_layers == 3
  with pytest.raises(ValueError, match="Unknown RandAugment field"):
    augment.parse_randaugment("rand-m9-x3", pretrained.IMAGENET_MEAN)


def _timm_draws(n_images, spec="rand-m9-mstd0.5-inc1"):
  """timm's RandAugment run `n_images` times on a tiny image, recording per layer the op it
  applied (None: skipped), the magnitude it drew and the sign it chose (the ops themselves are
  replaced by no-ops: only the draws are compared)."""
  from helpers_torch import import_timm  # pylint: disable=g-import-not-at-top
  aa = import_timm().data.auto_augment
  ra = aa.rand_augment_transform(spec, {"img_mean": tuple(int(f) for f in _FILL)})
  layer = {}

  def wrap(op):
    level_fn, name = op.level_fn, op.name

    def level(magnitude, hparams):
      layer["magnitude"] = magnitude
      args = level_fn(magnitude, hparams)
      layer["sign"] = float(np.sign(args[0])) if args and args[0] else 0.0
      return args

    def aug(img, *args, **kwargs):
      del args, kwargs
      layer["op"] = name
      return img

    op.aug_fn = aug
    if level_fn is not None:
      op.level_fn = level
    return op

  ops = [wrap(op) for op in ra.ops]

  class Recorded:  # What RandAugment.__call__ picks from: records each layer's outcome.
    def __init__(self, op):
      self.op = op

    def __call__(self, img):
      layer.clear()
      out = self.op(img)
      records.append((layer.get("op"), layer.get("magnitude"), layer.get("sign")))
      return out

  ra.ops = [Recorded(op) for op in ops]
  random.seed(0)
  np.random.seed(0)
  records = []
  img = Image.new("RGB", (4, 4))
  for _ in range(n_images):
    ra(img)
  return records


def test_policy_draws_match_timms_statistically():
  """Op frequencies (skips included), magnitudes and signs of 20k layers each: ours and timm's
  are the same distributions (chi-square and Kolmogorov-Smirnov, p > 1e-3; measured: an apply
  probability of 0.45 instead of 0.5 gives p ~ 1e-15, a magnitude std of 0.3 p ~ 1e-61)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = 10_000
  timm = _timm_draws(n)
  policy = augment.parse_randaugment("rand-m9-mstd0.5-inc1", pretrained.IMAGENET_MEAN)
  ops, mags, signs = jax.vmap(lambda k: augment.sample_layers(k, policy))(
      jax.random.split(jax.random.key(0), n))
  ops, mags, signs = (np.asarray(x).ravel() for x in (ops, mags, signs))
  names = list(policy.ops) + [None]
  ours_counts = np.bincount(ops, minlength=len(names))
  timm_counts = np.array([sum(r[0] == name for r in timm) for name in names])
  assert ours_counts.sum() == timm_counts.sum() == 2 * n
  assert stats.chi2_contingency(np.stack([ours_counts, timm_counts]))[1] > 1e-3
  assert abs(ours_counts[-1] / (2 * n) - 0.5) < 0.02  # Each layer skipped with p = 0.5.
  # Magnitudes of the applied ops with a magnitude: N(9, 0.5) clipped to [0, 10].
  has_level = {n for n in policy.ops if n not in ("AutoContrast", "Equalize", "Invert")}
  ours_m = mags[[names[o] in has_level for o in ops]]
  timm_m = np.array([r[1] for r in timm if r[0] in has_level])
  assert stats.ks_2samp(ours_m, timm_m).pvalue > 1e-3
  assert 0.45 < np.std(ours_m) < 0.55 and ours_m.max() <= 10.0
  # Signs of the ops timm negates at random: half each.
  negated = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
             "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
  ours_neg = signs[[names[o] in negated for o in ops]] < 0
  timm_neg = np.array([r[2] < 0 for r in timm if r[0] in {"Rotate", "ShearX", "ShearY",
                                                         "TranslateXRel", "TranslateYRel"}])
  assert abs(ours_neg.mean() - 0.5) < 0.02 and abs(timm_neg.mean() - 0.5) < 0.03


def test_randaugment_changes_images_and_is_seeded():
  image = jnp.asarray(_smooth_image(np.random.default_rng(2), 32, 32), jnp.float32)
  policy = augment.parse_randaugment("rand-m9-mstd0.5-inc1", pretrained.IMAGENET_MEAN)
  run = jax.jit(lambda k: augment.randaugment(k, image, policy))
  outs = [np.asarray(run(jax.random.key(s))) for s in range(12)]
  np.testing.assert_array_equal(outs[0], np.asarray(run(jax.random.key(0))))
  changed = sum(not np.array_equal(o, image) for o in outs)
  assert 3 <= changed <= 12  # Each of 2 ops applies with p=0.5: P(unchanged) ~ 1/4 per seed.
  assert all(o.min() >= 0 and o.max() <= 255 and np.all(o == np.round(o)) for o in outs)


def test_random_erasing():
  image = jnp.zeros([32, 32, 3])
  erase = jax.jit(augment.random_erasing)
  for s in range(20):
    erased = np.any(np.asarray(erase(jax.random.key(s), image, 1.0)) != 0, axis=-1)
    area = erased.mean()
    assert 0.02 * 0.8 <= area <= 1 / 3 * 1.2, area  # timm's area range (rounding slack).
    rows, cols = np.where(erased)
    assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # One rectangle.
  assert np.all(np.asarray(erase(jax.random.key(0), image, 0.0)) == 0)


def test_augment_batch_draws_per_sample_and_normalises():
  """Each sample its own draw (identical inputs come out different), the same key gives the
  same batch, and with augmentation off the output is the normalised input."""
  cfg = defaults.default_config().data
  cfg.randaugment_on = "device"
  images = jnp.asarray(np.repeat(_smooth_image(np.random.default_rng(3), 32, 32)[None], 8, 0))
  run = jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))
  out = np.asarray(run(jax.random.key(1), images))
  assert out.dtype == np.float32 and out.shape == (8, 32, 32, 3)
  assert len({o.tobytes() for o in out}) >= 6
  np.testing.assert_array_equal(out, np.asarray(run(jax.random.key(1), images)))
  cfg.randaugment_on = "host"  # RandAugment is the host's: here normalisation, erasing only.
  cfg.random_erasing = 0.0
  plain = np.asarray(augment.augment_batch(jax.random.key(1), images, cfg))
  expected = (np.asarray(images, np.float32) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
  np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-5)
