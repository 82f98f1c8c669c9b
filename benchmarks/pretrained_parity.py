"""Every released checkpoint end to end: download, convert, cache, then our logits against the
PyTorch model on photos, and ImageNet top-1 where a validation folder is given.

  python benchmarks/pretrained_parity.py                          # all 60 released names
  python benchmarks/pretrained_parity.py 'caformer_s18*' --imagenet-val /data/imagenet/val
  python benchmarks/pretrained_parity.py poolformer_s12.sail_in1k caformer_s18.sail_in1k

Per name: the first load (download + convert + cache; a cache hit if the entry exists already)
and a second load (the cache) are timed. The reference is timm's own model, loaded by timm
from the same hub repo (`timm.create_model('hf-hub:timm/<name>', pretrained=True)`), except
where timm has no faithful model: PoolFormer v1 (timm's pools before its final norm, the
release after) is compared with transformers' PoolFormer, IdentityFormer and RandFormer (not in
timm) with timm's MetaFormer skeleton, each holding the downloaded tensors (the references of
`convert_torch_weights.py --check`). timm's MLP-head LayerNorm gets the release's eps, 1e-5,
which ours keeps (timm's own is 1e-6). Both models get the same pixels: our `preprocess` with
the name's eval transform. The ImageNet folder holds one folder per class, named by WordNet id
(`val/n01440764/*.JPEG`, the usual layout), scored with the same transform.

Needs torch, transformers and timm (requirements-torch.txt, requirements-timm.txt; timm with
torchvision, or the tests' stand-in). Honours HF_ENDPOINT, HF_HUB_OFFLINE and
POOLFORMER_JAX_CACHE. Writes a JSON table; exits 1 if any name exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("patterns", nargs="*", default=["*"],
                 help="names, or fnmatch patterns over them (default: all)")
  p.add_argument("--images", nargs="+", default=None,
                 help="photos for the logit check (default: scikit-image's samples)")
  p.add_argument("--imagenet-val", default=None,
                 help="ImageNet validation folder (one folder per WordNet id) for top-1")
  p.add_argument("--batch-size", type=int, default=32, help="ImageNet top-1: images per step")
  p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| allowed")
  p.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "results",
                                               "pretrained_parity.json"))
  return p.parse_args(argv)


def timm_module():
  """timm, through the tests' torchvision stand-in when torchvision is not installed."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    return timm
  except ImportError:
    sys.path.insert(0, os.path.join(_REPO, "tests"))
    import helpers_torch  # pylint: disable=g-import-not-at-top
    return helpers_torch.import_timm()


def reference_logits(tag, pixels_nchw):
  """(logits, what the reference is) of the PyTorch model for `tag`, on NCHW float32 pixels."""
  import torch  # pylint: disable=g-import-not-at-top
  from poolformer_jax import convert, hub  # pylint: disable=g-import-not-at-top
  from poolformer_jax.convert import parity  # pylint: disable=g-import-not-at-top
  timm = timm_module()
  if tag.repo.startswith("timm/") and not tag.model.startswith("poolformer_"):
    model = timm.create_model(f"hf-hub:{tag.repo}", pretrained=True).eval()
    if getattr(getattr(model.head, "fc", None), "norm", None) is not None:
      model.head.fc.norm.eps = 1e-5  # The release's MLP-head eps, which ours keeps.
    with torch.no_grad():
      return model(torch.from_numpy(pixels_nchw)).numpy(), "timm (its own hf-hub loader)"
  converted = convert.convert(hub.download(tag.name), model=tag.model)
  logits, what = parity.reference_logits(converted, pixels_nchw)
  return logits, f"{what} holding the downloaded tensors"


def imagenet_top1(model, info, folder: str, batch_size: int) -> tuple[float, int]:
  from poolformer_jax import inference, pretrained  # pylint: disable=g-import-not-at-top
  index = {wnid: i for i, wnid in enumerate(pretrained.imagenet_wnids(info.num_classes))}
  files, labels = [], []
  for wnid in sorted(os.listdir(folder)):
    if wnid in index:
      found = inference.list_image_files([os.path.join(folder, wnid)])
      files += found
      labels += [index[wnid]] * len(found)
  if not files:
    raise SystemExit(f"error: {folder} holds no folder named by an ImageNet WordNet id "
                     "(n01440764/ ...)")
  results, failed = inference.classify_files(model, files, preprocessing=info.preprocessing,
                                             top_k=1, batch_size=batch_size)
  if failed:
    raise SystemExit(f"error: {len(failed)} unreadable images, e.g. {next(iter(failed))}")
  correct = sum(results[f].indices[0] == y for f, y in zip(files, labels))
  return correct / len(files), len(files)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from poolformer_jax import hub, inference, measure  # pylint: disable=g-import-not-at-top
  from poolformer_jax.convert import parity  # pylint: disable=g-import-not-at-top

  tags = [t for t in hub.list_pretrained()
          if any(fnmatch.fnmatchcase(t.name, p) for p in args.patterns)]
  if not tags:
    print(f"error: no released name matches {' '.join(args.patterns)}", file=sys.stderr)
    return 1
  images = parity.load_images(args.images)
  forward = nnx.jit(lambda model, x: model(x))
  rows, worst = [], 0.0
  for tag in tags:
    entry = os.path.join(hub.cache_dir(), tag.name)
    was_cached = os.path.isdir(entry)
    load = functools.partial(hub.load_pretrained, tag.name)
    first_s = measure.stopwatch(load)[1]
    (model, info), cached_s = measure.stopwatch(load)
    pixels = inference.preprocess(images, info.preprocessing)
    with jax.default_matmul_precision("highest"):
      ours = np.asarray(forward(model, jnp.asarray(pixels)))
    ref, what = reference_logits(tag, np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    result = parity.compare_logits(ours, ref)
    row = {"name": tag.name, "model": tag.model, "input_size": tag.input_size,
           "crop_pct": tag.crop_pct, "num_classes": tag.num_classes, "published_top1": tag.top1,
           "reference": what, "images": result.num_images, "max_abs_logit_diff": result.max_abs,
           "mean_abs_logit_diff": result.mean_abs, "top1_agreement": result.top1,
           "top5_overlap": result.top5, "first_load_s": round(first_s, 2),
           "first_load_was_cached": was_cached, "cached_load_s": round(cached_s, 2)}
    if args.imagenet_val and tag.top1 is not None:
      top1, n = imagenet_top1(model, info, args.imagenet_val, args.batch_size)
      row.update(imagenet_top1=round(100 * top1, 3), imagenet_images=n)
    rows.append(row)
    worst = max(worst, result.max_abs)
    print(f"{tag.name}: max |dlogit| {result.max_abs:.2e}, top-5 overlap {result.top5:.0%} vs "
          f"{what}; first load {first_s:.1f} s{' (cached)' if was_cached else ''}, cached "
          f"{cached_s:.1f} s" + (f", ImageNet top-1 {row['imagenet_top1']:.2f} (published "
                                  f"{tag.top1})" if "imagenet_top1" in row else ""), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
               "tolerance": args.tolerance, "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")
  if worst > args.tolerance:
    print(f"error: max |logit difference| {worst:.3g} exceeds --tolerance {args.tolerance:g}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from poolformer_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    sys.exit(main())
  except errors.Error as e:  # Ours: the message says what to do.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
