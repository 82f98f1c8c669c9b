"""Classify images with a converted or trained PoolFormer: load, preprocess, predict.

`preprocess` reproduces the release's eval transform (torchvision Resize + CenterCrop, as timm
builds it): resize the short side to int(size / crop_pct) with PIL bicubic, the long side to
int(new_short * long / short), center crop at offsets int(round(margin / 2)), scale to [0, 1],
normalise. HF's PoolFormerImageProcessor resizes identically (PIL) but floors the crop offset,
so it sits one pixel higher/lefter when a margin is 3 mod 4; everywhere else the two agree to
float rounding (measured in benchmarks/preprocess_parity.py). `reference="hf"` follows HF's.
No torch, no TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageOps, UnidentifiedImageError

from poolformer_jax import cpu_tuning
from poolformer_jax import pretrained
from poolformer_jax.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# ---------------------------------------------------------------------------
# Reading and preprocessing.
# ---------------------------------------------------------------------------


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
  """Any PIL mode to HxWx3 uint8. 16-bit data is rescaled (PIL's own convert would clip it)."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(image).astype(np.float64)
    a = a / 257.0 if a.max() > 255 or image.mode.startswith("I;16") else a
    a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if image.mode == "F":
    raise ImageError("32-bit float images are not supported; save as 8- or 16-bit")
  # RGBA/LA/P: like HF's convert_rgb and timm's loader, alpha is dropped (not composited).
  return np.asarray(image.convert("RGB"))


def load_image(source: Any) -> np.ndarray:
  """A file path, bytes, PIL image or numpy array -> RGB uint8 HxWx3, EXIF orientation applied.

  Arrays may be HxW (grayscale), HxWx1/3/4, uint8 or uint16 (scaled to 8 bits).
  """
  if isinstance(source, (str, os.PathLike, bytes, bytearray)):
    is_path = not isinstance(source, (bytes, bytearray))
    name = os.fspath(source) if is_path else "bytes"
    if is_path and not os.path.isfile(name):
      raise ImageError(f"{name}: no such file")
    try:
      with Image.open(name if is_path else io.BytesIO(source)) as im:
        im.load()
        return _to_rgb_uint8(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
  if isinstance(source, Image.Image):
    return _to_rgb_uint8(ImageOps.exif_transpose(source))
  if isinstance(source, np.ndarray):
    a = source
    if a.dtype == np.uint16:
      a = np.round(a / 257.0).astype(np.uint8)
    if a.dtype != np.uint8:
      raise ImageError(f"array images must be uint8 or uint16, got {a.dtype}")
    if a.ndim == 2:
      a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
      raise ImageError(f"array images must be HxW or HxWxC with C in 1, 3, 4; got {a.shape}")
    if a.shape[-1] == 1:
      a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])
  raise ImageError(f"cannot read an image from {type(source).__name__}")


def resize_and_crop(image: np.ndarray, *, input_size: int = 224, crop_pct: float = 0.9,
                    interpolation: str = "bicubic", reference: str = "release") -> np.ndarray:
  """Short side to int(input_size / crop_pct), then a centered input_size crop; uint8 out."""
  h, w = image.shape[:2]
  new_short = int(input_size / crop_pct)
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(new_short * long / short)
  new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
  resample = Image.Resampling[interpolation.upper()]  # bicubic, bilinear, nearest, lanczos, ...
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
  # torchvision's CenterCrop rounds the offset (half to even, as Python's round()); HF floors it.
  offset = {"release": lambda margin: int(round(margin / 2)), "hf": lambda margin: margin // 2}
  if reference not in offset:
    raise ValueError(f"reference={reference!r}; use 'release' or 'hf'")
  top, left = offset[reference](new_h - input_size), offset[reference](new_w - input_size)
  return resized[top:top + input_size, left:left + input_size]


def preprocess(images: Any, preprocessing: Mapping[str, Any] | None = None, *,
               reference: str = "release") -> np.ndarray:
  """Images (one or a list; paths, PIL, arrays) -> float32 NHWC batch ready for the model.

  `preprocessing` is the dict from `PretrainedInfo` (input_size, crop_pct, interpolation,
  mean, std); the default is the release's ImageNet eval transform for S models. `reference`:
  'release' (default), the transform the released accuracies were measured with (as timm and
  the trainer's eval): use it to reproduce them; 'hf', transformers' PoolFormerImageProcessorPil
  exactly (the crop up to a pixel off on some images): use it to match an HF pipeline's logits.
  """
  p = {**pretrained.default_preprocessing(), **(preprocessing or {})}
  if isinstance(images, (str, os.PathLike, bytes, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim in (2, 3)):
    images = [images]
  mean = np.asarray(p["mean"], np.float32)
  std = np.asarray(p["std"], np.float32)
  out = []
  for image in images:
    pixels = resize_and_crop(load_image(image), input_size=int(p["input_size"]),
                             crop_pct=float(p["crop_pct"]), interpolation=p["interpolation"],
                             reference=reference)
    out.append((pixels.astype(np.float32) * np.float32(1 / 255) - mean) / std)
  return np.stack(out)


# ---------------------------------------------------------------------------
# Prediction.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Top-k classes of one image, best first."""

  indices: tuple[int, ...]
  labels: tuple[str, ...]
  probs: tuple[float, ...]


@functools.cache
def _probabilities_fn(graphdef):
  """The jitted softmax forward for one model structure (its weights are an argument)."""
  def probabilities(state, x):
    return jax.nn.softmax(nnx.merge(graphdef, state)(x).astype(jnp.float32), axis=-1)
  # Compiled for (and run on) the default device.
  return jax.jit(probabilities, compiler_options=cpu_tuning.forward_compiler_options(
      jax.devices()[0].platform))


def predict(model, images: Sequence[Any], *, preprocessing: Mapping[str, Any] | None = None,
            labels: Sequence[str] | None = None, top_k: int = 5, batch_size: int | None = None,
            reference: str = "release") -> list[Prediction]:
  """Top-k predictions for each image (`preprocess` explains `reference`).

  `batch_size` images per forward pass. Given, every batch is padded to it (the padding's
  outputs are dropped), so the forward compiles once per model and batch size, however many
  images each call has. By default it is the number of images, at most 32: a few images cost
  only their own work (one program per count). `labels` default to the ImageNet names when
  the model has 1000 (ImageNet-1k) or 21841 (ImageNet-21k) classes.
  """
  num_classes = model.cfg.num_classes
  if labels is None:
    labels = pretrained.imagenet_labels(num_classes) or [str(i) for i in range(num_classes)]
  top_k = min(top_k, num_classes)
  if batch_size is None:
    batch_size = max(1, min(32, len(images)))
  graphdef, state = nnx.split(model)
  probabilities = _probabilities_fn(graphdef)
  results = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    x = preprocess(chunk, preprocessing, reference=reference)
    n = x.shape[0]
    x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    probs = np.asarray(probabilities(state, jnp.asarray(x)))[:n]
    for row in probs:
      idx = np.argsort(-row)[:top_k]
      results.append(Prediction(tuple(int(i) for i in idx), tuple(labels[i] for i in idx),
                                tuple(float(row[i]) for i in idx)))
  return results


def list_image_files(paths: Iterable[str]) -> list[str]:
  """Files as given; folders expanded recursively to their image files (sorted)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      for root, _, names in sorted(os.walk(path)):
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
    else:
      files.append(path)
  return files


def classify_files(model, paths: Sequence[str], *,
                   preprocessing: Mapping[str, Any] | None = None,
                   labels: Sequence[str] | None = None, top_k: int = 5, batch_size: int = 32,
                   progress: bool = False) -> tuple[dict[str, Prediction], dict[str, str]]:
  """Classifies image files, `batch_size` files at a time (so memory stays flat); unreadable
  ones are skipped and returned with their error. Fewer files than `batch_size` are one batch
  of just them: `main.py --mode=predict cat.jpg` runs one image, not one padded to 32.

  Returns ({path: Prediction} in input order, {path: error message}).
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  results, failed = {}, {}
  batch_size = max(1, min(batch_size, len(paths)))
  for start in tqdm.trange(0, len(paths), batch_size, unit="batch", disable=not progress):
    images = {}
    for path in paths[start:start + batch_size]:
      try:
        images[path] = load_image(path)
      except ImageError as e:
        failed[path] = str(e)
    results.update(zip(images, predict(model, list(images.values()), preprocessing=preprocessing,
                                       labels=labels, top_k=top_k, batch_size=batch_size)))
  return results, failed


def format_table(results: Mapping[str, Prediction]) -> str:
  """One line per image: path, then the top-k as 'label (prob%)'."""
  lines = []
  for path, pred in results.items():
    tops = ", ".join(f"{label} ({p:.1%})" for label, p in zip(pred.labels, pred.probs))
    lines.append(f"{path}\t{tops}")
  return "\n".join(lines)


def format_jsonl(results: Mapping[str, Prediction], failed: Mapping[str, str]) -> str:
  """One JSON object per input: {"path", "top_k": [{"index", "label", "prob"}]} or {"path", "error"}."""
  import json  # pylint: disable=g-import-not-at-top
  lines = [json.dumps({"path": path, "top_k": [
      {"index": i, "label": l, "prob": round(p, 6)}
      for i, l, p in zip(pred.indices, pred.labels, pred.probs)]})
           for path, pred in results.items()]
  lines += [json.dumps({"path": path, "error": msg}) for path, msg in failed.items()]
  return "\n".join(lines)
