"""PyTorch MetaFormer checkpoints -> this package's JAX model, and back. One module per job:
`keys` (the key tables and layout shapes), `readers` (files and model directories -> tensors),
`hf_export` (JAX -> PyTorch state dict, transformers or timm directory), `parity` (the check
against the independent PyTorch model: transformers' PoolFormer for v1, timm's for the
MetaFormer baselines), and here the conversion: `convert(path)` detects the layout, the family
and the variant from the tensors and builds the model. Every missing, unexpected or mis-shaped
tensor is reported together; nothing is built (hence nothing written) when any is wrong.
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


@dataclasses.dataclass(frozen=True)
class Structure:
  """What the tensors say about the architecture.

  `mixers[i]` is the token mixer of stage i, or None where the stage's mixer stores nothing
  (pooling or identity: the tensors cannot tell them apart).
  """

  depths: tuple[int, ...]
  widths: tuple[int, ...]
  version: int
  mixers: tuple[str | None, ...]
  head: str

  def fits(self, cfg: MetaFormerConfig) -> bool:
    return (tuple(cfg.depths) == self.depths and tuple(cfg.widths) == self.widths
            and cfg.version == self.version and cfg.head == self.head
            and all(m == c or (m is None and c in keys.PARAMETER_FREE_MIXERS)
                    for m, c in zip(self.mixers, cfg.stage_token_mixers)))

  def describe(self) -> str:
    mixers = ", ".join(m or "/".join(keys.PARAMETER_FREE_MIXERS) for m in self.mixers)
    return (f"depths {list(self.depths)}, widths {list(self.widths)}, version {self.version}, "
            f"token mixers [{mixers}], {self.head} head")


def _structure(canonical: Mapping[str, np.ndarray]) -> Structure:
  """The architecture read from the tensors: block count and norm width per stage, the
  generation, each stage's token mixer and the head.

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
  block_keys = collections.defaultdict(set)
  for k in canonical:
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.\d+\.(.+)", k)
    if m:
      block_keys[int(m[1])].add(m[2])
  mixers = tuple(next((mixer for mixer, key in keys.MIXER_KEYS.items()
                       if key in block_keys[s]), None) for s in stages)
  version = 2 if any(keys.V2_KEY in block_keys[s] for s in stages) else 1
  head = next((h for h, key in keys.CLASSIFIER_KEYS.items() if key in canonical), "linear")
  return Structure(depths=tuple(max(blocks[s]) + 1 for s in stages),
                   widths=tuple(collections.Counter(widths[s]).most_common(1)[0][0]
                                for s in stages),
                   version=version, mixers=mixers, head=head)


def infer_variant(structure: Structure, requested: str | None = None, *,
                  declared: str | None = None, name: str = "") -> str:
  """The registered variant the tensors fit.

  Where they fit several (IdentityFormer and PoolFormerV2 store the same tensors), the choice
  is `requested` (--model), else `declared` (timm's config.json), else the variant named in
  the file name; without any, one error lists the candidates. A forced or declared variant
  must fit the tensors.
  """
  found = [n for n, c in VARIANTS.items() if structure.fits(c)]
  for forced, what in ((requested, "--model"), (declared, "config.json's architecture")):
    if forced is None:
      continue
    if forced not in VARIANTS:
      raise ConversionError(f"unknown model {forced!r}; valid: {', '.join(sorted(VARIANTS))}")
    if forced not in found:
      want = VARIANTS[forced]
      got = " or ".join(found) if found else "no registered variant"
      raise ConversionError(
          f"{what} {forced} (depths {list(want.depths)}, widths {list(want.widths)}, token "
          f"mixers {list(want.stage_token_mixers)}) contradicts the weights "
          f"({structure.describe()}: {got})"
          + ("; drop --model to infer the variant from the weights" if requested else ""))
    return forced
  if not found:
    raise ConversionError(
        f"the weights ({structure.describe()}) match no known variant "
        f"({', '.join(sorted(VARIANTS))})")
  if len(found) > 1:
    named = [n for n in found if n in name.lower()]
    if len(named) == 1:
      return named[0]
    raise ConversionError(
        f"the weights fit {' and '.join(found)}, which store the same tensors (their token "
        "mixers have no parameters), and the file name does not say which: pass "
        + " or ".join(f"--model {n}" for n in found))
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


def _timm_labels(config: dict | None, num_classes: int) -> tuple[str, ...] | None:
  names = (config or {}).get("label_names")
  if not names:
    return None
  if isinstance(names, Mapping):
    names = [names.get(str(i), names.get(i)) for i in range(num_classes)]
  if len(names) != num_classes or any(n is None for n in names):
    raise ConversionError(f"config.json has {len(names)} label_names but the classifier has "
                          f"{num_classes} outputs")
  return tuple(str(n) for n in names)


def _preprocessing(cfg: MetaFormerConfig, source: readers.Source) -> dict:
  """The eval transform: the variant's, then what the source says (timm's pretrained_cfg, HF's
  preprocessor_config.json, or a release file name with `_384`)."""
  pre = pretrained.default_preprocessing(cfg.crop_pct)
  hf_pre = source.hf_preprocessor or {}
  if hf_pre.get("crop_pct") is not None:
    pre["crop_pct"] = float(hf_pre["crop_pct"])
  for k, hk in (("mean", "image_mean"), ("std", "image_std")):
    if hf_pre.get(hk) is not None:
      pre[k] = [float(x) for x in hf_pre[hk]]
  if source.timm_config is not None:
    timm_pre = source.timm_config.get("pretrained_cfg") or {}
    if timm_pre.get("input_size"):
      pre["input_size"] = int(timm_pre["input_size"][-1])
    for k in ("crop_pct", "interpolation", "mean", "std"):
      if timm_pre.get(k) is not None:
        pre[k] = list(timm_pre[k]) if k in ("mean", "std") else timm_pre[k]
  elif re.search(r"_384(?!\d)", source.name):  # the release's names: caformer_s18_384.pth, ...
    pre["input_size"] = 384
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
    mapped = keys.from_source(key, value, layout)
    if mapped is None or keys.lookup(mapped[0], "canonical") is None:
      errors.append(f"unexpected tensor {key} {_shape(value.shape)}")
      continue
    name, canonical[name] = mapped
    origin[name] = key

  structure = _structure(canonical)
  variant = infer_variant(structure, model, name=source.name,
                          declared=(source.timm_config or {}).get("architecture"))
  classifier = canonical.get(keys.CLASSIFIER_KEYS[structure.head])
  if classifier is not None and classifier.ndim == 2:
    num_classes = int(classifier.shape[0])
  else:  # head missing or mis-shaped (reported below): fall back to the metadata.
    num_classes = (len((source.hf_config or {}).get("id2label", {}))
                   or (source.timm_config or {}).get("num_classes") or 1000)
  labels = (_hf_labels(source.hf_config, num_classes)
            or _timm_labels(source.timm_config, num_classes))
  if labels is None:  # release / timm files carry no names: ImageNet-1k's or -21k's
    labels = pretrained.imagenet_labels(num_classes)
  cfg = get_config(variant, num_classes=num_classes)

  abstract = nnx.eval_shape(lambda: MetaFormer(cfg, rngs=nnx.Rngs(0)))
  targets = {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in
             jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}

  def layout_shape(name, canonical_shape):
    return keys.to_source(name, np.empty(canonical_shape, np.float32), layout,
                          cfg.stage_token_mixers)[1].shape

  filled: dict[str, np.ndarray] = {}
  for name, value in canonical.items():
    path, entry = keys.lookup(name, "canonical")
    src = origin[name]
    if path not in targets:
      errors.append(f"unexpected tensor {src} {_shape(source.tensors[src].shape)} (the "
                    f"{variant} model has no {path})")
      continue
    expected = entry.transform.to_torch(np.empty(targets[path].shape, np.float32)).shape
    if tuple(value.shape) != tuple(expected):
      errors.append(f"wrong shape {src}: {_shape(source.tensors[src].shape)}, expected "
                    f"{_shape(layout_shape(name, expected))}")
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
    errors.append(f"missing tensor {keys.source_key(canon, layout)} "
                  f"{_shape(layout_shape(canon, shape))}")
  if errors:
    raise ConversionError(
        f"{len(errors)} problem(s) converting {source.path} ({layout} layout, {variant}); "
        "nothing was written:\n  " + "\n  ".join(errors))

  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(  # "0" keys: list indices
      {k: jnp.asarray(v) for k, v in filled.items()}, sep="."))
  built = nnx.merge(graphdef, state)
  info = PretrainedInfo(variant=variant, num_classes=num_classes, labels=labels,
                        preprocessing=_preprocessing(cfg, source))
  return Converted(model=built, info=info, layout=layout, num_tensors=len(filled),
                   canonical=canonical)


def from_jax(model: MetaFormer, info: PretrainedInfo) -> Converted:
  """A JAX model paired with its own tensors in canonical form: what `parity.check` needs for
  an export."""
  state = hf_export.canonical_state(model)
  return Converted(model=model, info=info, layout="jax", num_tensors=len(state), canonical=state)
