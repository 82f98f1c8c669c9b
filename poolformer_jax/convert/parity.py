"""The parity check of a conversion: our JAX model and an independent PyTorch model holding the
source tensors (renamed only, never transformed), on the same preprocessed photos. The
reference is transformers' PoolFormer for v1 and timm's model for the MetaFormer baselines
(IdentityFormer as timm's PoolFormerV2 with identity mixers, RandFormer as timm's MetaFormer
skeleton with the paper's random mixing). Needs torch and transformers
(requirements-torch.txt), and timm for the MetaFormer baselines.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poolformer_jax.convert import Converted
from poolformer_jax.convert import hf_export
from poolformer_jax.convert import keys
from poolformer_jax.errors import ConversionError
from poolformer_jax.model import RANDOM_MIXING_INPUT_SIZE, get_config

_TIMM_HINT = ("pip install timm (with torchvision; or, next to the CPU torch of "
              "requirements-torch.txt, `pip install --no-deps -r requirements-timm.txt` plus a "
              "torchvision build that matches your torch)")


def _source_state(model, canonical: dict, layout: str) -> dict:
  """`canonical` under `layout`'s names, shaped as `model` stores them, for load_state_dict.

  A dense weight that one layout stores as a 1x1 conv ([O, I, 1, 1]) and the other as a
  linear layer ([O, I]) is the same tensor with two unit dims.
  """
  import torch  # pylint: disable=g-import-not-at-top
  own = model.state_dict()
  state = {}
  for name, value in canonical.items():
    key = keys.source_key(name, layout)
    tensor = torch.from_numpy(np.array(value, np.float32))
    state[key] = tensor.reshape(own[key].shape) if key in own else tensor
  return state


def hf_reference(converted: Converted):
  """HF's PyTorch model holding the SOURCE tensors (renamed only, never transformed)."""
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = get_config(converted.info.variant, num_classes=converted.info.num_classes)
  fields = hf_export.hf_config_dict(cfg, converted.info.labels)
  fields.pop("architectures"), fields.pop("model_type")
  model = transformers.PoolFormerForImageClassification(transformers.PoolFormerConfig(**fields))
  model.load_state_dict(_source_state(model, converted.canonical, "hf"), strict=True)
  return model.eval()


def _import_timm():
  try:
    import timm  # pylint: disable=g-import-not-at-top
    from timm.models import metaformer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"--check of a MetaFormer-baselines model compares it with timm's "
                          f"PyTorch model, and timm cannot be imported ({e}): {_TIMM_HINT}"
                          ) from None
  return timm, metaformer


def _random_mixing(num_tokens: int):
  """RandFormer's mixer as the paper defines it, for timm's NCHW skeleton (timm has none):
  `out[:, :, m] = sum_n R[m, n] x[:, :, n]` over the row-major H*W tokens, R frozen."""
  import torch  # pylint: disable=g-import-not-at-top

  class RandomMixing(torch.nn.Module):

    def __init__(self, dim, **kwargs):
      del dim, kwargs
      super().__init__()
      self.random_matrix = torch.nn.Parameter(torch.zeros(num_tokens, num_tokens),
                                              requires_grad=False)

    def forward(self, x):
      b, c, h, w = x.shape
      return torch.einsum("mn,bcn->bcm", self.random_matrix, x.reshape(b, c, h * w)).reshape(
          b, c, h, w)

  return RandomMixing


def timm_reference(converted: Converted):
  """timm's PyTorch model holding the SOURCE tensors (renamed only, never transformed).

  Its MLP-head LayerNorm gets our eps (the release's 1e-5; timm's own is 1e-6), so the check
  compares the conversion, not that known difference of timm's.
  """
  import torch  # pylint: disable=g-import-not-at-top
  timm, metaformer = _import_timm()
  cfg = converted.model.cfg
  family, _, size = converted.info.variant.partition("_")
  kw = dict(num_classes=cfg.num_classes)
  if family == "identityformer":
    model = timm.create_model(f"poolformerv2_{size}", token_mixers=torch.nn.Identity, **kw)
  elif family == "randformer":
    tokens = [(RANDOM_MIXING_INPUT_SIZE // 2 ** (i + 2)) ** 2 for i in range(len(cfg.depths))]
    mixers = [_random_mixing(n) if m == "random" else torch.nn.Identity
              for m, n in zip(cfg.stage_token_mixers, tokens)]
    model = metaformer.MetaFormer(depths=cfg.depths, dims=cfg.widths, token_mixers=mixers,
                                  norm_layers=metaformer.GroupNorm1NoBias, use_mlp_head=False,
                                  **kw)
  else:
    model = timm.create_model(converted.info.variant, **kw)
  if cfg.head == "mlp":
    model.head.fc.norm.eps = cfg.head_norm_eps
  try:
    model.load_state_dict(_source_state(model, converted.canonical, "timm"), strict=True)
  except RuntimeError as e:
    raise ConversionError(f"timm's model for {converted.info.variant} does not hold these "
                          f"tensors: {e}") from None
  return model.eval()


def reference_logits(converted: Converted, pixels_nchw: np.ndarray) -> tuple[np.ndarray, str]:
  """The independent PyTorch model's logits on `pixels_nchw`, and what that model is."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    if converted.model.cfg.version == 1:
      logits = hf_reference(converted)(torch.from_numpy(pixels_nchw)).logits
      return logits.numpy(), "transformers' PyTorch PoolFormer"
    logits = timm_reference(converted)(torch.from_numpy(pixels_nchw))
  return logits.numpy(), "timm's PyTorch model"


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
  reference: str = "the PyTorch reference"

  def summary(self) -> str:
    return (f"vs {self.reference}, {self.num_images} images: max |dlogit| {self.max_abs:.3g}, mean "
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
  """Runs the JAX model and the PyTorch reference on the SAME preprocessed float array."""
  pixels = preprocess(images, converted.info.preprocessing, input_size=input_size)
  ref, reference = reference_logits(converted, pixels)
  forward = nnx.jit(lambda model, x: model(x))
  with jax.default_matmul_precision("highest"):  # float32 matmuls in full precision
    out = np.asarray(forward(converted.model, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  return dataclasses.replace(compare_logits(out, ref), reference=reference)
