r"""The host input pipeline, stage by stage: images/s on one core, train and eval.

  python benchmarks/pipeline.py --out benchmarks/results/pipeline_cpu.json

Makes its own ImageNet-sized JPEGs (scikit-image's photos at 500x375, Gaussian noise added
until each is ~110 KB, ImageNet's mean), writes them as an image folder, pins itself to one
core, and times tf.data pipelines that stop after each stage (cumulative: each adds one stage):

  train  read -> decode the crop window (random-resized crop) -> resize (PIL, antialiased,
         random bilinear / bicubic) -> flip: uint8, what the host hands over with RandAugment
         on the device -> RandAugment on the host (the default) -> batch:
         `input_pipeline.Dataset.train_iterator` itself, RandAugment on the host or on the device
         -> host-to-device (device_put)
  eval   read -> decode -> resize + center crop (PIL): uint8 -> batch: `Dataset.eval_iterator`
  reference  the bare decode-and-crop pipeline: read, decode_and_crop_jpeg on the same window,
         TF bilinear resize (not antialiased), flip, uint8
  before the former host pipeline: TF's antialiased resize, then RandAugment, normalisation and
         random erasing on the host (poolformer_jax.tf_augment), float32; eval: fast-IDCT
         decode, TF antialiased bicubic, normalised float32

Normalisation and random erasing (and RandAugment with randaugment_on='device') run on the
device, inside the compiled train step; compile mode counts them (main.py --mode=compile). Figures are medians of --repeats runs
taken in turn (A B C A B C ...), so a noisy neighbour slows every stage alike. Writes the JSON
and a PNG next to it, and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BATCH = 32
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
           "hubble_deep_field", "page")


def make_jpegs(root, copies, val_repeats=1, target_kb=110.0, quality=90):
  """root/{train,val}/class<i>/*.jpg: 500x375 photos (375x500 every third) with noise added
  until each is within 5% of `target_kb`, each written `val_repeats` times into val (so that
  one eval pass is long enough to time). Returns the mean size in KB."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  sizes = []
  for i, name in enumerate(_PHOTOS):
    a = getattr(skimage.data, name)()
    a = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
    shape = (375, 500) if i % 3 else (500, 375)
    base = np.asarray(Image.fromarray(a).resize(shape, Image.BICUBIC), np.float32)
    for c in range(copies):
      noise = rng.normal(0, 1, base.shape)
      lo, hi = 0.0, 64.0
      for _ in range(12):  # Bisection on the noise level.
        sigma = (lo + hi) / 2
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + sigma * noise, 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=quality)
        kb = len(buf.getvalue()) / 1e3
        if abs(kb - target_kb) < 0.05 * target_kb:
          break
        lo, hi = (sigma, hi) if kb < target_kb else (lo, sigma)
      sizes.append(kb)
      for split, repeats in (("train", 1), ("val", val_repeats)):
        d = os.path.join(root, split, f"class{i % 2}")
        os.makedirs(d, exist_ok=True)
        for r in range(repeats):
          with open(os.path.join(d, f"{name}_{c}_{r}.jpg"), "wb") as f:
            f.write(buf.getvalue())
  return float(np.mean(sizes))


def stages(root, image_size):
  """{name: (group, make_iterator)}: each iterator yields batches of BATCH images."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from poolformer_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from poolformer_jax import defaults  # pylint: disable=g-import-not-at-top
  from poolformer_jax import tf_augment  # pylint: disable=g-import-not-at-top

  cfg = defaults.with_model_defaults(defaults.default_config()).data  # S12: crop_pct 0.9
  cfg.dataset, cfg.folder, cfg.image_size, cfg.eval_split = "folder", root, image_size, "val"
  device_cfg = cfg.copy_and_resolve_references()
  device_cfg.randaugment_on = "device"
  size = image_size
  files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, "train"))
                 for f in fs)
  scale, ratio = tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio)
  train_pre = ip.make_train_preprocess(cfg)
  train_pre_device = ip.make_train_preprocess(device_cfg)
  eval_pre = ip.make_eval_preprocess(cfg)
  policy = tf_augment.parse_randaugment(cfg.randaugment, mean=cfg.mean)
  mean = tf.constant(cfg.mean, tf.float32) * 255.0
  std = tf.constant(cfg.std, tf.float32) * 255.0

  def per_image(fn):
    """map(fn) over (file bytes, per-image seed), batched: the module's structure."""
    def make():
      ds = tf.data.Dataset.from_tensor_slices(files).repeat().enumerate()
      ds = ds.map(lambda i, path: fn(tf.io.read_file(path), tf.stack([i, 7 * i + 1])),
                  num_parallel_calls=tf.data.AUTOTUNE)
      return iter(ds.batch(BATCH).prefetch(2).with_options(ip._options()))  # pylint: disable=protected-access
    return make

  def seeds(seed, n):
    return [tf.random.experimental.stateless_fold_in(seed, k) for k in range(n)]

  def crop(data, seed):
    return ip._decode_and_random_crop(data, seeds(seed, 3)[0], scale, ratio)  # pylint: disable=protected-access

  def pil_resize(data, seed):
    s = seeds(seed, 3)
    image = crop(data, seed)
    bicubic = tf.random.stateless_uniform([], s[1]) < 0.5
    return tf.cond(bicubic, lambda: ip._pil_resize(image, (size, size), "bicubic"),  # pylint: disable=protected-access
                   lambda: ip._pil_resize(image, (size, size), "bilinear"))  # pylint: disable=protected-access

  def reference(data, seed):
    s = seeds(seed, 3)
    image = tf.image.resize(crop(data, seed), (size, size), "bilinear")
    flip = tf.random.stateless_uniform([], s[2]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    return tf.cast(image, tf.uint8)

  def before_resize(data, seed):  # The former _resize: TF antialiased, float32 rounded.
    s = seeds(seed, 3)
    image = tf.cast(crop(data, seed), tf.float32)
    resize = lambda method: tf.round(tf.clip_by_value(
        tf.image.resize(image, (size, size), method, antialias=True), 0.0, 255.0))
    bicubic = tf.random.stateless_uniform([], s[1]) < 0.5
    image = tf.cond(bicubic, lambda: resize("bicubic"), lambda: resize("bilinear"))
    flip = tf.random.stateless_uniform([], s[2]) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)

  def before_randaugment(data, seed):
    return tf_augment.randaugment(before_resize(data, seed), policy, seeds(seed, 4)[3])

  def before_all(data, seed):
    image = (before_randaugment(data, seed) - mean) / std
    return tf_augment.random_erasing(image, float(cfg.random_erasing), seeds(seed, 5)[4])

  def eval_before(data, seed):
    del seed
    image = tf.cast(tf.io.decode_image(data, channels=3, expand_animations=False), tf.float32)
    shape = tf.shape(image)
    s = int(size / cfg.crop_pct)
    h, w = shape[0], shape[1]
    long = tf.cast(tf.math.floor(s * tf.cast(tf.maximum(h, w), tf.float64)
                                 / tf.cast(tf.minimum(h, w), tf.float64)), tf.int32)
    hw = tf.stack([tf.where(h <= w, s, long), tf.where(h <= w, long, s)])
    image = tf.round(tf.clip_by_value(tf.image.resize(image, hw, "bicubic", antialias=True), 0., 255.))
    top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
    return (tf.slice(image, tf.stack([top, left, 0]), [size, size, 3]) - mean) / std

  def touch(fn):  # Stages whose output has no fixed shape: batch one value that needs it.
    return lambda data, seed: tf.cast(tf.reshape(fn(data, seed), [-1])[0], tf.int32)

  def train_iterator(config=cfg):
    return ip.Dataset(config, process_index=0, process_count=1).train_iterator(
        global_batch_size=BATCH, seed=0)

  def to_device(make):
    def make_put():
      it = make()
      return (jax.block_until_ready(jax.device_put(b)) for b in it)
    return make_put

  def eval_iterator():  # One pass covers a measurement (see make_jpegs' val_repeats).
    iterable, _ = ip.Dataset(cfg, process_index=0, process_count=1).eval_iterator(
        global_batch_size=BATCH)
    return iter(iterable)

  return {
      "train: read": ("train", per_image(lambda data, seed: tf.strings.length(data))),
      "train: + decode crop window": ("train", per_image(touch(crop))),
      "train: + resize (PIL)": ("train", per_image(pil_resize)),
      "train: + flip = uint8 handed over": ("train", per_image(
          lambda data, seed: train_pre_device(data, 0, seed)["image"])),
      "train: + RandAugment on the host (default)": ("train", per_image(
          lambda data, seed: train_pre(data, 0, seed)["image"])),
      "train: + batch (Dataset.train_iterator, default)": ("train", train_iterator),
      "train: + batch, RandAugment on the device": ("train", lambda: train_iterator(device_cfg)),
      "train: + host-to-device (default)": ("train", to_device(train_iterator)),
      "reference: decode-and-crop, bilinear, flip": ("reference", per_image(reference)),
      "before: + TF antialiased resize, flip": ("before", per_image(before_resize)),
      "before: + RandAugment (host)": ("before", per_image(before_randaugment)),
      "before: + normalise, erasing (float32)": ("before", per_image(before_all)),
      "eval: read": ("eval", per_image(lambda data, seed: tf.strings.length(data))),
      "eval: + decode": ("eval", per_image(touch(lambda data, seed: ip._decode(data)))),  # pylint: disable=protected-access
      "eval: + resize, crop (PIL) = uint8 handed over": ("eval", per_image(
          lambda data, seed: eval_pre(data, 0)["image"])),
      "eval: + batch (Dataset.eval_iterator)": ("eval", eval_iterator),
      "eval before: TF decode, antialiased bicubic, normalise": ("eval before",
                                                                 per_image(eval_before)),
  }


def measure(make, batches, warmup=2):
  it = make()
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * BATCH / (time.perf_counter() - t0)


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = results["stages"]
  colors = {"train": "C0", "eval": "C2", "reference": "C7", "before": "C3", "eval before": "C1"}
  fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
  names = list(rows)[::-1]
  ax.barh(names, [rows[n]["images_per_s_per_core"] for n in names],
          color=[colors[rows[n]["group"]] for n in names])
  for i, n in enumerate(names):
    ax.text(rows[n]["images_per_s_per_core"], i, f" {rows[n]['images_per_s_per_core']:.0f}",
            va="center", fontsize=8)
  ax.set_xlabel("images / s on one core (median)")
  ax.set_title(f"host input pipeline, {results['image_size']}px, {results['mean_jpeg_kb']:.0f} KB "
               f"JPEGs, {results['cpu']}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="pipeline.json", help="JSON path; the plot goes next to it")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batches", type=int, default=10, help=f"timed batches of {BATCH} per run")
  p.add_argument("--repeats", type=int, default=3, help="runs per stage (median)")
  p.add_argument("--copies", type=int, default=4, help="noisy copies of each of the 8 photos")
  p.add_argument("--core", type=int, default=None, help="the core to pin to (default: the last)")
  args = p.parse_args()
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  core = sorted(os.sched_getaffinity(0))[-1] if args.core is None else args.core
  os.sched_setaffinity(0, {core})  # Before TensorFlow starts its threads: they inherit it.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  with tempfile.TemporaryDirectory() as root:
    per_pass = (args.batches + 2) * BATCH
    kb = make_jpegs(root, args.copies, val_repeats=-(-per_pass // (len(_PHOTOS) * args.copies)))
    fns = stages(root, args.image_size)
    rates = {name: [] for name in fns}
    for _ in range(args.repeats):
      for name, (_, make) in fns.items():
        rates[name].append(measure(make, args.batches))
        print(f"  {name}: {rates[name][-1]:.0f} img/s", flush=True)
  results = {
      "cpu": cpu, "core": core, "machine_cores": os.cpu_count(), "image_size": args.image_size,
      "mean_jpeg_kb": kb, "jpegs_per_split": len(_PHOTOS) * args.copies, "batch": BATCH,
      "batches": args.batches, "repeats": args.repeats,
      "bytes_per_image_handed_over": {"uint8 (now)": args.image_size**2 * 3,
                                      "float32 (before)": args.image_size**2 * 3 * 4},
      "stages": {name: {"group": fns[name][0], "images_per_s_per_core": float(np.median(r)),
                        "runs": r} for name, r in rates.items()},
  }
  s = results["stages"]
  ref = s["reference: decode-and-crop, bilinear, flip"]["images_per_s_per_core"]
  results["train_vs_reference"] = {
      name: s[name]["images_per_s_per_core"] / ref
      for name in ("train: + batch (Dataset.train_iterator, default)",
                   "train: + batch, RandAugment on the device",
                   "before: + normalise, erasing (float32)")}
  results["eval_now_vs_before"] = (s["eval: + batch (Dataset.eval_iterator)"]["images_per_s_per_core"]
                                   / s["eval before: TF decode, antialiased bicubic, normalise"]
                                   ["images_per_s_per_core"])
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  png = os.path.splitext(args.out)[0] + ".png"
  plot(results, png)
  print(f"\n{cpu}, one core; {kb:.0f} KB JPEGs; images/s (median of {args.repeats})")
  for name, row in s.items():
    print(f"  {name:58s} {row['images_per_s_per_core']:7.0f}")
  for name, ratio in results["train_vs_reference"].items():
    print(f"  {name} / reference: {ratio:.2f}x")
  print(f"  eval now / before: {results['eval_now_vs_before']:.2f}x")
  print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
  main()
