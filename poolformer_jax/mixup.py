"""Mixup / CutMix and label smoothing on device, one draw per batch (timm's `mode='batch'`).

timm pairs each image with the batch reversed (`x.flip(0)`). Reversing a batch that is sharded
over many chips moves every image across the interconnect, and makes the pairing depend on how
the batch is split. Here each image is paired with its neighbour (rows 2i and 2i+1 swap): as
random a partner (the batch order is random), always on the same chip, and the same pairing on
1 chip or a pod, so a sharded step computes exactly what a single-device step does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """timm's targets: `1 - smoothing + smoothing / n` on the label, `smoothing / n` elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def partner(x):
  """Rows 2i and 2i+1 swapped (the batch size must be even)."""
  pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return pairs[:, ::-1].reshape(x.shape)


def beta_pair(key, a: float, b: float):
  """One draw of Beta(a, a) and one of Beta(b, b) (1.0 for an alpha of 0).

  Beta(a, a) is G1 / (G1 + G2) for G1, G2 ~ Gamma(a), i.e. sigmoid(log G1 - log G2): the four
  log-gammas in one `jax.random.loggamma` call. Two `jax.random.beta` calls would sample four
  gammas in four rejection loops, which doubled the compile time of a small train step.
  """
  alphas = jnp.array([a, a, b, b], jnp.float32)
  logs = jax.random.loggamma(key, jnp.maximum(alphas, 1e-3))
  lams = jax.nn.sigmoid(logs[0::2] - logs[1::2])
  return tuple(lams[i] if alpha > 0 else jnp.float32(1.0) for i, alpha in enumerate((a, b)))


def cutmix_box(key, lam, height: int, width: int):
  """timm's `rand_bbox` + `cutmix_bbox_and_lam`: a box of area ~(1 - lam) clipped to the image.

  Returns the [H, W] boolean mask of the box and lam corrected for the clipped area.
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  corrected = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  return box, corrected


def mix(key, images, labels, *, num_classes: int, mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5,
        label_smoothing: float = 0.0):
  """(images NHWC, int labels) -> (mixed images, soft targets [N, num_classes]).

  With probability `prob` the batch is mixed: CutMix with probability `switch_prob` when both
  alphas are positive (else whichever is), lam ~ Beta(alpha, alpha). Targets are the smoothed
  one-hots mixed with the same lam. Both alphas 0: images unchanged, smoothed targets.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  if images.shape[0] % 2:
    raise ValueError(f"mixup pairs images within the batch; batch size {images.shape[0]} is odd")
  k_apply, k_switch, k_lam, k_box = jax.random.split(key, 4)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix, lam_cut = beta_pair(k_lam, mixup_alpha, cutmix_alpha)
  height, width = images.shape[1:3]
  box, lam_box = cutmix_box(k_box, lam_cut, height, width)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  # Per-pixel weight of the image itself: 1 outside the box (CutMix), lam everywhere (Mixup).
  weight = jnp.where(use_cutmix, (~box).astype(jnp.float32), lam_mix)[None, :, :, None]
  weight = jnp.where(apply, weight, 1.0).astype(images.dtype)
  mixed = images * weight + partner(images) * (1 - weight)
  return mixed, lam * targets + (1.0 - lam) * partner(targets)
