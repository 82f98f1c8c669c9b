r"""Measures eval preprocessing against HF's PoolFormerImageProcessor on real photos.

  python benchmarks/preprocess_parity.py [--crop_pct 0.9]

Compares, on scikit-image's sample photos (grayscale ones as 3 equal channels):
  * poolformer_jax.inference.preprocess (PIL; what `predict` uses),
  * the trainer's eval pipeline (input_pipeline.make_eval_preprocess, uint8, then the eval step's
    normalisation; what eval accuracy uses),
against two references: HF's processor as is, and HF's resize followed by the release's
(torchvision) center crop. Prints max / mean absolute differences in normalised units; one 8-bit
grey level is about 0.017 there.
"""

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import skimage.data  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
          "immunohistochemistry", "motorcycle_left" if hasattr(skimage.data, "motorcycle_left")
          else "page")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--crop_pct", type=float, default=0.9)
  args = p.parse_args()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from poolformer_jax import augment, defaults, inference, input_pipeline  # pylint: disable=g-import-not-at-top

  images = []
  for name in PHOTOS:
    a = getattr(skimage.data, name)()
    images.append(np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3])
  hf = transformers.PoolFormerImageProcessorPil(crop_pct=args.crop_pct)
  cfg = defaults.default_config().data
  cfg.crop_pct = args.crop_pct
  tf_eval = input_pipeline.make_eval_preprocess(cfg)

  rows = []
  for name, image in zip(PHOTOS, images):
    full = hf(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    resized = hf(images=[image], do_center_crop=False,
                 return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    h, w = resized.shape[:2]
    top, left = int(round((h - 224) / 2)), int(round((w - 224) / 2))
    release = resized[top:top + 224, left:left + 224]
    ours = inference.preprocess(image, {"crop_pct": args.crop_pct})[0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # lossless, so only the pipeline differs
    tf_out = tf_eval(tf.constant(buf.getvalue()), tf.constant(0))["image"].numpy()
    tf_out = np.asarray(augment.normalize(tf_out, cfg.mean, cfg.std))  # The eval step's.
    rows.append((name, image.shape[:2], (h - 224, w - 224),
                 [np.abs(x - ref) for x in (ours, tf_out) for ref in (full, release)]))

  print(f"crop_pct {args.crop_pct}; |difference| in normalised units (1 grey level ~ 0.017)")
  head = ("photo", "size", "margins", "PIL vs HF", "PIL vs HF+release crop", "TF vs HF",
          "TF vs HF+release crop")
  print("{:<22}{:<12}{:<10}".format(*head[:3]) + "".join(f"{h:>26}" for h in head[3:]))
  for name, size, margins, diffs in rows:
    cells = [f"{d.max():.2g} / {d.mean():.2g}" for d in diffs]
    print(f"{name:<22}{str(size):<12}{str(margins):<10}" + "".join(f"{c:>26}" for c in cells))
  all_d = [np.concatenate([r[3][i].ravel() for r in rows]) for i in range(4)]
  print(f"{'all (max / mean)':<44}" + "".join(f"{d.max():.2g} / {d.mean():.2g}".rjust(26)
                                              for d in all_d))


if __name__ == "__main__":
  main()
