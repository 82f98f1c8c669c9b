"""What the up-front check of an image folder costs: every file decoded once, before training.

  python benchmarks/folder_scan.py --files 10000 --size 64

Writes `--files` small JPEGs (photo-like, `--size` pixels square, 10 classes) into a temporary
folder, then times `input_pipeline.check_folder` on the train split as the trainer runs it
(listing, parallel decode, manifest write), and once more to time reusing the manifest. Prints
files/s and wall time of each; the files are written before timing starts, and the page cache
is warm (as on a machine that just downloaded the data).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poolformer_jax import defaults  # pylint: disable=g-import-not-at-top,wrong-import-position
from poolformer_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from poolformer_jax import measure  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_folder(root: str, files: int, size: int, classes: int = 10) -> None:
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size, 0:size]
  for c in range(classes):
    os.makedirs(os.path.join(root, "train", f"class{c:02d}"))
  for i in range(files):
    img = 128 + 80 * np.sin(x[..., None] / 5.0 + y[..., None] / 7.0 + rng.uniform(0, 6, 3))
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    with open(os.path.join(root, "train", f"class{i % classes:02d}", f"{i:06d}.jpg"), "wb") as f:
      f.write(buf.getvalue())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--files", type=int, default=10_000)
  parser.add_argument("--size", type=int, default=64, help="image side in pixels")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "data")
    write_folder(root, args.files, args.size)
    mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 1e6
    cfg = defaults.default_config().data
    cfg.dataset, cfg.folder = "folder", root
    cfg.manifest_dir = os.path.join(tmp, "manifest")
    for what in ("scan (list + decode all + write manifest)", "reuse (read manifest)"):
      seconds = measure.stopwatch(lambda: input_pipeline.check_folder(cfg, ["train"]))[1]
      print(f"{what}: {args.files} files ({mb:.1f} MB, {args.size}x{args.size} JPEG) in "
            f"{seconds:.2f} s = {args.files / seconds:,.0f} files/s on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
  main()
