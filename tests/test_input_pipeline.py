"""Input pipeline: datasets, determinism and exact resume, process split, masked eval, ImageNet builder."""

import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO
from poolformer_jax import dataset_info
from poolformer_jax import defaults
from poolformer_jax import errors
from poolformer_jax import input_pipeline as ip

sys.path.insert(0, os.path.dirname(__file__))
import fake_imagenet  # pylint: disable=g-import-not-at-top,wrong-import-position
import odd_images  # pylint: disable=g-import-not-at-top,wrong-import-position
from poolformer_jax import folder_scan  # pylint: disable=g-import-not-at-top,wrong-import-position


# ---------------------------------------------------------------------------
# Fixtures and helpers.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_digits"))


def _digits_config(data_dir, *, augmented=True, **overrides):
  c = defaults.default_config().data
  c.dataset = "digits"
  c.data_dir = data_dir
  c.eval_split = "test"
  c.image_size = 16
  c.crop_pct = 1.0
  c.hflip = False
  c.shuffle_buffer = 2048
  if augmented:
    c.rrc_scale = (0.5, 1.0)
  else:  # Every image a deterministic function of its example: lets tests identify examples.
    c.rrc_scale = None
    c.train_interpolation = "bicubic"
    c.randaugment = ""
    c.random_erasing = 0.0
  for k, v in overrides.items():
    c[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _hashes(images):
  return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    np.testing.assert_array_equal(x["label"], y["label"], err_msg=f"batch {i}")
    np.testing.assert_array_equal(x["image"], y["image"], err_msg=f"batch {i}")


def _smooth_image(rng, h, w):
  """Photo-like content: smooth colour waves plus mild noise."""
  y, x = np.mgrid[0:h, 0:w]
  img = 128 + 80 * np.sin(x[..., None] / 5.0 + y[..., None] / 7.0 + np.array([0, 1, 2]))
  return np.clip(img + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


# ---------------------------------------------------------------------------
# Digits (the demo's real data).
# ---------------------------------------------------------------------------


def test_digits_builder_prepares_and_holds_every_sklearn_image_once(digits_dir):
  from sklearn.datasets import load_digits
  info = ip.Dataset(_digits_config(digits_dir)).info  # Prepares on first use.
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 1437, 360)
  assert info.label_names == tuple(str(i) for i in range(10))
  # Compile mode, which reads no data, works from the same sizes.
  assert dataclasses.replace(info, label_names=None) == dataset_info.KNOWN["digits"]

  ref = load_digits()
  ref_images = np.round(ref.images * 255 / 16).astype(np.uint8)
  builder = tfds.builder("digits", data_dir=digits_dir)
  stored = {}
  for split in ("train", "test"):
    ex = list(tfds.as_numpy(builder.as_dataset(split=split)))
    assert all(e["image"].shape == (8, 8, 1) and e["image"].dtype == np.uint8 for e in ex)
    stored[split] = ex
  everything = collections.Counter(
      (e["image"][..., 0].tobytes(), int(e["label"])) for e in stored["train"] + stored["test"])
  assert everything == collections.Counter(
      (im.tobytes(), int(y)) for im, y in zip(ref_images, ref.target))
  # Stratified: each class's test share is 20% of the class, to within one image.
  class_sizes = np.bincount(ref.target, minlength=10)
  test_sizes = np.bincount([int(e["label"]) for e in stored["test"]], minlength=10)
  assert np.all(np.abs(test_sizes - 0.2 * class_sizes) <= 1)


def test_digits_train_batches_have_the_promised_shapes(digits_dir):
  c = _digits_config(digits_dir, hflip=True)
  it = ip.Dataset(c).train_iterator(global_batch_size=32, seed=0)  # Process split from jax (1 process).
  b = next(it)
  # uint8 to the device (a quarter of float32's bytes): augmentation and normalisation are there.
  assert b["image"].shape == (32, 16, 16, 3) and b["image"].dtype == np.uint8
  assert b["label"].shape == (32,) and b["label"].dtype == np.int32
  assert np.all((b["label"] >= 0) & (b["label"] < 10))
  assert b["image"].min() == 0 and b["image"].max() > 200  # Black background, white strokes.


# ---------------------------------------------------------------------------
# Determinism and exact resume.
# ---------------------------------------------------------------------------


# ~30-50 s each on 2 shared cores (each iterator traces the RandAugment graph): the TFRecord
# variant is marked slow, the in-memory variant keeps exact resume covered in quick runs.
@pytest.mark.parametrize("cache", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["tfrecord", "cache"])
def test_train_stream_is_deterministic_and_resumes_exactly(digits_dir, cache):
  c = _digits_config(digits_dir, cache=cache)
  batch = 128  # 1437 // 128 = 11 steps per epoch.
  data = ip.Dataset(c, process_index=0, process_count=1)
  steps = data.batches_per_epoch(batch)
  assert steps == 11
  kw = dict(global_batch_size=batch)
  full = _take(data.train_iterator(seed=3, **kw), steps + 3)
  _assert_same_batches(full[:2], _take(data.train_iterator(seed=3, **kw), 2))
  # Resume mid-epoch (then crossing the epoch boundary), and inside a later epoch (whole epochs
  # skipped arithmetically, then records within the epoch).
  for k in (9, steps + 2):
    resumed = _take(data.train_iterator(seed=3, start_step=k, **kw), len(full) - k)
    _assert_same_batches(full[k:], resumed)
  other = next(data.train_iterator(seed=4, **kw))
  assert not np.array_equal(other["image"], full[0]["image"])


def test_each_epoch_is_a_fresh_permutation_without_repeats(digits_dir):
  c = _digits_config(digits_dir, augmented=False)
  batch, steps = 128, 11
  it = ip.Dataset(c, process_index=0, process_count=1).train_iterator(global_batch_size=batch, seed=0)
  epochs = [_take(it, steps) for _ in range(2)]
  ids = [_hashes(np.concatenate([b["image"] for b in e])) for e in epochs]
  labels = [np.concatenate([b["label"] for b in e]) for e in epochs]
  # Digits has a few pixel-identical scans, so compare (image, label) multisets, not sets.
  for i, l in zip(ids, labels):
    counts = collections.Counter(zip(i, l.tolist()))
    assert sum(counts.values()) == steps * batch
    assert max(counts.values()) <= 3  # No example repeated within an epoch (beyond true duplicates).
  assert ids[0] != ids[1]  # The order changes between epochs.
  # Both epochs draw from the same 1437 examples: most of epoch 1 was seen in epoch 0.
  assert len(set(ids[0]) & set(ids[1])) > 0.8 * len(set(ids[0]))


def test_processes_get_disjoint_shards_of_equal_length(digits_dir):
  c = _digits_config(digits_dir, augmented=False)
  seen = []
  for p in range(2):
    data = ip.Dataset(c, process_index=p, process_count=2)
    assert data.batches_per_epoch(64) == 1437 // 2 // 32
    it = data.train_iterator(global_batch_size=64, seed=0)
    batches = _take(it, 1437 // 2 // 32)
    assert all(b["image"].shape[0] == 32 for b in batches)
    seen.append(collections.Counter(_hashes(np.concatenate([b["image"] for b in batches]))))
  # Overlap only through pixel-identical duplicate scans in the dataset (a handful at most).
  assert sum((seen[0] & seen[1]).values()) <= 5


# ---------------------------------------------------------------------------
# Eval: padding and mask.
# ---------------------------------------------------------------------------


def _eval_examples(c, global_batch_size, process_count):
  """(image hash, label) of each real example over all processes, and the step counts."""
  found, step_counts = [], []
  for p in range(process_count):
    it, steps = ip.Dataset(c, process_index=p, process_count=process_count).eval_iterator(
        global_batch_size=global_batch_size)
    batches = list(it)
    assert len(batches) == steps
    step_counts.append(steps)
    for b in batches:
      assert b["image"].shape[0] == global_batch_size // process_count
      assert set(np.unique(b["mask"])) <= {0.0, 1.0}
      keep = b["mask"] > 0
      found += list(zip(_hashes(b["image"][keep]), b["label"][keep].tolist()))
      assert np.all(b["image"][~keep] == 0)
  return found, step_counts


def test_eval_counts_every_example_exactly_once_with_padding(digits_dir):
  c = _digits_config(digits_dir)
  reference, steps1 = _eval_examples(c, global_batch_size=50, process_count=1)  # 360 = 7 * 50 + 10.
  assert steps1 == [8] and len(reference) == 360
  found, steps = _eval_examples(c, global_batch_size=14, process_count=7)  # Shards of 52 and 51.
  assert steps == [26] * 7  # Same step count on every process, set by the largest shard.
  assert collections.Counter(found) == collections.Counter(reference)
  from sklearn.datasets import load_digits
  from poolformer_jax.datasets import digits
  _, test_idx = digits.split_indices(load_digits().target)
  assert collections.Counter(label for _, label in found) == collections.Counter(
      load_digits().target[test_idx].tolist())


# ---------------------------------------------------------------------------
# ImageNet: the real TFDS builder on tiny fake ILSVRC tars.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_imagenet_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("fake_imagenet")
  expected = fake_imagenet.prepare_fake_imagenet(root / "data", root / "manual")
  return str(root / "data"), expected


@pytest.mark.slow
def test_fake_imagenet_through_the_real_builder(fake_imagenet_dir):
  data_dir, expected = fake_imagenet_dir
  c = defaults.default_config().data  # The release recipe: RRC, flip, RandAugment, erasing.
  c.data_dir = data_dir
  c.image_size = 32
  c.crop_pct = 0.875
  c.shuffle_buffer = 64
  info = ip.Dataset(c).info
  assert info.num_classes == 1000 and len(info.label_names) == 1000
  assert (info.num_train_examples, info.num_eval_examples) == (24, 13)

  it = ip.Dataset(c, process_index=1, process_count=2).train_iterator(global_batch_size=8, seed=0)
  train_labels = set(expected["train"].values())
  for b in _take(it, 4):  # 12 examples per process: one step per epoch, so this spans 4 epochs.
    assert b["image"].shape == (4, 32, 32, 3)
    assert set(b["label"].tolist()) <= train_labels

  # 13 validation images, global batch 4 over 2 processes: shards of 7 and 6, 4 steps each.
  found, steps = _eval_examples(c, global_batch_size=4, process_count=2)
  assert steps == [4, 4]
  assert sorted(label for _, label in found) == sorted(expected["validation"].values())
  assert len(set(h for h, _ in found)) == 13


# ---------------------------------------------------------------------------
# Image folder.
# ---------------------------------------------------------------------------


def _make_folder(root, rng, per_class=(5, 3), classes=("cat", "ant", "bee")):
  for split, n in zip(("train", "val"), per_class):
    for ci, cls in enumerate(classes):
      os.makedirs(root / split / cls)
      for i in range(n):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png")][i % 2]
        shade = np.full((20 + i, 24, 3), 40 * (ci + 1), np.uint8)  # Class-coded brightness.
        (root / split / cls / f"{i}.{ext}").write_bytes(_encode(shade, fmt))
  (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")


def test_folder_mode(tmp_path):
  _make_folder(tmp_path, np.random.default_rng(0))
  c = _digits_config(None, augmented=False, dataset="folder", folder=str(tmp_path), eval_split="val",
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  info = ip.Dataset(c).info
  assert info.label_names == ("ant", "bee", "cat")  # Sorted alphabetically.
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 15, 9)
  it = ip.Dataset(c, process_index=0, process_count=1).train_iterator(global_batch_size=5, seed=0)
  for b in _take(it, 4):
    shade = b["image"].mean(axis=(1, 2, 3))
    # Label i was painted 40 * (index in ('cat', 'ant', 'bee') + 1): ant=80, bee=120, cat=40.
    np.testing.assert_allclose(shade, np.array([80, 120, 40])[b["label"]], atol=2)
  it, steps = ip.Dataset(c, process_index=0, process_count=1).eval_iterator(global_batch_size=4)
  batches = list(it)
  assert steps == 3 and sum(b["mask"].sum() for b in batches) == 9


def test_folder_mode_names_an_unreadable_file(tmp_path):
  _make_folder(tmp_path, np.random.default_rng(0))
  bad = tmp_path / "val" / "bee" / "broken.jpg"
  bad.write_bytes(b"<html>404</html>")
  c = _digits_config(None, dataset="folder", folder=str(tmp_path), eval_split="val")
  it, _ = ip.Dataset(c, process_index=0, process_count=1).eval_iterator(global_batch_size=4)
  with pytest.raises(ValueError, match="broken.jpg"):
    list(it)


def _folder_config(root, manifest_dir, **overrides):
  return _digits_config(None, augmented=False, dataset="folder", folder=str(root),
                        eval_split="val", manifest_dir=str(manifest_dir), **overrides)


def test_folder_scan_leaves_out_undecodable_files_and_keeps_odd_formats(tmp_path):
  """Truncated and empty files are listed with TF's reason and left out; a CMYK JPEG, 16-bit
  PNGs, a PNG named .jpg and a 1x1 image are kept. The report is written beside the list."""
  odd = odd_images.make_folder(tmp_path / "data", np.random.default_rng(0),
                               per_class={"train": 30, "val": 2}, odd_in=("train", "val"))
  c = _folder_config(tmp_path / "data", tmp_path / "m", max_bad_train_fraction=0.05)
  ip.check_folder(c, ["train", "val"])
  manifest = folder_scan.read(str(tmp_path / "m"), "train")
  bad = {rel for rel, expected in odd["train"] if expected is None}
  good = {rel for rel, expected in odd["train"] if expected is not None}
  assert len(bad) == 2 and len(good) == 5
  assert {p for p, _ in manifest.excluded} == bad
  assert good <= set(manifest.files) and not bad & set(manifest.files)
  assert len(manifest.files) == 90 + len(good) == len(manifest.labels)
  reasons = dict(manifest.excluded)
  assert reasons[next(p for p in bad if "empty" in p)] == "empty file (0 bytes)"
  assert "JPEG" in reasons[next(p for p in bad if "truncated" in p)]
  report = (tmp_path / "m" / "train_bad_files.txt").read_text().splitlines()
  assert sorted(line.split("\t")[0] for line in report) == sorted(bad)
  assert not (tmp_path / "m" / "val_bad_files.txt").exists()
  # The pipeline reads the list: every kept file, no broken one, each once per epoch.
  info = ip.Dataset(c).info
  assert (info.num_train_examples, info.num_eval_examples) == (95, 11)
  it, _ = ip.Dataset(c, process_index=0, process_count=1).eval_iterator(global_batch_size=4)
  assert sum(b["mask"].sum() for b in it) == 11


def test_folder_scan_stops_with_the_list_beyond_the_threshold(tmp_path):
  """2 broken of 97 train files is over the default 0.1%; any broken eval file is an error."""
  odd_images.make_folder(tmp_path / "data", np.random.default_rng(0),
                         per_class={"train": 30, "val": 2}, bad_in=("train", "val"))
  c = _folder_config(tmp_path / "data", tmp_path / "m")
  with pytest.raises(errors.BadImagesError) as e:
    ip.check_folder(c, ["train", "val"])
  msg = str(e.value)
  assert "2 of 97 files" in msg and "config.data.max_bad_train_fraction=0.001" in msg
  assert "truncated.jpg" in msg and "empty.jpg: empty file (0 bytes)" in msg
  assert str(tmp_path / "m" / "train_bad_files.txt") in msg
  assert not (tmp_path / "m" / "train.json").exists()  # Nothing is reused after fixing.
  c.max_bad_train_fraction = 0.03
  with pytest.raises(errors.BadImagesError, match="max_bad_eval_fraction=0 allows"):
    ip.check_folder(c, ["train", "val"])
  assert (tmp_path / "m" / "train.json").exists() and not (tmp_path / "m" / "val.json").exists()


def test_folder_manifest_fixes_the_epochs_when_the_folder_changes(tmp_path):
  """A resumed run reads the list made at the start: files added (or classes) since do not
  change its batches, so exact resume holds. Without the list, the same change would."""
  root = tmp_path / "data"
  odd_images.make_folder(root, np.random.default_rng(0), per_class={"train": 6, "val": 1},
                         odd_in=(), bad_in=())
  c = _folder_config(root, tmp_path / "m")
  ip.check_folder(c, ["train", "val"])

  def batches(cfg, start_step):
    it = ip.Dataset(cfg, process_index=0, process_count=1).train_iterator(
        global_batch_size=4, seed=0, start_step=start_step)
    return _take(it, 6)

  before = batches(c, 0)
  (root / "train" / "ant" / "new.jpg").write_bytes(open(root / "train" / "bee" / "000.jpg", "rb").read())
  os.makedirs(root / "train" / "dog")
  (root / "train" / "dog" / "0.jpg").write_bytes(open(root / "train" / "cat" / "000.jpg", "rb").read())
  ip.check_folder(c, ["train", "val"])  # Reused, not rescanned.
  assert ip.Dataset(c).info.num_classes == 3
  _assert_same_batches(batches(c, 0), before)
  _assert_same_batches(batches(c, 2)[:4], before[2:])
  listed = _folder_config(root, tmp_path / "none")  # No list there: reads the folder.
  assert ip.Dataset(listed).info.num_classes == 4
  with pytest.raises(errors.BadImagesError, match="lists the files of"):
    ip.check_folder(_folder_config(tmp_path, tmp_path / "m"), ["train"])


def test_odd_formats_decode_to_the_right_rgb(tmp_path):
  """CMYK JPEG -> RGB as PIL converts it; 16-bit PNG -> the high byte of each sample; a PNG
  named .jpg decodes by content; a 1x1 image survives. Through the real eval pipeline."""
  rng = np.random.default_rng(1)
  for name, (data, expected) in odd_images.odd_files(rng, size=32).items():
    if expected is None:
      continue
    path = tmp_path / name
    path.write_bytes(data)
    c = defaults.default_config().data
    c.crop_pct = 1.0
    c.image_size = min(expected.shape[:2])
    decoded = ip.make_eval_preprocess(c)(ip._checked_read(str(path)), 0)["image"].numpy()  # pylint: disable=protected-access
    assert decoded.shape == expected.shape, name  # No resize or crop: the pixels themselves.
    if name == "cmyk.jpg":
      # TF and PIL convert CMYK to RGB differently (measured 2.2 grey levels apart on
      # average); a wrong colour conversion (inverted, swapped) is off by ~100.
      assert np.abs(decoded.astype(float) - expected).mean() < 4, name
    else:
      np.testing.assert_array_equal(decoded, expected, err_msg=name)


# ---------------------------------------------------------------------------
# Errors that say what to do.
# ---------------------------------------------------------------------------


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  c = defaults.default_config().data
  c.data_dir = str(tmp_path)
  with pytest.raises(errors.DatasetError) as e:
    ip.Dataset(c)
  msg = str(e.value)
  for needle in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "tfds build imagenet2012",
                 "download_and_prepare", "manual_dir", str(tmp_path)):
    assert needle in msg, needle


def test_other_bad_datasets_raise_clear_errors(tmp_path):
  c = defaults.default_config().data
  c.data_dir = str(tmp_path)
  c.dataset = "cifar10"
  with pytest.raises(errors.DatasetError, match="tfds build cifar10"):
    ip.Dataset(c)
  c.dataset = "no_such_dataset_xyz"
  with pytest.raises(errors.DatasetError, match="Unknown dataset"):
    ip.Dataset(c)
  c.dataset = "folder"
  c.folder = str(tmp_path / "missing")
  with pytest.raises(errors.DatasetError, match="<split>/<label>"):
    ip.Dataset(c)


def test_bad_split_and_batch_size(digits_dir):
  c = _digits_config(digits_dir, eval_split="validation")
  with pytest.raises(ValueError, match="available"):
    ip.Dataset(c)
  c = _digits_config(digits_dir)
  with pytest.raises(ValueError, match="divisible"):
    ip.Dataset(c, process_index=0, process_count=2).train_iterator(global_batch_size=9, seed=0)


# ---------------------------------------------------------------------------
# Preprocessing against PIL (the release's torchvision transforms run on PIL).
# ---------------------------------------------------------------------------


def _release_eval_transform(data, size, crop_pct):
  """timm's / torchvision's eval transform on PIL, up to normalisation: decode, short side to
  floor(size / crop_pct) with PIL bicubic (long side truncated), center crop (offset rounded)."""
  image = Image.open(io.BytesIO(data)).convert("RGB")
  w, h = image.size
  s = math.floor(size / crop_pct)
  nw, nh = (int(s * w / h), s) if h <= w else (s, int(s * h / w))
  resized = np.asarray(image.resize((nw, nh), Image.BICUBIC))
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return resized[top:top + size, left:left + size]


def test_eval_preprocessing_is_the_release_transform_bit_exact_on_photos():
  """scikit-image's photos as JPEGs (and one as PNG), several sizes and crop_pcts: the eval
  pipeline's uint8 output equals PIL's decode + bicubic resize + center crop on every pixel."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "camera")):
    array = getattr(skimage.data, name)()
    array = np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array[..., :3]
    for fmt in ("JPEG", "PNG") if i == 0 else ("JPEG",):
      data = _encode(array, fmt)
      for size, crop_pct in ((224, 0.9), (96, 0.875), (64, 1.0)):
        c = defaults.default_config().data
        c.image_size, c.crop_pct = size, crop_pct
        out = ip.make_eval_preprocess(c)(tf.constant(data), tf.constant(0))["image"].numpy()
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, _release_eval_transform(data, size, crop_pct),
                                      err_msg=f"{name} {fmt} {size} {crop_pct}")


@pytest.mark.slow
def test_pipeline_benchmark_writes_every_field_and_stage_of_its_committed_results(tmp_path):
  """benchmarks/pipeline.py (the README's host-pipeline figures) at a small size, as the README
  runs it: every field and stage of benchmarks/results/pipeline_cpu.json, each stage delivering
  images, and the plot. It builds its stages from the pipeline's own functions, so a change
  there that it does not follow fails here."""
  out = tmp_path / "pipeline.json"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline.py"),
                         "--out", str(out), "--image-size", "64", "--batches", "1",
                         "--repeats", "1"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  committed = json.loads((REPO / "benchmarks" / "results" / "pipeline_cpu.json").read_text())
  assert set(results) == set(committed)
  assert list(results["stages"]) == list(committed["stages"])
  for name, stage in results["stages"].items():
    assert stage["group"] == committed["stages"][name]["group"], name
    assert stage["images_per_s_per_core"] > 0 and len(stage["runs"]) == 1, name
  assert set(results["train_vs_reference"]) == set(committed["train_vs_reference"])
  assert all(r > 0 for r in results["train_vs_reference"].values())
  assert results["image_size"] == 64 and results["eval_now_vs_before"] > 0
  assert (tmp_path / "pipeline.png").stat().st_size > 0
