"""The parity check of a conversion: our JAX model and HF's PyTorch model holding the source
tensors (renamed only, never transformed), on the same preprocessed photos. Needs torch and
transformers (requirements-torch.txt).
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
from poolformer_jax.model import get_config


def hf_reference(converted: Converted):
  """HF's PyTorch model holding the SOURCE tensors (renamed only, never transformed)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = get_config(converted.info.variant, num_classes=converted.info.num_classes)
  fields = hf_export.hf_config_dict(cfg, converted.info.labels)
  fields.pop("architectures"), fields.pop("model_type")
  model = transformers.PoolFormerForImageClassification(transformers.PoolFormerConfig(**fields))
  state = {keys.source_key(k, "hf"): torch.from_numpy(np.array(v, np.float32))
           for k, v in converted.canonical.items()}
  # A 1x1 conv stored as [O, I] (timm's linear Mlp) is the same tensor with two unit dims.
  own = model.state_dict()
  state = {k: v.reshape(own[k].shape) if k in own else v for k, v in state.items()}
  model.load_state_dict(state, strict=True)
  return model.eval()


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
