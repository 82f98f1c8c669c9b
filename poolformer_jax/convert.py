"""PyTorch PoolFormer v1 checkpoints <-> this package's JAX model.

Three source layouts exist (the release `.pth.tar`, HF transformers, timm). Each is first
renamed to one canonical key set (timm's names with PyTorch tensors), then ONE table maps
canonical keys to JAX parameter paths with a layout transform (OIHW->HWIO, 1x1 conv ->
dense, linear transpose). Every table entry is a pair of templates, so the same tables run
backwards for the export to HF.

Safety: `.safetensors` is read without torch; pickled files only through torch's
weights-only unpickler, so a downloaded checkpoint cannot run code. Every missing,
unexpected or mis-shaped tensor is collected and reported together; nothing is built
(hence nothing written) when any is wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poolformer_jax import inference
from poolformer_jax.model import VARIANTS, MetaFormer, MetaFormerConfig, get_config
from poolformer_jax import pretrained
from poolformer_jax.pretrained import PretrainedInfo, default_preprocessing

LAYOUTS = ("release", "hf", "timm")


class ConversionError(ValueError):
  """A user-facing conversion problem; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------
# Templates: "stages.{s}.blocks.{b}.norm{n}.weight" is both a pattern and a format string.
# ---------------------------------------------------------------------------

_FIELD = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern:
  """A template's fields become named groups of digits or words (never dots)."""
  parts, pos = [], 0
  for m in _FIELD.finditer(template):
    parts.append(re.escape(template[pos:m.start()]))
    parts.append(f"(?P<{m.group(1)}>[^.]+)")
    pos = m.end()
  parts.append(re.escape(template[pos:]))
  return re.compile("".join(parts) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rename:
  """One source-layout key template <-> one canonical key template.

  `index`, when set, maps the `s` field between the two sides (the release layout numbers
  blocks and downsampling layers in one `network` list): (source -> canonical or None when
  it does not apply, canonical -> source).
  """

  source: str
  canonical: str
  index: tuple[Callable[[int], int | None], Callable[[int], int]] | None = None

  def forward(self, key: str) -> str | None:
    return _apply(self.source, self.canonical, key, self.index and self.index[0])

  def backward(self, key: str) -> str | None:
    return _apply(self.canonical, self.source, key, self.index and self.index[1])


def _apply(src: str, dst: str, key: str, index_fn) -> str | None:
  m = _template_regex(src).match(key)
  if m is None:
    return None
  fields = m.groupdict()
  if index_fn is not None:
    if not fields["s"].isdigit():
      return None
    s = index_fn(int(fields["s"]))
    if s is None:
      return None
    fields["s"] = str(s)
  return dst.format(**fields)


# Network entry n of the release: even n = stage n/2's blocks, odd n = stage (n+1)/2's downsampling.
_EVEN = (lambda n: n // 2 if n % 2 == 0 else None, lambda s: 2 * s)
_ODD = (lambda n: (n + 1) // 2 if n % 2 == 1 else None, lambda s: 2 * s - 1)

_BLOCK = "stages.{s}.blocks.{b}."
_HF_BLOCK = "poolformer.encoder.block.{s}.{b}."

# Source layout -> canonical keys (timm's names). First match wins.
RENAMES: dict[str, tuple[Rename, ...]] = {
    "release": (
        Rename("patch_embed.proj.{p}", "stem.conv.{p}"),
        Rename("network.{s}.proj.{p}", "stages.{s}.downsample.conv.{p}", _ODD),
        Rename("network.{s}.{b}.norm{n}.{p}", _BLOCK + "norm{n}.{p}", _EVEN),
        Rename("network.{s}.{b}.layer_scale_{n}", _BLOCK + "layer_scale{n}.scale", _EVEN),
        Rename("network.{s}.{b}.mlp.fc{n}.{p}", _BLOCK + "mlp.fc{n}.{p}", _EVEN),
        Rename("norm.{p}", "norm.{p}"),
        Rename("head.{p}", "head.{p}"),
    ),
    "hf": (
        Rename("poolformer.encoder.patch_embeddings.0.projection.{p}", "stem.conv.{p}"),
        Rename("poolformer.encoder.patch_embeddings.{s}.projection.{p}",
               "stages.{s}.downsample.conv.{p}"),
        Rename(_HF_BLOCK + "before_norm.{p}", _BLOCK + "norm1.{p}"),
        Rename(_HF_BLOCK + "after_norm.{p}", _BLOCK + "norm2.{p}"),
        Rename(_HF_BLOCK + "layer_scale_{n}", _BLOCK + "layer_scale{n}.scale"),
        Rename(_HF_BLOCK + "output.conv{n}.{p}", _BLOCK + "mlp.fc{n}.{p}"),
        Rename("norm.{p}", "norm.{p}"),
        Rename("classifier.{p}", "head.{p}"),
    ),
    "timm": (
        Rename("stem.conv.{p}", "stem.conv.{p}"),
        Rename("stages.{s}.downsample.conv.{p}", "stages.{s}.downsample.conv.{p}"),
        Rename(_BLOCK + "norm{n}.{p}", _BLOCK + "norm{n}.{p}"),
        Rename(_BLOCK + "layer_scale{n}.scale", _BLOCK + "layer_scale{n}.scale"),
        Rename(_BLOCK + "mlp.fc{n}.{p}", _BLOCK + "mlp.fc{n}.{p}"),
        Rename("head.norm.{p}", "norm.{p}"),
        Rename("head.fc.{p}", "head.{p}"),
    ),
}

# ---------------------------------------------------------------------------
# Transforms between PyTorch tensors and JAX parameters (exact: transposes and reshapes only).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  ndim: int  # rank of the PyTorch tensor


def _dense_to_jax(w):
  # A 1x1 conv [O, I, 1, 1] used as a dense layer; timm's Mlp may store [O, I].
  return (w[:, :, 0, 0] if w.ndim == 4 else w).T


IDENTITY = Transform("identity", lambda x: x, lambda x: x, 1)
CONV = Transform("OIHW->HWIO", lambda w: w.transpose(2, 3, 1, 0),
                 lambda k: k.transpose(3, 2, 0, 1), 4)
CONV1X1_DENSE = Transform("1x1 conv->dense", _dense_to_jax, lambda k: k.T[:, :, None, None], 4)
LINEAR = Transform("linear transpose", lambda w: w.T, lambda k: k.T, 2)


@dataclasses.dataclass(frozen=True)
class Entry:
  canonical: str
  jax: str
  transform: Transform = IDENTITY


# Canonical key -> JAX parameter path (as in nnx.state(model, nnx.Param)), with the transform.
TABLE: tuple[Entry, ...] = (
    Entry("stem.conv.weight", "stem.conv.kernel", CONV),
    Entry("stem.conv.bias", "stem.conv.bias"),
    Entry("stages.{s}.downsample.conv.weight", "stages.{s}.downsample.conv.kernel", CONV),
    Entry("stages.{s}.downsample.conv.bias", "stages.{s}.downsample.conv.bias"),
    Entry(_BLOCK + "norm{n}.weight", _BLOCK + "norm{n}.scale"),
    Entry(_BLOCK + "norm{n}.bias", _BLOCK + "norm{n}.bias"),
    Entry(_BLOCK + "layer_scale{n}.scale", _BLOCK + "layer_scale{n}.scale"),
    Entry(_BLOCK + "mlp.fc{n}.weight", _BLOCK + "mlp.fc{n}.kernel", CONV1X1_DENSE),
    Entry(_BLOCK + "mlp.fc{n}.bias", _BLOCK + "mlp.fc{n}.bias"),
    Entry("norm.weight", "norm.scale"),
    Entry("norm.bias", "norm.bias"),
    Entry("head.weight", "head.kernel", LINEAR),
    Entry("head.bias", "head.bias"),
)


def _lookup(key: str, side: str) -> tuple[str, Entry] | None:
  """Maps a canonical key to its JAX path (side='canonical') or back (side='jax')."""
  other = "jax" if side == "canonical" else "canonical"
  for entry in TABLE:
    out = _apply(getattr(entry, side), getattr(entry, other), key, None)
    if out is not None:
      return out, entry
  return None


def canonical_key(key: str, layout: str) -> str | None:
  """The canonical name of `layout`'s key, or None when no rename matches."""
  for rename in RENAMES[layout]:
    out = rename.forward(key)
    if out is not None:
      return out
  return None


def source_key(canonical: str, layout: str) -> str:
  """The name a canonical key has in `layout` (used in error messages and the export)."""
  for rename in RENAMES[layout]:
    out = rename.backward(canonical)
    if out is not None:
      return out
  raise KeyError(canonical)


# ---------------------------------------------------------------------------
# Readers.
# ---------------------------------------------------------------------------

_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
_TORCH_HINT = ("reading .pth/.pth.tar/.bin files needs PyTorch (pip install torch; the CPU "
               "build is enough), or convert the file to .safetensors")


@dataclasses.dataclass
class Source:
  """What was read: tensors by source name, plus the metadata an HF config.json gives."""

  path: str
  tensors: dict[str, np.ndarray]
  hf_config: dict | None = None
  hf_preprocessor: dict | None = None
  files: tuple[str, ...] = ()


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"could not read {path}: {e}") from None
  if not isinstance(data, dict):
    raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object: it is not "
                          "an HF config file")
  return data


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ConversionError(
        f"could not read {path} as safetensors ({e}); the file may be truncated or not a "
        "safetensors file: download it again") from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """Torch's weights-only unpickler: plain tensors and containers, never arbitrary code."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f"cannot read {path}: {_TORCH_HINT}") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch raises RuntimeError (bad zip), UnpicklingError (not a pickle, or a global the
    # weights-only unpickler refuses), EOFError (truncated legacy pickle), KeyError (garbage).
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
      raise ConversionError(
          f"refused to load {path}: it contains a pickled {refused[1]}, which would run code "
          "on this machine. Only plain state dicts of tensors are loaded (torch weights-only "
          "unpickler); re-save the checkpoint as a state dict or as .safetensors from a "
          "trusted environment") from None
    msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    raise ConversionError(
        f"could not load {path} as a PyTorch checkpoint ({type(e).__name__}: {msg}). Is it a "
        "complete (not truncated) .pth/.pth.tar/.bin state dict saved with torch.save? If it "
        "is truncated, download it again.") from None
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
  tensors, skipped = {}, []
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      if v.dtype in (torch.bfloat16, torch.float16):
        v = v.float()
      tensors[str(k)] = v.numpy()
    else:
      skipped.append(str(k))
  if not tensors:
    raise ConversionError(f"{path} holds no tensors (keys: {sorted(map(str, obj))[:10]})")
  return tensors


def read_source(path: str) -> Source:
  """Reads a file (.pth, .pth.tar, .bin, .safetensors) or an HF model directory."""
  if not os.path.exists(path):
    raise ConversionError(f"{path} does not exist")
  config = preproc = None
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise ConversionError(f"{path} is a directory without config.json; pass an HF model "
                            "directory (config.json + model.safetensors or pytorch_model.bin) "
                            "or a checkpoint file")
    weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    file = weights[0] if weights else None  # safetensors first: no torch, no pickle.
  else:
    file = path
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.basename(path) in ("model.safetensors", "pytorch_model.bin") and os.path.isfile(
        sibling):
      cfg_path = sibling
    else:
      cfg_path = None
  if cfg_path:
    config = _read_json(cfg_path)
    if config.get("format") == pretrained.FORMAT:
      raise ConversionError(f"{path} is already a converted poolformer_jax directory; to export "
                            "it back to the HF PyTorch layout pass --to-hf")
    model_type = config.get("model_type")
    if model_type != "poolformer":
      raise ConversionError(f"{cfg_path} describes a {model_type!r} model, not a PoolFormer "
                            "(model_type 'poolformer')")
    pp = os.path.join(os.path.dirname(cfg_path), "preprocessor_config.json")
    preproc = _read_json(pp) if os.path.isfile(pp) else None
  if file is None:
    raise ConversionError(f"{path} has config.json but neither model.safetensors nor "
                          "pytorch_model.bin")
  with open(file, "rb") as f:
    magic = f.read(8)
  if file.endswith(".safetensors"):
    tensors = _read_safetensors(file)
  elif len(magic) < 8:
    raise ConversionError(f"{file} is empty or truncated ({len(magic)} bytes)")
  else:
    tensors = _read_torch(file)
  return Source(path=path, tensors=tensors, hf_config=config, hf_preprocessor=preproc,
                files=(file,))


# ---------------------------------------------------------------------------
# Layout detection, structure inference, conversion.
# ---------------------------------------------------------------------------


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # DistributedDataParallel saves "module.<key>".
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def detect_layout(keys: Iterable[str]) -> str:
  """The layout whose renames match most keys, among those that name at least one block.

  Requiring a block key keeps other architectures (a ViT also has `norm.*` and `head.*`)
  from passing as a PoolFormer with many unexpected tensors.
  """
  keys = list(keys)

  names = {layout: [c for c in (canonical_key(k, layout) for k in keys) if c is not None]
           for layout in LAYOUTS}
  has_block = [layout for layout in LAYOUTS
               if any(re.match(r"stages\.\d+\.blocks\.\d+\.", c) for c in names[layout])]
  if not has_block:
    sample = ", ".join(sorted(keys)[:6])
    raise ConversionError(
        "this is not a PoolFormer v1 checkpoint: its keys match none of the known layouts "
        "(release 'patch_embed.*'/'network.*', HF 'poolformer.encoder.*', timm 'stem.*'/"
        f"'stages.*'). First keys: {sample}")
  return max(has_block, key=lambda layout: len(names[layout]))


def _structure(canonical: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(depths, widths) read from the tensors: block count and norm width per stage.

  The width is the most common one, so one mis-shaped norm is reported as a wrong shape
  rather than as another variant.
  """
  blocks: dict[int, set[int]] = {}
  widths: dict[int, list[int]] = {}
  pat = _template_regex(_BLOCK + "norm1.weight")
  for k, v in canonical.items():
    m = pat.match(k)
    if m and m["s"].isdigit() and m["b"].isdigit():
      s = int(m["s"])
      blocks.setdefault(s, set()).add(int(m["b"]))
      widths.setdefault(s, []).append(int(v.shape[0]) if v.ndim else 0)
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


def _default_labels(num: int) -> tuple[str, ...]:
  return tuple(f"LABEL_{i}" for i in range(num))


def _hf_labels(config: dict | None, num_classes: int) -> tuple[str, ...] | None:
  if not config or "id2label" not in config:
    return None
  id2label = {int(k): str(v) for k, v in config["id2label"].items()}
  if sorted(id2label) != list(range(num_classes)):
    raise ConversionError(f"config.json has {len(id2label)} labels (id2label) but the "
                          f"classifier has {num_classes} outputs")
  labels = tuple(id2label[i] for i in range(num_classes))
  return None if labels == _default_labels(num_classes) else labels


def _preprocessing(variant_cfg: MetaFormerConfig, hf_pre: dict | None) -> dict:
  pre = default_preprocessing(variant_cfg.crop_pct)
  if hf_pre:
    for k in ("crop_pct",):
      if hf_pre.get(k) is not None:
        pre[k] = float(hf_pre[k])
    for k, hk in (("mean", "image_mean"), ("std", "image_std")):
      if hf_pre.get(hk) is not None:
        pre[k] = [float(x) for x in hf_pre[hk]]
  return pre


def _flat_params(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flat_params(v, path + "."))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any], like: Mapping) -> dict:
  """Nests dotted paths with the key types (int or str) of `like`."""
  out = {}
  for k, v in like.items():
    if isinstance(v, Mapping):
      out[k] = _unflatten({p[len(str(k)) + 1:]: x for p, x in flat.items()
                           if p.startswith(f"{k}.")}, v)
    else:
      out[k] = flat[str(k)]
  return out


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


def convert(source: Source | str, *, model: str | None = None) -> Converted:
  """Builds the JAX model from a checkpoint; raises one ConversionError listing every problem."""
  if isinstance(source, str):
    source = read_source(source)
  tensors = _strip_prefix(source.tensors)
  layout = detect_layout(tensors)
  errors: list[str] = []

  canonical: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for key, value in tensors.items():
    name = canonical_key(key, layout)
    if name is None or _lookup(name, "canonical") is None:
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
    labels = inference.imagenet_labels()
  cfg = get_config(variant, num_classes=num_classes)

  abstract = nnx.eval_shape(lambda: MetaFormer(cfg, rngs=nnx.Rngs(0)))
  params_like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  targets = _flat_params(params_like)

  filled: dict[str, np.ndarray] = {}
  for name, value in canonical.items():
    path, entry = _lookup(name, "canonical")
    src = origin[name]
    if path not in targets:
      errors.append(f"unexpected tensor {src} {_shape(value.shape)} (the {variant} model has "
                    f"no {path})")
      continue
    want = tuple(targets[path].shape)
    expected = entry.transform.to_torch(np.empty(want, np.float32)).shape
    ok_shape = tuple(value.shape) == tuple(expected) or (
        entry.transform is CONV1X1_DENSE and tuple(value.shape) == tuple(expected[:2]))
    if not ok_shape:
      errors.append(f"wrong shape {src}: {_shape(value.shape)}, expected {_shape(expected)}")
      continue
    if not np.issubdtype(value.dtype, np.floating):
      errors.append(f"wrong dtype {src}: {value.dtype}, expected a floating point tensor")
      continue
    filled[path] = np.asarray(entry.transform.to_jax(value), np.float32)
  for path in sorted(set(targets) - set(filled)):
    canon, entry = _lookup(path, "jax")
    if canon in canonical:
      continue  # already reported as wrongly shaped
    shape = entry.transform.to_torch(np.empty(targets[path].shape, np.float32)).shape
    errors.append(f"missing tensor {source_key(canon, layout)} {_shape(shape)}")
  if errors:
    raise ConversionError(
        f"{len(errors)} problem(s) converting {source.path} ({layout} layout, {variant}); "
        "nothing was written:\n  " + "\n  ".join(errors))

  params = _unflatten({k: jnp.asarray(v) for k, v in filled.items()}, params_like)
  graphdef, state = nnx.split(abstract)  # pooling PoolFormer has Params only
  nnx.replace_by_pure_dict(state, params)
  built = nnx.merge(graphdef, state)
  info = PretrainedInfo(variant=variant, num_classes=num_classes, labels=labels,
                        preprocessing=_preprocessing(cfg, source.hf_preprocessor))
  return Converted(model=built, info=info, layout=layout, num_tensors=len(filled),
                   canonical=canonical)


# ---------------------------------------------------------------------------
# Export (JAX -> PyTorch layouts) and the HF reference model for --check.
# ---------------------------------------------------------------------------


def to_torch_state(model: MetaFormer, layout: str = "hf") -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch state dict of numpy arrays in `layout`'s names."""
  if model.cfg.token_mixer != "pooling" or model.features_only:
    raise ConversionError("only the PoolFormer classifier (token_mixer='pooling', with head) "
                          "has a PyTorch counterpart to export to")
  flat = _flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out = {}
  for path, value in flat.items():
    canon, entry = _lookup(path, "jax")
    out[source_key(canon, layout)] = np.ascontiguousarray(
        entry.transform.to_torch(np.asarray(value)))
  return out


def from_jax(model: MetaFormer, info: PretrainedInfo) -> Converted:
  """A JAX model paired with its own HF-layout tensors: what `check` needs for an export."""
  state = to_torch_state(model, "hf")
  return Converted(model=model, info=info, layout="jax", num_tensors=len(state),
                   canonical={canonical_key(k, "hf"): v for k, v in state.items()})


def hf_config_dict(cfg: MetaFormerConfig, labels: tuple[str, ...] | None) -> dict:
  """The fields of transformers.PoolFormerConfig for this model (no transformers needed)."""
  labels = tuple(labels) if labels else _default_labels(cfg.num_classes)
  return {
      "architectures": ["PoolFormerForImageClassification"],
      "model_type": "poolformer",
      "num_channels": cfg.in_channels,
      "depths": list(cfg.depths),
      "hidden_sizes": list(cfg.widths),
      "patch_sizes": [7] + [3] * (len(cfg.depths) - 1),
      "strides": [4] + [2] * (len(cfg.depths) - 1),
      "padding": [2] + [1] * (len(cfg.depths) - 1),
      "num_encoder_blocks": len(cfg.depths),
      "pool_size": cfg.mixer_size,
      "mlp_ratio": cfg.mlp_ratio,
      "hidden_act": "gelu",
      "use_layer_scale": True,
      "layer_scale_init_value": cfg.layer_scale_init,
      "drop_path_rate": 0.0,
      "id2label": {str(i): name for i, name in enumerate(labels)},
      "label2id": {name: i for i, name in enumerate(labels)},
  }


def hf_preprocessor_dict(pre: Mapping) -> dict:
  size = int(pre.get("input_size", 224))
  return {
      "image_processor_type": "PoolFormerImageProcessor",
      "crop_pct": pre["crop_pct"], "do_resize": True, "do_center_crop": True,
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(pre["mean"]), "image_std": list(pre["std"]),
      "resample": 3,  # PIL bicubic
      "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
  }


def export_hf_safetensors(model: MetaFormer, info: PretrainedInfo, directory: str, *,
                          overwrite: bool = False) -> str:
  """Writes an HF model directory (model.safetensors + config.json + preprocessor_config.json).

  `PoolFormerForImageClassification.from_pretrained(directory)` loads it; converting it back
  gives bit-identical parameters. Written atomically like `save_pretrained`.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  state = to_torch_state(model, "hf")

  def write(tmp):
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_dict(model.cfg, info.labels), f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump(hf_preprocessor_dict(info.preprocessing), f, indent=2)

  return pretrained.atomic_directory(directory, write, overwrite=overwrite)


def hf_reference(converted: Converted):
  """HF's PyTorch model holding the SOURCE tensors (renamed only, never transformed)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = get_config(converted.info.variant, num_classes=converted.info.num_classes)
  fields = hf_config_dict(cfg, converted.info.labels)
  fields.pop("architectures"), fields.pop("model_type")
  model = transformers.PoolFormerForImageClassification(transformers.PoolFormerConfig(**fields))
  state = {source_key(k, "hf"): torch.from_numpy(np.array(v, np.float32))
           for k, v in converted.canonical.items()}
  # A 1x1 conv stored as [O, I] (timm's linear Mlp) is the same tensor with two unit dims.
  own = model.state_dict()
  state = {k: v.reshape(own[k].shape) if k in own else v for k, v in state.items()}
  model.load_state_dict(state, strict=True)
  return model.eval()


# ---------------------------------------------------------------------------
# Parity check on real photos.
# ---------------------------------------------------------------------------

SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


def load_images(paths: Iterable[str] | None = None) -> list[np.ndarray]:
  """RGB uint8 arrays: the given files, or scikit-image's bundled sample photos."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if paths:
    images = []
    for p in paths:
      try:
        with Image.open(p) as im:
          images.append(np.asarray(im.convert("RGB")))
      except OSError as e:
        raise ConversionError(f"could not read image {p}: {e}") from None
    return images
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError("no --images given and scikit-image (which ships the sample photos) "
                          "is not installed: pip install scikit-image, or pass --images") from None
  return [getattr(skimage.data, name)() for name in SAMPLE_IMAGES]


def preprocess(images: list[np.ndarray], preprocessing: Mapping, *,
               input_size: int | None = None) -> np.ndarray:
  """HF's PoolFormerImageProcessor (PIL backend): NCHW float32, the array both models get."""
  from transformers import PoolFormerImageProcessorPil  # pylint: disable=g-import-not-at-top
  size = int(input_size or preprocessing.get("input_size", 224))
  proc = PoolFormerImageProcessorPil(
      crop_pct=preprocessing["crop_pct"], image_mean=list(preprocessing["mean"]),
      image_std=list(preprocessing["std"]), size={"shortest_edge": size},
      crop_size={"height": size, "width": size})
  out = proc(images=images, return_tensors="np")["pixel_values"]
  return np.asarray(out, np.float32)


@dataclasses.dataclass(frozen=True)
class CheckResult:
  max_abs: float
  mean_abs: float
  top1: float
  top5: float
  num_images: int

  def summary(self) -> str:
    return (f"{self.num_images} images: max |dlogit| {self.max_abs:.3g}, mean "
            f"{self.mean_abs:.3g}, top-1 agreement {self.top1:.0%}, top-5 overlap {self.top5:.0%}")


def compare_logits(jax_logits: np.ndarray, ref_logits: np.ndarray) -> CheckResult:
  diff = np.abs(np.asarray(jax_logits, np.float64) - np.asarray(ref_logits, np.float64))
  k = min(5, jax_logits.shape[-1])
  top_j = np.argsort(-jax_logits, -1)[:, :k]
  top_r = np.argsort(-ref_logits, -1)[:, :k]
  top5 = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_j, top_r)])
  return CheckResult(max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                     top1=float(np.mean(top_j[:, 0] == top_r[:, 0])), top5=float(top5),
                     num_images=int(jax_logits.shape[0]))


def check(converted: Converted, images: list[np.ndarray], *,
          input_size: int | None = None) -> CheckResult:
  """Runs the JAX model and HF's PyTorch model on the SAME preprocessed float array."""
  import torch  # pylint: disable=g-import-not-at-top
  pixels = preprocess(images, converted.info.preprocessing, input_size=input_size)
  reference = hf_reference(converted)
  with torch.no_grad():
    ref = reference(torch.from_numpy(pixels)).logits.numpy()
  forward = nnx.jit(lambda model, x: model(x))
  with jax.default_matmul_precision("highest"):  # float32 matmuls in full precision
    out = np.asarray(forward(converted.model, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  return compare_logits(out, ref)
