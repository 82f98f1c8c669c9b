"""PyTorch PoolFormer v1 checkpoints -> this package's JAX model, and back. One module per job:
`keys` (the key tables and layout transforms), `readers` (files and HF directories -> tensors),
`hf_export` (JAX -> PyTorch state dict or HF directory), `parity` (the check against HF's
PyTorch model), and here the conversion: `convert(path)` detects the layout and the variant and
builds the model. Every missing, unexpected or mis-shaped tensor is reported together; nothing
is built (hence nothing written) when any is wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poolformer_jax import pretrained
from poolformer_jax.convert import hf_export
from poolformer_jax.convert import keys
from poolformer_jax.convert import readers
from poolformer_jax.errors import ConversionError
from poolformer_jax.model import VARIANTS, MetaFormer, MetaFormerConfig, get_config
from poolformer_jax.pretrained import PretrainedInfo


def _structure(canonical: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(depths, widths) read from the tensors: block count and norm width per stage.

  The width is the most common one, so one mis-shaped norm is reported as a wrong shape
  rather than as another variant.
  """
  blocks: dict[int, set[int]] = {}
  widths: dict[int, list[int]] = {}
  for k, v in canonical.items():
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight", k)
    if m:
      blocks.setdefault(int(m[1]), set()).add(int(m[2]))
      widths.setdefault(int(m[1]), []).append(int(v.shape[0]) if v.ndim else 0)
  stages = sorted(blocks)
  if stages != list(range(len(stages))) or not stages:
    raise ConversionError(f"cannot infer the stages from the checkpoint (found stages {stages})")
  depths = tuple(max(blocks[s]) + 1 for s in stages)
  return depths, tuple(collections.Counter(widths[s]).most_common(1)[0][0] for s in stages)


def infer_variant(depths, widths, requested: str | None = None) -> str:
  """The registered variant with these depths and widths; a forced one must agree."""
  found = [n for n, c in VARIANTS.items()
           if tuple(c.depths) == tuple(depths) and tuple(c.widths) == tuple(widths)]
  if requested is not None:
    if requested not in VARIANTS:
      raise ConversionError(f"unknown model {requested!r}; valid: {', '.join(sorted(VARIANTS))}")
    if requested not in found:
      want = VARIANTS[requested]
      got = found[0] if found else "no registered variant"
      raise ConversionError(
          f"--model {requested} (depths {list(want.depths)}, widths {list(want.widths)}) "
          f"contradicts the weights (depths {list(depths)}, widths {list(widths)}: {got}); "
          "drop --model to infer the variant from the weights")
    return requested
  if not found:
    raise ConversionError(
        f"the weights have depths {list(depths)} and widths {list(widths)}, which match no "
        f"known variant ({', '.join(sorted(VARIANTS))})")
  return found[0]


def _hf_labels(config: dict | None, num_classes: int) -> tuple[str, ...] | None:
  if not config or "id2label" not in config:
    return None
  id2label = {int(k): str(v) for k, v in config["id2label"].items()}
  if sorted(id2label) != list(range(num_classes)):
    raise ConversionError(f"config.json has {len(id2label)} labels (id2label) but the "
                          f"classifier has {num_classes} outputs")
  labels = tuple(id2label[i] for i in range(num_classes))
  return None if labels == hf_export.default_labels(num_classes) else labels


def _preprocessing(variant_cfg: MetaFormerConfig, hf_pre: dict | None) -> dict:
  pre = pretrained.default_preprocessing(variant_cfg.crop_pct)
  hf_pre = hf_pre or {}
  if hf_pre.get("crop_pct") is not None:
    pre["crop_pct"] = float(hf_pre["crop_pct"])
  for k, hk in (("mean", "image_mean"), ("std", "image_std")):
    if hf_pre.get(hk) is not None:
      pre[k] = [float(x) for x in hf_pre[hk]]
  return pre


def _shape(x) -> str:
  """PyTorch-style `[512, 128, 1, 1]`, unambiguous for 1-D shapes too."""
  return "[" + ", ".join(map(str, x)) + "]"


@dataclasses.dataclass
class Converted:
  """The converted model plus what the CLI reports and `--check` needs."""

  model: MetaFormer
  info: PretrainedInfo
  layout: str
  num_tensors: int
  canonical: dict[str, np.ndarray]  # source tensors under canonical names (for the reference)


def convert(source: readers.Source | str, *, model: str | None = None) -> Converted:
  """Builds the JAX model from a checkpoint; raises one ConversionError listing every problem."""
  if isinstance(source, str):
    source = readers.read_source(source)
  layout = keys.detect_layout(source.tensors)
  errors: list[str] = []

  canonical: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for key, value in source.tensors.items():
    name = keys.canonical_key(key, layout)
    if name is None or keys.lookup(name, "canonical") is None:
      errors.append(f"unexpected tensor {key} {_shape(value.shape)}")
      continue
    canonical[name], origin[name] = value, key

  depths, widths = _structure(canonical)
  variant = infer_variant(depths, widths, model)
  head = canonical.get("head.weight")
  if head is not None and head.ndim == 2:
    num_classes = int(head.shape[0])
  else:  # head missing or mis-shaped (reported below): fall back to the metadata.
    num_classes = len((source.hf_config or {}).get("id2label", {})) or 1000
  labels = _hf_labels(source.hf_config, num_classes)
  if labels is None and num_classes == 1000:  # release / timm files carry no names: ImageNet's
    labels = pretrained.imagenet_labels()
  cfg = get_config(variant, num_classes=num_classes)

  abstract = nnx.eval_shape(lambda: MetaFormer(cfg, rngs=nnx.Rngs(0)))
  targets = {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in
             jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}

  filled: dict[str, np.ndarray] = {}
  for name, value in canonical.items():
    path, entry = keys.lookup(name, "canonical")
    src = origin[name]
    if path not in targets:
      errors.append(f"unexpected tensor {src} {_shape(value.shape)} (the {variant} model has "
                    f"no {path})")
      continue
    expected = entry.transform.to_torch(np.empty(targets[path].shape, np.float32)).shape
    ok_shape = tuple(value.shape) == tuple(expected) or (
        entry.transform is keys.CONV1X1_DENSE and tuple(value.shape) == tuple(expected[:2]))
    if not ok_shape:
      errors.append(f"wrong shape {src}: {_shape(value.shape)}, expected {_shape(expected)}")
      continue
    if not np.issubdtype(value.dtype, np.floating):
      errors.append(f"wrong dtype {src}: {value.dtype}, expected a floating point tensor")
      continue
    filled[path] = np.asarray(entry.transform.to_jax(value), np.float32)
  for path in sorted(set(targets) - set(filled)):
    canon, entry = keys.lookup(path, "jax")
    if canon in canonical:
      continue  # already reported as wrongly shaped
    shape = entry.transform.to_torch(np.empty(targets[path].shape, np.float32)).shape
    errors.append(f"missing tensor {keys.source_key(canon, layout)} {_shape(shape)}")
  if errors:
    raise ConversionError(
        f"{len(errors)} problem(s) converting {source.path} ({layout} layout, {variant}); "
        "nothing was written:\n  " + "\n  ".join(errors))

  graphdef, state = nnx.split(abstract)  # pooling PoolFormer has Params only
  nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(  # "0" keys: list indices
      {k: jnp.asarray(v) for k, v in filled.items()}, sep="."))
  built = nnx.merge(graphdef, state)
  info = PretrainedInfo(variant=variant, num_classes=num_classes, labels=labels,
                        preprocessing=_preprocessing(cfg, source.hf_preprocessor))
  return Converted(model=built, info=info, layout=layout, num_tensors=len(filled),
                   canonical=canonical)


def from_jax(model: MetaFormer, info: PretrainedInfo) -> Converted:
  """A JAX model paired with its own HF-layout tensors: what `parity.check` needs for an export."""
  state = hf_export.to_torch_state(model, "hf")
  return Converted(model=model, info=info, layout="jax", num_tensors=len(state),
                   canonical={keys.canonical_key(k, "hf"): v for k, v in state.items()})

