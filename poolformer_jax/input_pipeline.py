"""Input pipeline: tf.data + TFDS on the host CPU, uint8 numpy batches out, one shard per process.

Sources: `imagenet2012` (or any TFDS image-classification dataset), the bundled `digits`
dataset (scikit-learn's handwritten digits, prepared automatically, offline), or a plain
image folder `root/<split>/<label>/*.jpg`. All go through the same decode / crop / resize
code, so the demo exercises exactly the ImageNet pipeline.

The host does read, decode (for training only the crop window), resize, flip and, by default,
RandAugment (config.data.randaugment_on). It hands over uint8 images (a quarter of float32's
bytes); normalisation and random erasing run on the device in the train step
(poolformer_jax.augment), normalisation in the eval step.

Determinism (what makes exact resume possible): the training stream is a pure function of
(seed, start_step, process). Each epoch's order comes from seeds derived from
(seed, process, epoch), every example's augmentation from stateless random ops seeded by
(epoch seed, position in epoch), and batches never straddle epochs (the epoch remainder is
dropped). So `start_step=k` jumps to epoch k // steps_per_epoch arithmetically and skips the
records before the k-th batch of that epoch BEFORE decoding them, then yields exactly what the
uninterrupted stream would have yielded from step k on.

TensorFlow is kept off accelerators: importing this module hides GPUs/TPUs from TF, so JAX
owns all device memory.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Iterator

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from poolformer_jax import folder_scan
from poolformer_jax.dataset_info import DatasetInfo, local_batch
from poolformer_jax import tf_augment
from poolformer_jax.errors import ConfigError, DatasetError

# TF only runs the input pipeline on the host; it must not grab accelerator memory.
for _kind in ("GPU", "TPU"):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):  # Already initialised, or no such device type.
    pass

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_IMAGENET_NAMES = ("imagenet2012",)


# ---------------------------------------------------------------------------
# Sources: TFDS or an image folder, each yielding (encoded image bytes, label).
# ---------------------------------------------------------------------------


def _prepare_instructions(name: str, data_dir: str | None, manual_dir: str | None) -> str:
  data_dir_shown = data_dir or os.path.expanduser("~/tensorflow_datasets")
  if name in _IMAGENET_NAMES:
    manual = manual_dir or os.path.join(data_dir_shown, "downloads", "manual")
    return (
        f"ImageNet cannot be downloaded automatically. Register at https://image-net.org/download-images,\n"
        f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into {manual}\n"
        f"and prepare it once (about 150 GB of disk, a few hours) with either\n"
        f"  tfds build imagenet2012 --data_dir={data_dir_shown} --manual_dir={manual}\n"
        f"or in Python\n"
        f"  import tensorflow_datasets as tfds\n"
        f"  tfds.builder('imagenet2012', data_dir='{data_dir_shown}').download_and_prepare(\n"
        f"      download_config=tfds.download.DownloadConfig(manual_dir='{manual}'))\n"
        f"or rerun with config.data.prepare=True (and config.data.manual_dir={manual}).")
  return (f"Prepare it once with\n  tfds build {name} --data_dir={data_dir_shown}\n"
          f"or rerun with config.data.prepare=True (downloads it if TFDS can).")


def _tfds_builder(cfg) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder, preparing `digits` (local data) or on request."""
  name = cfg.dataset
  if name == "digits":
    from poolformer_jax.datasets import digits  # pylint: disable=g-import-not-at-top
    builder = digits.Digits(data_dir=cfg.data_dir)
    if not builder.is_prepared():
      logging.info("Preparing the digits dataset (offline, a few seconds) in %s", builder.data_dir)
      builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(
        f"Unknown dataset {name!r}: use 'imagenet2012', 'digits', 'folder' (with config.data.folder) "
        f"or a TFDS dataset name (https://www.tensorflow.org/datasets/catalog).\n{e}") from e
  if not builder.is_prepared():
    if cfg.get("prepare", False):
      manual = cfg.get("manual_dir", None)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual) if manual else None)
    else:
      raise DatasetError(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir}.\n"
          + _prepare_instructions(name, cfg.data_dir, cfg.get("manual_dir", None)))
  return builder


class _TfdsSource:
  """A prepared TFDS dataset; images stay encoded until after skipping (SkipDecoding)."""

  def __init__(self, cfg):
    self.builder = _tfds_builder(cfg)
    info = self.builder.info
    sup = info.supervised_keys or ("image", "label")
    self.image_key = cfg.get("image_key", None) or sup[0]
    self.label_key = cfg.get("label_key", None) or sup[1]
    for key in (self.image_key, self.label_key):
      if key not in info.features:
        raise ConfigError(f"Dataset {cfg.dataset!r} has no feature {key!r} (features: "
                          f"{list(info.features)}); set config.data.image_key / label_key.")
    label = info.features[self.label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise DatasetError(f"Feature {self.label_key!r} of {cfg.dataset!r} is not a ClassLabel; "
                         "only image classification datasets are supported.")
    self.num_classes = label.num_classes
    self.label_names = tuple(label.names) if label.names else None

  def check_split(self, split: str) -> int:
    available = list(self.builder.info.splits)
    if split not in available:
      raise ConfigError(f"Split {split!r} not in dataset {self.builder.name!r}; available: {available}. "
                        "Set config.data.train_split / eval_split.")
    return self.builder.info.splits[split].num_examples

  def part(self, split: str, index: int, count: int, drop_remainder: bool):
    """The process's sub-split and its example count."""
    sub = tfds.even_splits(split, n=count, drop_remainder=drop_remainder)[index]
    return sub, self.builder.info.splits[sub].num_examples

  def dataset(self, sub) -> tf.data.Dataset:
    """(bytes, label) records in the stored order."""
    read_config = tfds.ReadConfig(options=_options(), try_autocache=False)
    ds = self.builder.as_dataset(split=sub, shuffle_files=False, read_config=read_config,
                                 decoders={self.image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[self.image_key], tf.cast(ex[self.label_key], tf.int32)),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def epoch_fn(self, sub, cfg):
    """key [2] -> one epoch of (bytes, label) in an order drawn from key, built in-graph.

    Everything happens inside one infinite tf.data graph (no per-epoch rebuild, no stall).
    TFRecord splits: the shard files are read in a key-permuted order, interleaved, and mixed
    by a shuffle buffer seeded from key. cache=True: the encoded split is held in memory and
    fully permuted each epoch (small datasets).
    """
    if cfg.cache:
      return _in_memory_epoch_fn(*_load_arrays(self.dataset(sub)), read=None)
    if self.builder.info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD:
      base = self.dataset(sub)  # Other formats: stored order, shuffle buffer only.
      return lambda key: base.shuffle(cfg.shuffle_buffer, seed=_scalar_seed(key))
    instructions = self.builder.info.splits[sub].file_instructions
    files = tf.constant([os.fspath(fi.filename) for fi in instructions])
    skips = tf.constant([fi.skip for fi in instructions], tf.int64)
    takes = tf.constant([-1 if fi.take is None else fi.take for fi in instructions], tf.int64)
    features = self.builder.info.features
    decoders = {self.image_key: tfds.decode.SkipDecoding()}

    def parse(serialized):
      ex = features.deserialize_example(serialized, decoders=decoders)
      return ex[self.image_key], tf.cast(ex[self.label_key], tf.int32)

    def epoch(key):
      order = tf.random.experimental.stateless_shuffle(tf.range(len(instructions)), key)
      shards = tf.data.Dataset.from_tensor_slices(
          (tf.gather(files, order), tf.gather(skips, order), tf.gather(takes, order)))
      records = shards.interleave(
          lambda f, k, n: tf.data.TFRecordDataset(f, buffer_size=8 << 20).skip(k).take(n),
          cycle_length=min(16, len(instructions)), block_length=1,
          num_parallel_calls=min(16, len(instructions)), deterministic=True)
      records = records.shuffle(cfg.shuffle_buffer, seed=_scalar_seed(key))
      return records.map(parse)  # Parsing is cheap; decoding happens after skipping.

    return epoch


def _scalar_seed(key):
  return tf.cast(tf.random.stateless_uniform([], key, 0, 2**31 - 1, dtype=tf.int32), tf.int64)


def _load_arrays(ds, max_bytes=1 << 30):
  """Encoded images and labels as numpy arrays (for cache=True)."""
  images, labels, total = [], [], 0
  for image, label in tfds.as_numpy(ds):
    images.append(image)
    labels.append(label)
    total += len(image)
    if total > max_bytes:
      raise ConfigError("cache=True holds the encoded split in memory and is meant for small datasets "
                        f"(over {max_bytes >> 20} MiB here); set config.data.cache=False.")
  return np.array(images, dtype=object), np.array(labels, np.int32)


def _in_memory_epoch_fn(items, labels, read):
  """key [2] -> items and labels in a full random permutation (then `read` applied)."""
  items = tf.constant(items)
  labels = tf.constant(labels, tf.int32)

  def epoch(key):
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(labels)[0]), key)
    ds = tf.data.Dataset.from_tensor_slices((tf.gather(items, order), tf.gather(labels, order)))
    return ds if read is None else ds.map(lambda x, y: (read(x), y))

  return epoch


class _FolderSource:
  """root/<split>/<label>/<image>: labels are the sorted class folder names of the train split.

  With config.data.manifest_dir set, a split whose checked file list is there (see
  `check_folder`) is read from that list, not from the folder. Otherwise an unreadable file
  stops the pipeline with an error naming it rather than being skipped: skipping would
  silently change the epoch length and the step <-> data mapping that exact resume relies on.
  """

  def __init__(self, cfg):
    self.root = cfg.folder
    if not self.root or not os.path.isdir(self.root):
      raise DatasetError(
          f"config.data.folder={self.root!r} is not a directory. With dataset='folder' it must hold "
          f"<split>/<label>/*.jpg, e.g. {self.root or 'ROOT'}/{cfg.train_split}/cat/001.jpg and "
          f"{self.root or 'ROOT'}/{cfg.eval_split}/cat/101.jpg.")
    self.manifests = {}
    if cfg.get("manifest_dir", None):
      for split in (cfg.train_split, cfg.eval_split):
        manifest = folder_scan.read(cfg.manifest_dir, split)
        if manifest is not None:
          self.manifests[split] = manifest
    if self.manifests:  # Labels as when the list was made, even if class folders were added.
      self.label_names = next(iter(self.manifests.values())).label_names
    else:
      self.label_names = self._class_names(cfg)
    self.num_classes = len(self.label_names)
    self._files: dict[str, tuple[list[str], list[int]]] = {}

  def _class_names(self, cfg) -> tuple[str, ...]:
    class_split = cfg.train_split if os.path.isdir(os.path.join(self.root, cfg.train_split)) else cfg.eval_split
    names = tuple(sorted(
        d for d in os.listdir(os.path.join(self.root, class_split))
        if os.path.isdir(os.path.join(self.root, class_split, d)) and not d.startswith(".")))
    if not names:
      raise DatasetError(f"No class folders in {os.path.join(self.root, class_split)}; "
                         "expected <split>/<label>/*.jpg.")
    return names

  def list_files(self, split: str) -> tuple[list[str], list[int]]:
    """The split's image files (by extension; sorted) and labels, as found in the folder."""
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      raise DatasetError(f"Split folder {split_dir} does not exist; expected "
                         f"{self.root}/<split>/<label>/*.jpg.")
    index = {name: i for i, name in enumerate(self.label_names)}
    paths, labels = [], []
    for label in sorted(os.listdir(split_dir)):
      label_dir = os.path.join(split_dir, label)
      if not os.path.isdir(label_dir) or label.startswith("."):
        continue
      if label not in index:
        raise DatasetError(f"Class folder {label_dir} has no counterpart in the training split's "
                           f"classes {list(self.label_names)}.")
      for fname in sorted(os.listdir(label_dir)):
        if fname.lower().endswith(_IMAGE_EXTENSIONS) and not fname.startswith("."):
          paths.append(os.path.join(label_dir, fname))
          labels.append(index[label])
    if not paths:
      raise DatasetError(f"No images ({', '.join(_IMAGE_EXTENSIONS)}) under {split_dir}/<label>/.")
    return paths, labels

  def files(self, split: str):
    if split not in self._files:
      manifest = self.manifests.get(split)
      self._files[split] = ((manifest.paths(), list(manifest.labels)) if manifest is not None
                            else self.list_files(split))
    return self._files[split]

  def check_split(self, split: str) -> int:
    return len(self.files(split)[0])

  def part(self, split: str, index: int, count: int, drop_remainder: bool):
    paths, labels = self.files(split)
    n = len(paths) - len(paths) % count if drop_remainder else len(paths)
    sub = (paths[index:n:count], labels[index:n:count])  # Sizes differ by at most one.
    return sub, len(sub[0])

  def dataset(self, sub) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(sub[0]), np.asarray(sub[1], np.int32)))
    return ds.map(lambda p, y: (_checked_read(p), y), num_parallel_calls=tf.data.AUTOTUNE)

  def epoch_fn(self, sub, cfg):
    """Full permutation of the file list per epoch; files are read after the resume skip."""
    if cfg.cache:
      return _in_memory_epoch_fn(*_load_arrays(self.dataset(sub)), read=None)
    return _in_memory_epoch_fn(np.asarray(sub[0]), np.asarray(sub[1], np.int32), read=_checked_read)


def _checked_read(path):
  """Reads a file, failing with its name unless it starts like a JPEG, PNG, GIF or BMP."""
  data = tf.io.read_file(path)
  head = tf.strings.substr(data, 0, 4)
  ok = (tf.io.is_jpeg(data) | tf.equal(head, b"\x89PNG") | tf.equal(head, b"GIF8")
        | tf.equal(tf.strings.substr(data, 0, 2), b"BM"))
  check = tf.debugging.Assert(ok, ["Unreadable image file (not JPEG/PNG/GIF/BMP):", path])
  with tf.control_dependencies([check]):
    return tf.identity(data)


def _source(cfg):
  return _FolderSource(cfg) if cfg.dataset == "folder" else _TfdsSource(cfg)


def check_folder(data_config, splits) -> None:
  """Folder datasets: every file of `splits` decoded once, before training.

  Writes each split's checked file list to config.data.manifest_dir, or reuses the one there
  (see poolformer_jax.folder_scan); the sources built afterwards read those lists. Raises
  BadImagesError naming the files when more than config.data.max_bad_{train,eval}_fraction of
  a split cannot be decoded.
  """
  cfg = data_config
  if not cfg.get("manifest_dir", None):
    raise ConfigError("check_folder needs config.data.manifest_dir (where the lists are kept)")
  for name in ("max_bad_train_fraction", "max_bad_eval_fraction"):
    if not 0.0 <= cfg[name] <= 1.0:
      raise ConfigError(f"config.data.{name}={cfg[name]} must be a fraction in [0, 1]")
  src = _FolderSource(cfg)
  for split in dict.fromkeys(splits):
    name = "max_bad_train_fraction" if split == cfg.train_split else "max_bad_eval_fraction"
    folder_scan.ensure(cfg.manifest_dir, folder=src.root, split=split,
                       label_names=src.label_names,
                       list_files=lambda split=split: src.list_files(split),
                       max_bad_fraction=cfg[name], threshold_name=f"config.data.{name}")


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1  # Parallelism comes from map, not within ops.
  return options


def _decode_and_random_crop(data, seed, scale, ratio):
  """Random-resized-crop window, decoding only the window for JPEGs (fused decode-and-crop).

  Not libjpeg's DCT scaling (decoding at 1/2, 1/4, 1/8): it needs a window of at least twice
  the output size on its short side (448 for 224), which an ImageNet-sized image (~400 x 350)
  almost never has, so it measured no faster.
  """
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():
    begin, size = window(tf.image.extract_jpeg_shape(data))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(data, crop, channels=3)

  def generic():  # PNG, GIF, BMP: decode fully, then crop.
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  return tf.cond(tf.io.is_jpeg(data), jpeg, generic)


def _decode(data):
  """uint8 [H, W, 3]; JPEGs with libjpeg's accurate integer IDCT, as PIL decodes them (TF's
  default, the fast IDCT, is ~1 grey level off on average)."""
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _pil_resize(image, size, method: str):
  """uint8 [h, w, 3] -> uint8 [size[0], size[1], 3] with PIL's antialiased resize.

  PIL itself, as timm and torchvision resize: bit-exact to the release's transforms, and faster
  on the host than TF's antialiased resize (measured in benchmarks/benchmark.py). PIL releases
  the GIL while it resamples, so tf.data's threads run it in parallel.
  """
  if method not in _PIL_FILTERS:
    raise ConfigError(f"interpolation {method!r}; use 'bilinear' or 'bicubic'.")
  pil_filter = _PIL_FILTERS[method]

  def resize(array, hw):
    return np.asarray(Image.fromarray(array).resize((int(hw[1]), int(hw[0])), pil_filter))

  out = tf.numpy_function(resize, [image, tf.cast(size, tf.int32)], tf.uint8, stateful=False)
  return tf.ensure_shape(out, [None, None, 3])


def make_train_preprocess(cfg):
  """(encoded bytes, label, per-example seed [2]) -> {'image': uint8, 'label'}.

  The host's part of timm's train transform: random-resized crop (only the window decoded),
  resize (random bilinear / bicubic, antialiased like PIL), flip, and RandAugment unless
  config.data.randaugment_on='device'. Normalisation and random erasing run on the device, in
  the train step (poolformer_jax.augment).
  """
  size = int(cfg.image_size)
  policy = None
  if cfg.randaugment and cfg.get("randaugment_on", "host") == "host":
    policy = tf_augment.parse_randaugment(cfg.randaugment, mean=cfg.mean)
  scale = cfg.rrc_scale
  interp = cfg.get("train_interpolation", "random")
  if interp not in ("random", "bilinear", "bicubic"):
    raise ConfigError(f"train_interpolation={interp!r}; use 'random', 'bilinear' or 'bicubic'.")

  # Plain TF code (explicit tf.cond / switch_case): autograph would only slow down tracing.
  @tf.autograph.experimental.do_not_convert
  def preprocess(data, label, seed):
    seeds = [tf.random.experimental.stateless_fold_in(seed, i) for i in range(4)]
    if scale:
      image = _decode_and_random_crop(data, seeds[0], tuple(scale), tuple(cfg.rrc_ratio))
    else:
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
    if interp == "random":
      bicubic = tf.random.stateless_uniform([], seeds[1]) < 0.5
      image = tf.cond(bicubic, lambda: _pil_resize(image, (size, size), "bicubic"),
                      lambda: _pil_resize(image, (size, size), "bilinear"))
    else:
      image = _pil_resize(image, (size, size), interp)
    image = tf.ensure_shape(image, [size, size, 3])
    if cfg.hflip:
      flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
      image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    if policy is not None:  # Its ops round to uint8 values: nothing is lost in the cast.
      image = tf.cast(tf_augment.randaugment(tf.cast(image, tf.float32), policy, seeds[3]),
                      tf.uint8)
    return {"image": image, "label": label}

  return preprocess


def make_eval_preprocess(cfg):
  """The release's eval transform up to normalisation (done on the device): short side ->
  floor(image_size / crop_pct) (torchvision Resize rounding) with PIL's resize, center crop.
  {'image': uint8, 'label'}; bit-exact to timm's PIL pipeline for JPEGs."""
  size = int(cfg.image_size)
  if cfg.crop_pct is None:  # The trainer fills it in (defaults.with_model_defaults).
    raise ConfigError("config.data.crop_pct is unset: set it (e.g. 0.9), or pass the config "
                      "through poolformer_jax.defaults.with_model_defaults for the model's")
  scale_size = math.floor(size / cfg.crop_pct)
  if cfg.interpolation not in _PIL_FILTERS:
    raise ConfigError(f"config.data.interpolation={cfg.interpolation!r}; use 'bilinear' or "
                      "'bicubic'.")

  @tf.autograph.experimental.do_not_convert
  def preprocess(data, label):
    image = _decode(data)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    # torchvision: new_long = int(scale_size * long / short), truncating.
    new_long = tf.cast(tf.math.floor(scale_size * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)),
                       tf.int32)
    new_h = tf.where(h <= w, scale_size, new_long)
    new_w = tf.where(h <= w, new_long, scale_size)
    image = _pil_resize(image, tf.stack([new_h, new_w]), cfg.interpolation)
    # torchvision CenterCrop: int(round((h - size) / 2)), round half to even like Python.
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
    return {"image": image, "label": label}

  return preprocess


# ---------------------------------------------------------------------------
# Iterators.
# ---------------------------------------------------------------------------


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  return process_index, process_count


def _num_parallel(cfg):
  n = cfg.get("num_parallel_calls", -1)
  return tf.data.AUTOTUNE if n is None or n < 0 else n


class Dataset:
  """A dataset opened once, for one process: its info, the batches of an epoch and both
  iterators. Raises ConfigError / DatasetError (with the steps that prepare it) when it is
  missing, unreadable or lacks a split."""

  def __init__(self, data_config, *, process_index: int | None = None,
               process_count: int | None = None):
    self.config = data_config
    self.process_index, self.process_count = _process(process_index, process_count)
    self._source = _source(data_config)
    self.info = DatasetInfo(
        num_classes=self._source.num_classes,
        num_train_examples=self._source.check_split(data_config.train_split),
        num_eval_examples=self._source.check_split(data_config.eval_split),
        label_names=self._source.label_names)

  def batches_per_epoch(self, global_batch_size: int) -> int:
    return self.info.batches_per_epoch(global_batch_size, self.process_count)

  def train_iterator(self, *, global_batch_size: int, seed: int,
                     start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite stream of this process's batches {'image': uint8 [B, H, W, 3], 'label': i32 [B]}.

    B = global_batch_size / process_count. A pure function of (seed, start_step, process):
    start_step=k yields exactly what start_step=0 yields from its k-th batch on.
    """
    cfg, src = self.config, self._source
    batch = local_batch(global_batch_size, self.process_count)
    steps_per_epoch = self.batches_per_epoch(global_batch_size)
    if steps_per_epoch == 0:
      raise ConfigError(
          f"Process {self.process_index} holds "
          f"{self.info.num_train_examples // self.process_count} training examples, fewer than "
          f"one local batch of {batch}; lower the batch size.")
    sub, _ = src.part(cfg.train_split, self.process_index, self.process_count,
                      drop_remainder=True)
    epoch_records = src.epoch_fn(sub, cfg)
    preprocess = make_train_preprocess(cfg)
    start_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)
    process_key = tf.constant([seed, self.process_index], tf.int64)

    @tf.autograph.experimental.do_not_convert
    def epoch(e):
      key = tf.random.experimental.stateless_fold_in(process_key, e)  # Per (seed, process, epoch).
      ds = epoch_records(key).take(steps_per_epoch * batch).enumerate()
      # Resume: skip the already-consumed records of the first epoch BEFORE decoding them.
      ds = ds.skip(tf.where(tf.equal(e, start_epoch), tf.constant(skip_batches * batch, tf.int64),
                            0))
      return ds.map(lambda i, rec: (rec[0], rec[1], tf.random.experimental.stateless_fold_in(key, i)))

    # Whole epochs before start_epoch are skipped arithmetically; batches never straddle epochs.
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.map(preprocess, num_parallel_calls=_num_parallel(cfg))
    ds = ds.batch(batch, drop_remainder=True).prefetch(cfg.prefetch).with_options(_options())
    return _named_errors(tfds.as_numpy(ds), cfg)

  def eval_iterator(self, *, global_batch_size: int
                    ) -> tuple[Iterable[dict[str, np.ndarray]], int]:
    """(iterable of this process's eval batches {'image', 'label', 'mask'}, num_steps).

    Every example appears exactly once over all processes with mask 1.0; padding (zero images,
    label 0) has mask 0.0 (float32). The number of batches is the same on every process (set by
    the largest per-process shard). Build it once and iterate it at every evaluation.
    """
    cfg, src, count = self.config, self._source, self.process_count
    batch = local_batch(global_batch_size, count)
    sizes = [src.part(cfg.eval_split, i, count, drop_remainder=False)[1] for i in range(count)]
    num_steps = -(-max(sizes) // batch)
    sub, n = src.part(cfg.eval_split, self.process_index, count, drop_remainder=False)
    preprocess = make_eval_preprocess(cfg)
    size = int(cfg.image_size)

    ds = src.dataset(sub)
    ds = ds.map(lambda data, label: {**preprocess(data, label),
                                     "mask": tf.constant(1.0, tf.float32)},
                num_parallel_calls=_num_parallel(cfg))
    pad = tf.data.Dataset.from_tensors({
        "image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0, tf.float32)}).repeat(num_steps * batch - n)
    ds = ds.concatenate(pad)
    if cfg.cache:
      ds = ds.cache()
    ds = ds.batch(batch, drop_remainder=True).prefetch(cfg.prefetch).with_options(_options())
    return _EvalIterable(ds, cfg), num_steps


def _named_errors(iterator, cfg, _error=tf.errors.InvalidArgumentError):
  """Re-raises TF data errors (e.g. an unreadable folder image) as DatasetError with the message."""
  # `_error` is bound at definition: generators closed at interpreter exit may outlive `tf`.
  try:
    yield from iterator
  except _error as e:
    raise DatasetError(f"Input pipeline failed for dataset {cfg.dataset!r}: {e.message}") from e


class _EvalIterable:
  """Re-iterable (one pass per evaluation) over padded, masked eval batches."""

  def __init__(self, ds, cfg):
    self._ds, self._cfg = ds, cfg

  def __iter__(self):
    return _named_errors(tfds.as_numpy(self._ds), self._cfg)
