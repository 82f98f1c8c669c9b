"""The key tables: a PyTorch checkpoint's tensor names -> canonical names -> JAX parameter paths.

`RENAMES[layout]` renames each source layout to canonical keys (timm's module names, with the
head as the releases name it: timm's `head.norm` / `head.fc` are canonical `norm` / `head`);
`TABLE` maps those to JAX paths with a transform (OIHW->HWIO, linear transpose). Rows are pairs
of templates ("stages.{s}.blocks.{b}.norm{n}.weight" is a pattern and a format string), so the
tables also run backwards for the export. Another model family or layout adds rows, not code.

Layouts: `release` (PoolFormer v1's `.pth.tar`), `hf` (transformers' PoolFormer), `timm` (both
generations), `release_v2` (the MetaFormer baselines' `.pth`: IdentityFormer, RandFormer,
PoolFormerV2, ConvFormer, CAFormer). A dense weight is (out, in) in canonical form; layouts
that store it as a 1x1 conv (out, in, 1, 1) say so on their row (`conv1x1`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence

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

  `index`, when set, maps the `s` field between the two sides (source -> canonical or None
  when the row does not apply, canonical -> source): the v1 release numbers blocks and
  downsampling layers in one `network` list. `conv1x1`: the layout stores this dense weight as
  a 1x1 conv (out, in, 1, 1) in every stage that runs channels-first, i.e. all but the
  attention stages (timm runs those on (B, N, C) tokens, with plain (out, in) weights).
  """

  source: str
  canonical: str
  index: tuple[Callable[[int], int | None], Callable[[int], int]] | None = None
  conv1x1: bool = False

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


# Network entry n of the v1 release: even n = stage n/2's blocks, odd n = stage (n+1)/2's
# downsampling.
_EVEN = (lambda n: n // 2 if n % 2 == 0 else None, lambda s: 2 * s)
_ODD = (lambda n: (n + 1) // 2 if n % 2 == 1 else None, lambda s: 2 * s - 1)
# The v2 release's downsample_layers.0 is the stem; 1-3 precede stages 1-3.
_AFTER_STEM = (lambda n: n if n > 0 else None, lambda s: s)

_BLOCK = "stages.{s}.blocks.{b}."
_HF_BLOCK = "poolformer.encoder.block.{s}.{b}."
_V2_BLOCK = "stages.{s}.{b}."

# Source layout -> canonical keys. First match wins (in both directions).
RENAMES: dict[str, tuple[Rename, ...]] = {
    "release": (
        Rename("patch_embed.proj.{p}", "stem.conv.{p}"),
        Rename("network.{s}.proj.{p}", "stages.{s}.downsample.conv.{p}", _ODD),
        Rename("network.{s}.{b}.norm{n}.{p}", _BLOCK + "norm{n}.{p}", _EVEN),
        Rename("network.{s}.{b}.layer_scale_{n}", _BLOCK + "layer_scale{n}.scale", _EVEN),
        Rename("network.{s}.{b}.mlp.fc{n}.{p}", _BLOCK + "mlp.fc{n}.{p}", _EVEN, conv1x1=True),
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
        Rename(_HF_BLOCK + "output.conv{n}.{p}", _BLOCK + "mlp.fc{n}.{p}", conv1x1=True),
        Rename("norm.{p}", "norm.{p}"),
        Rename("classifier.{p}", "head.{p}"),
    ),
    "timm": (
        Rename("stem.{m}.{p}", "stem.{m}.{p}"),  # conv; norm (v2)
        Rename("stages.{s}.downsample.{m}.{p}", "stages.{s}.downsample.{m}.{p}"),
        Rename(_BLOCK + "norm{n}.{p}", _BLOCK + "norm{n}.{p}"),
        Rename(_BLOCK + "layer_scale{n}.scale", _BLOCK + "layer_scale{n}.scale"),
        Rename(_BLOCK + "res_scale{n}.scale", _BLOCK + "res_scale{n}.scale"),
        Rename(_BLOCK + "mlp.fc{n}.{p}", _BLOCK + "mlp.fc{n}.{p}", conv1x1=True),
        Rename(_BLOCK + "mlp.act.{p}", _BLOCK + "mlp.act.{p}"),
        Rename(_BLOCK + "token_mixer.pwconv{n}.{p}", _BLOCK + "token_mixer.pwconv{n}.{p}",
               conv1x1=True),
        Rename(_BLOCK + "token_mixer.{m}.{p}", _BLOCK + "token_mixer.{m}.{p}"),
        # timm has no RandFormer: this names its matrices in timm's MetaFormer skeleton holding
        # a random-mixing module, as the parity check's reference does.
        Rename(_BLOCK + "token_mixer.random_matrix", _BLOCK + "token_mixer.random_matrix"),
        Rename("head.norm.{p}", "norm.{p}"),
        Rename("head.fc.{m}.{p}", "head.{m}.{p}"),  # the MLP head: fc1, norm, fc2
        Rename("head.fc.{p}", "head.{p}"),
    ),
    "release_v2": (
        Rename("downsample_layers.0.conv.{p}", "stem.conv.{p}"),
        Rename("downsample_layers.0.post_norm.{p}", "stem.norm.{p}"),
        Rename("downsample_layers.{s}.conv.{p}", "stages.{s}.downsample.conv.{p}", _AFTER_STEM),
        Rename("downsample_layers.{s}.pre_norm.{p}", "stages.{s}.downsample.norm.{p}",
               _AFTER_STEM),
        Rename(_V2_BLOCK + "norm{n}.{p}", _BLOCK + "norm{n}.{p}"),
        Rename(_V2_BLOCK + "res_scale{n}.scale", _BLOCK + "res_scale{n}.scale"),
        Rename(_V2_BLOCK + "mlp.{m}.{p}", _BLOCK + "mlp.{m}.{p}"),  # fc1, act, fc2
        Rename(_V2_BLOCK + "token_mixer.{m}.{p}", _BLOCK + "token_mixer.{m}.{p}"),
        Rename(_V2_BLOCK + "token_mixer.random_matrix", _BLOCK + "token_mixer.random_matrix"),
        Rename("norm.{p}", "norm.{p}"),
        Rename("head.{m}.{p}", "head.{m}.{p}"),  # the MLP head: fc1, norm, fc2
        Rename("head.{p}", "head.{p}"),
    ),
}
LAYOUTS = tuple(RENAMES)
# The model generations (MetaFormerConfig.version) each layout holds.
LAYOUT_VERSIONS = {"release": (1,), "hf": (1,), "timm": (1, 2), "release_v2": (2,)}

# ---------------------------------------------------------------------------
# Transforms between PyTorch tensors (canonical form) and JAX parameters (exact: transposes only).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
CONV = Transform("OIHW->HWIO", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
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
    Entry("stem.norm.weight", "stem.norm.scale"),
    Entry("stages.{s}.downsample.conv.weight", "stages.{s}.downsample.conv.kernel", CONV),
    Entry("stages.{s}.downsample.conv.bias", "stages.{s}.downsample.conv.bias"),
    Entry("stages.{s}.downsample.norm.weight", "stages.{s}.downsample.norm.scale"),
    Entry(_BLOCK + "norm{n}.weight", _BLOCK + "norm{n}.scale"),
    Entry(_BLOCK + "norm{n}.bias", _BLOCK + "norm{n}.bias"),
    Entry(_BLOCK + "layer_scale{n}.scale", _BLOCK + "layer_scale{n}.scale"),
    Entry(_BLOCK + "res_scale{n}.scale", _BLOCK + "res_scale{n}.scale"),
    Entry(_BLOCK + "mlp.fc{n}.weight", _BLOCK + "mlp.fc{n}.kernel", LINEAR),
    Entry(_BLOCK + "mlp.fc{n}.bias", _BLOCK + "mlp.fc{n}.bias"),
    Entry(_BLOCK + "mlp.act.{p}", _BLOCK + "mlp.act.{p}"),  # StarReLU's scale and bias
    Entry(_BLOCK + "token_mixer.pwconv{n}.weight", _BLOCK + "token_mixer.pwconv{n}.kernel",
          LINEAR),
    Entry(_BLOCK + "token_mixer.act1.{p}", _BLOCK + "token_mixer.act1.{p}"),
    Entry(_BLOCK + "token_mixer.dwconv.weight", _BLOCK + "token_mixer.dwconv.kernel", CONV),
    Entry(_BLOCK + "token_mixer.qkv.weight", _BLOCK + "token_mixer.qkv.kernel", LINEAR),
    Entry(_BLOCK + "token_mixer.proj.weight", _BLOCK + "token_mixer.proj.kernel", LINEAR),
    Entry(_BLOCK + "token_mixer.random_matrix", _BLOCK + "token_mixer.random_matrix"),
    Entry("norm.weight", "norm.scale"),
    Entry("norm.bias", "norm.bias"),
    Entry("head.weight", "head.kernel", LINEAR),
    Entry("head.bias", "head.bias"),
    Entry("head.fc{n}.weight", "head.fc{n}.kernel", LINEAR),
    Entry("head.fc{n}.bias", "head.fc{n}.bias"),
    Entry("head.norm.weight", "head.norm.scale"),
    Entry("head.norm.bias", "head.norm.bias"),
)

# What the tensors say about the architecture: a block key that only this token mixer has
# (the parameter-free mixers, pooling and identity, leave none), and the classifier's weight.
MIXER_KEYS = {"attention": "token_mixer.qkv.weight", "sepconv": "token_mixer.pwconv1.weight",
              "random": "token_mixer.random_matrix"}
PARAMETER_FREE_MIXERS = ("pooling", "identity")
CLASSIFIER_KEYS = {"linear": "head.weight", "mlp": "head.fc2.weight"}
V2_KEY = "mlp.act.scale"  # StarReLU: in every block of the MetaFormer baselines, none of v1's
# Mixers whose stages timm runs on (B, N, C) tokens: their dense weights are never 1x1 convs.
TOKEN_MIXERS_ON_TOKENS = frozenset({"attention"})


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


def _backward(canonical: str, layout: str) -> tuple[str, Rename]:
  for rename in RENAMES[layout]:
    out = rename.backward(canonical)
    if out is not None:
      return out, rename
  raise KeyError(f"{canonical} has no name in the {layout} layout")


def source_key(canonical: str, layout: str) -> str:
  """The name a canonical key has in `layout` (used in error messages and the export)."""
  return _backward(canonical, layout)[0]


def from_source(key: str, value: np.ndarray, layout: str) -> tuple[str, np.ndarray] | None:
  """(canonical name, tensor in canonical form) of `layout`'s tensor; None if no row matches.

  A 1x1 conv where the canonical form is dense loses its unit dims; a dense (out, in) where
  the layout would store a 1x1 conv is accepted as is (timm's own loader does the same).
  """
  for rename in RENAMES[layout]:
    name = rename.forward(key)
    if name is not None:
      if rename.conv1x1 and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
      return name, value
  return None


def to_source(canonical: str, value: np.ndarray, layout: str,
              stage_mixers: Sequence[str]) -> tuple[str, np.ndarray]:
  """(`layout`'s name, tensor in `layout`'s shape) of a canonical tensor of a model whose stages
  use `stage_mixers`."""
  key, rename = _backward(canonical, layout)
  if rename.conv1x1 and value.ndim == 2:
    stage = re.match(r"stages\.(\d+)\.", canonical)
    if stage is None or stage_mixers[int(stage[1])] not in TOKEN_MIXERS_ON_TOKENS:
      value = value[:, :, None, None]
  return key, value


def detect_layout(keys: Iterable[str]) -> str:
  """The layout whose renames give the most known canonical keys, among those that name at
  least one block.

  Requiring a block key keeps other architectures (a ViT also has `norm.*` and `head.*`)
  from passing as a MetaFormer with many unexpected tensors.
  """
  keys = list(keys)
  names = {layout: [c for c in (canonical_key(k, layout) for k in keys)
                    if c is not None and lookup(c, "canonical") is not None]
           for layout in LAYOUTS}
  has_block = [layout for layout in LAYOUTS
               if any(re.match(r"stages\.\d+\.blocks\.\d+\.", c) for c in names[layout])]
  if not has_block:
    sample = ", ".join(sorted(keys)[:6])
    raise ConversionError(
        "this is not a PoolFormer / MetaFormer checkpoint: its keys match none of the known "
        "layouts (PoolFormer release 'patch_embed.*'/'network.*', HF 'poolformer.encoder.*', "
        "timm 'stem.*'/'stages.*.blocks.*', MetaFormer-baselines release "
        f"'downsample_layers.*'/'stages.*'). First keys: {sample}")
  return max(has_block, key=lambda layout: len(names[layout]))
