"""The key tables: a PyTorch checkpoint's tensor names -> canonical names -> JAX parameter paths.

`RENAMES[layout]` renames each source layout (the release `.pth.tar`, HF, timm) to canonical
keys (timm's names); `TABLE` maps those to JAX paths with a transform (OIHW->HWIO, 1x1 conv ->
dense, linear transpose). Rows are pairs of templates ("stages.{s}.blocks.{b}.norm{n}.weight"
is a pattern and a format string), so the tables also run backwards for the export. Another
model family or layout adds rows, not code.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import numpy as np

from poolformer_jax.errors import ConversionError

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


def _apply(src: str, dst: str, key: str, index_fn=None) -> str | None:
  """`key` matched against template `src`, written with template `dst`; None if no match."""
  m = _template_regex(src).match(key)
  if m is None:
    return None
  fields = m.groupdict()
  if index_fn is not None:  # Renumber the `s` field; None: this rename does not apply.
    s = index_fn(int(fields["s"])) if fields["s"].isdigit() else None
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
LAYOUTS = tuple(RENAMES)

# ---------------------------------------------------------------------------
# Transforms between PyTorch tensors and JAX parameters (exact: transposes and reshapes only).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _dense_to_jax(w):
  # A 1x1 conv [O, I, 1, 1] used as a dense layer; timm's Mlp may store [O, I].
  return (w[:, :, 0, 0] if w.ndim == 4 else w).T


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
CONV = Transform("OIHW->HWIO", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
CONV1X1_DENSE = Transform("1x1 conv->dense", _dense_to_jax, lambda k: k.T[:, :, None, None])
LINEAR = Transform("linear transpose", lambda w: w.T, lambda k: k.T)


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


def lookup(key: str, side: str) -> tuple[str, Entry] | None:
  """Maps a canonical key to (its JAX path, the row) with side='canonical', or back with 'jax'."""
  other = "jax" if side == "canonical" else "canonical"
  for entry in TABLE:
    out = _apply(getattr(entry, side), getattr(entry, other), key)
    if out is not None:
      return out, entry
  return None


def canonical_key(key: str, layout: str) -> str | None:
  """The canonical name of `layout`'s key, or None when no rename matches (first match wins)."""
  return next(filter(None, (rename.forward(key) for rename in RENAMES[layout])), None)


def source_key(canonical: str, layout: str) -> str:
  """The name a canonical key has in `layout` (used in error messages and the export)."""
  for rename in RENAMES[layout]:
    out = rename.backward(canonical)
    if out is not None:
      return out
  raise KeyError(canonical)


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
