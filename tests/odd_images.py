"""Image folders with the files real datasets hold: odd but decodable formats, and broken ones."""

import io
import os

import numpy as np
from PIL import Image


def smooth(rng, h, w):
  """Photo-like 8-bit RGB: smooth colour waves plus mild noise (compresses like a photo)."""
  y, x = np.mgrid[0:h, 0:w]
  img = 128 + 80 * np.sin(x[..., None] / 5.0 + y[..., None] / 7.0 + rng.uniform(0, 6, 3))
  return np.clip(img + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def png16(array: np.ndarray) -> bytes:
  """A 16-bit RGB PNG (PIL cannot write one; TF can)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.encode_png(tf.constant(array, tf.uint16)).numpy()


def odd_files(rng, size=24):
  """{name: (bytes, expected 8-bit RGB or None if undecodable)}, the expectations computed
  independently of TensorFlow (PIL, or arithmetic on the source array)."""
  rgb = smooth(rng, size, size)
  cmyk_bytes = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
  wide16 = (smooth(rng, size, size).astype(np.uint16) * 257
            + rng.integers(0, 257, (size, size, 3))).astype(np.uint16)
  gray16 = (rng.random((size, size)) * 65535).astype(np.uint16)
  jpeg = encode(Image.fromarray(smooth(rng, size, size)), "JPEG", quality=90)
  png_as_jpg = smooth(rng, size, size)
  tiny = smooth(rng, 1, 1)
  return {
      # Decodable, if odd: each must train and evaluate.
      "cmyk.jpg": (cmyk_bytes, np.asarray(Image.open(io.BytesIO(cmyk_bytes)).convert("RGB"))),
      "rgb16.png": (png16(wide16), (wide16 >> 8).astype(np.uint8)),
      "gray16.png": (encode(Image.fromarray(gray16), "PNG"),
                     np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2)),
      "png_named.jpg": (encode(Image.fromarray(png_as_jpg), "PNG"), png_as_jpg),
      "one_pixel.png": (encode(Image.fromarray(tiny), "PNG"), tiny),
      # Undecodable: listed and left out.
      "truncated.jpg": (jpeg[:len(jpeg) // 2], None),
      "empty.jpg": (b"", None),
  }


def make_folder(root, rng, *, per_class, classes=("ant", "bee", "cat"), odd_in=("train",),
                bad_in=("train",)):
  """root/<split>/<class>/ with `per_class[split]` plain JPEGs per class, plus the odd files of
  `odd_files` (decodable ones in `odd_in` splits, broken ones in `bad_in`) spread over classes.
  Returns {split: [(relative path, expected RGB or None)]} for the odd files."""
  odd = {}
  for split, n in per_class.items():
    for ci, cls in enumerate(classes):
      os.makedirs(root / split / cls, exist_ok=True)
      for i in range(n):
        image = Image.fromarray(smooth(rng, 20 + i % 5, 24))
        (root / split / cls / f"{i:03d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    odd[split] = []
    for k, (name, (data, expected)) in enumerate(odd_files(rng).items()):
      if split in (bad_in if expected is None else odd_in):
        rel = os.path.join(split, classes[k % len(classes)], name)
        (root / rel).write_bytes(data)
        odd[split].append((rel, expected))
  return odd
