"""scikit-learn's handwritten digits as a TFDS dataset: the embedded demo's real, offline data.

1797 real 8x8 grayscale scans (UCI optdigits), 10 classes. The data ships inside scikit-learn,
so `download_and_prepare()` needs no network and the demo needs no manual step. Going through
TFDS (PNG-encoded images in TFRecords) makes the demo run the very same input pipeline as
ImageNet or any other TFDS dataset.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# Fixed, stratified split: 20% test, seed 0 -> 1437 train / 360 test images.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def load_digits_arrays():
  """Returns (images uint8 [N, 8, 8, 1] in 0..255, labels int64 [N]) from scikit-learn."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  # The scans are 0..16 intensities; scale to the usual 0..255 range.
  images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int64)


def split_indices(labels):
  """The fixed stratified train/test split, as sorted index arrays."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  train_idx, test_idx = train_test_split(
      np.arange(len(labels)), test_size=_TEST_FRACTION, random_state=_SPLIT_SEED,
      stratify=labels)
  return np.sort(train_idx), np.sort(test_idx)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn handwritten digits (8x8 grayscale, 10 classes), stratified 80/20 split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return self.dataset_info_from_configs(
        description="scikit-learn's copy of the UCI optdigits test set: 1797 8x8 scans of "
                    "handwritten digits, intensities scaled from 0..16 to 0..255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local data: nothing to download.
    images, labels = load_digits_arrays()
    train_idx, test_idx = split_indices(labels)
    return {
        "train": self._generate_examples(images, labels, train_idx),
        "test": self._generate_examples(images, labels, test_idx),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
