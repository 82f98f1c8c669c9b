"""Converts a PyTorch PoolFormer v1 checkpoint to a JAX pretrained directory.

  python convert_torch_weights.py SOURCE OUTPUT [--model NAME] [--check] [--tolerance T]
                                  [--images PATH ...] [--overwrite]
  python convert_torch_weights.py --to-hf JAX_DIR HF_DIR [--check] [--overwrite]

SOURCE is a release .pth/.pth.tar, a timm file, or an HF model directory (config.json +
model.safetensors / pytorch_model.bin); the layout and variant are detected from the keys.
OUTPUT is written atomically and loads with `poolformer_jax.load_pretrained(OUTPUT)`.
`--check` compares the converted model with HF's PyTorch model on real photos and fails
when the logits differ by more than --tolerance; nothing is written then. `--to-hf` goes
the other way: a JAX directory (e.g. fine-tuned) to an HF directory (model.safetensors +
config.json) that `PoolFormerForImageClassification.from_pretrained` loads.
The work lives in poolformer_jax.convert (readers, key tables, HF export, parity check).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("source", help="checkpoint file or HF model directory")
  p.add_argument("output", help="directory to write (config.json + Orbax params)")
  p.add_argument("--model", default=None,
                 help="force the variant (e.g. poolformer_s12); must agree with the weights")
  p.add_argument("--check", action="store_true",
                 help="compare logits with HF's PyTorch model on real photos (needs torch)")
  p.add_argument("--tolerance", type=float, default=1e-4,
                 help="max abs logit difference allowed by --check (float32)")
  p.add_argument("--images", nargs="+", default=None,
                 help="images for --check (default: scikit-image's sample photos)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  p.add_argument("--to-hf", action="store_true",
                 help="reverse: SOURCE is a JAX pretrained directory, OUTPUT an HF directory")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Imported after parsing so --help is instant.
  # pylint: disable=g-import-not-at-top
  from poolformer_jax import convert as cv
  from poolformer_jax import errors, pretrained
  from poolformer_jax.convert import hf_export, parity

  try:
    if os.path.lexists(args.output) and not args.overwrite:
      raise errors.ConfigError(f"{args.output} already exists; choose another output or pass "
                               "--overwrite to replace it")
    if args.to_hf:
      if args.model:
        raise errors.ConfigError("--model applies to PyTorch sources; --to-hf reads the variant "
                                 "from the JAX directory")
      model, info = pretrained.load_pretrained(args.source)
      converted = cv.from_jax(model, info)
      print(f"read {args.source}: {info.variant}, {info.num_classes} classes")
    else:
      converted = cv.convert(args.source, model=args.model)
      info = converted.info
      print(f"read {args.source}: {converted.layout} layout, {info.variant}, "
            f"{info.num_classes} classes, {converted.num_tensors} tensors converted")
    if args.check:
      result = parity.check(converted, parity.load_images(args.images))
      print(f"check vs HF PyTorch: {result.summary()}")
      if not result.max_abs <= args.tolerance:
        print(f"error: max abs logit difference {result.max_abs:.3g} exceeds --tolerance "
              f"{args.tolerance:g}; nothing was written", file=sys.stderr)
        return 1
    if args.to_hf:
      path = hf_export.export_hf_safetensors(converted.model, info, args.output,
                                             overwrite=args.overwrite)
      print(f"wrote {path} (load with transformers' "
            "PoolFormerForImageClassification.from_pretrained)")
      return 0
    path = pretrained.save_pretrained(args.output, converted.model, variant=info.variant,
                                      labels=info.labels, preprocessing=info.preprocessing,
                                      overwrite=args.overwrite)
    print(f"wrote {path} (load with poolformer_jax.load_pretrained)")
    return 0
  except errors.Error as e:  # Ours: the message says what to do. Anything else is a bug.
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
