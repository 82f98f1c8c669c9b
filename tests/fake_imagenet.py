"""Tiny fake ILSVRC2012 tar files, for preparing the REAL TFDS `imagenet2012` builder in tests.

The builder reads `ILSVRC2012_img_train.tar` (a tar of per-synset tars `nXXXXXXXX.tar` holding
`nXXXXXXXX_<i>.JPEG`) and `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_<8 digits>.JPEG`). It labels
validation images by zipping the sorted names in the val tar with its bundled
`validation_labels.txt`, so the fake val set uses the first `num_val` real file names, which
get their real labels. Train synsets are taken from those labels so both splits share classes.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image


def _validation_synsets():
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  with open(imagenet_common.label_names_file()) as f:
    names = f.read().split()
  with open(os.fspath(imagenet_common.tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME))) as f:  # pylint: disable=protected-access
    val = f.read().split()
  return names, val


def _jpeg(rng, size, gray=False):
  h, w = size
  # Smooth colour gradients plus noise: compressible like photos, not flat.
  y, x = np.mgrid[0:h, 0:w]
  base = rng.uniform(0, 255, size=3)
  img = base + 60 * np.sin(x[..., None] / rng.uniform(3, 9) + y[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, 3))
  img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
  pil = Image.fromarray(img).convert("L") if gray else Image.fromarray(img)
  buf = io.BytesIO()
  pil.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_fake_ilsvrc(manual_dir, *, num_classes=4, train_per_class=6, num_val=13,
                     size_range=((40, 72), (40, 72)), seed=0):
  """Writes the two manual tars; returns {'train': {file_name: label}, 'validation': {...}}.

  Image sizes are drawn per image from size_range ((min_h, max_h), (min_w, max_w)); one train
  image is grayscale to exercise channel conversion.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  names, val_synsets = _validation_synsets()
  index = {n: i for i, n in enumerate(names)}

  def size():
    return (int(rng.integers(*size_range[0], endpoint=True)), int(rng.integers(*size_range[1], endpoint=True)))

  expected = {"train": {}, "validation": {}}
  val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, num_val + 1)]
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for name, synset in zip(val_names, val_synsets):
      _add(tar, name, _jpeg(rng, size()))
      expected["validation"][name] = index[synset]

  synsets = list(dict.fromkeys(val_synsets[:max(num_val, 1)]))[:num_classes]
  synsets += [s for s in names if s not in synsets][:num_classes - len(synsets)]
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as tar:
    for c, synset in enumerate(synsets):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as sub:
        for i in range(train_per_class):
          fname = f"{synset}_{i}.JPEG"
          _add(sub, fname, _jpeg(rng, size(), gray=(c == 0 and i == 0)))
          expected["train"][fname] = index[synset]
      _add(tar, f"{synset}.tar", buf.getvalue())
  return expected


def prepare_fake_imagenet(data_dir, manual_dir, **kwargs):
  """Makes the fake tars and runs the real imagenet2012 builder on them; returns expected labels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  expected = make_fake_ilsvrc(manual_dir, **kwargs)
  builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return expected
