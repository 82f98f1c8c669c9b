"""Converts a PyTorch PoolFormer / MetaFormer checkpoint to a JAX pretrained directory, and back.

  python convert_torch_weights.py SOURCE OUTPUT [--model NAME] [--check] [--tolerance T]
                                  [--images PATH ...] [--overwrite]
  python convert_torch_weights.py --to-timm JAX_DIR TIMM_DIR [--check] [--overwrite]
  python convert_torch_weights.py --to-hf JAX_DIR HF_DIR [--check] [--overwrite]

SOURCE is a release .pth/.pth.tar (PoolFormer v1 or the MetaFormer baselines), a timm state
dict (.pth, .safetensors), a timm model directory as on the HF hub (config.json +
model.safetensors), or a transformers PoolFormer directory. The layout, the family and the
variant are detected from the tensors; where the tensors cannot tell (IdentityFormer and
PoolFormerV2 store the same ones) the file name or timm's config.json decides, else --model.
OUTPUT is written atomically with the eval preprocessing of the checkpoint (crop, 224 or 384)
and loads with `poolformer_jax.load_pretrained(OUTPUT)`. `--check` compares the converted model
with the independent PyTorch model (transformers' PoolFormer for v1, timm's for the MetaFormer
baselines) on real photos and fails when the logits differ by more than --tolerance; nothing is
written then. `--to-timm` / `--to-hf` go the other way: a JAX directory (converted, or a
training workdir) to a timm directory (PoolFormerV2, ConvFormer, CAFormer) or a transformers
directory (PoolFormer v1). The work lives in poolformer_jax.convert.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("source", help="checkpoint file or model directory")
  p.add_argument("output", help="directory to write")
  p.add_argument("--model", default=None,
                 help="the variant (e.g. identityformer_s12), where the tensors fit several; "
                      "must agree with the weights")
  p.add_argument("--check", action="store_true",
                 help="compare logits with the PyTorch reference on real photos (needs torch; "
                      "timm for the MetaFormer baselines)")
  p.add_argument("--tolerance", type=float, default=1e-4,
                 help="max abs logit difference allowed by --check (float32)")
  p.add_argument("--images", nargs="+", default=None,
                 help="images for --check (default: scikit-image's sample photos)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  direction = p.add_mutually_exclusive_group()
  direction.add_argument("--to-hf", action="store_true",
                         help="reverse: SOURCE is a JAX directory, OUTPUT a transformers "
                              "directory (PoolFormer v1)")
  direction.add_argument("--to-timm", action="store_true",
                         help="reverse: SOURCE is a JAX directory, OUTPUT a timm directory in "
                              "the HF-hub layout (PoolFormerV2, ConvFormer, CAFormer)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Imported after parsing so --help is instant.
  # pylint: disable=g-import-not-at-top
  from poolformer_jax import convert as cv
  from poolformer_jax import errors, hub, pretrained
  from poolformer_jax.convert import hf_export, parity

  reverse = args.to_hf or args.to_timm
  try:
    if os.path.lexists(args.output) and not args.overwrite:
      raise errors.ConfigError(f"{args.output} already exists; choose another output or pass "
                               "--overwrite to replace it")
    if reverse:
      if args.model:
        raise errors.ConfigError("--model applies to PyTorch sources; --to-hf and --to-timm "
                                 "read the variant from the JAX directory")
      model, info = hub.load_pretrained(args.source)
      # Refuse what the target cannot hold before any check runs.
      if args.to_timm:
        hf_export.timm_architecture(model.cfg, info.variant)
      else:
        hf_export.require_transformers(model.cfg, info.variant)
      converted = cv.from_jax(model, info)
      print(f"read {args.source}: {info.variant}, {info.num_classes} classes")
    else:
      converted = cv.convert(args.source, model=args.model)
      info = converted.info
      print(f"read {args.source}: {converted.layout} layout, {info.variant}, "
            f"{info.num_classes} classes, {converted.num_tensors} tensors converted, "
            f"eval input {info.preprocessing['input_size']} at crop_pct "
            f"{info.preprocessing['crop_pct']}")
    if args.check:
      result = parity.check(converted, parity.load_images(args.images))
      print(f"check {result.summary()}")
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
    if args.to_timm:
      path = hf_export.export_timm(converted.model, info, args.output, overwrite=args.overwrite)
      print(f"wrote {path} (load with timm.create_model('local-dir:{path}', pretrained=True))")
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
