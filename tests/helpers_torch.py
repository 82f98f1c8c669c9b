"""Test helpers: random PyTorch references (HF's PoolFormer, timm's MetaFormers) and their
checkpoint layouts.

The renames that WRITE test checkpoints (`to_release_keys`, `to_timm_keys`, `timm_to_release`)
are written out independently of poolformer_jax.convert, from the layouts documented in the
release code, HF and timm, so a bug in the converter's tables cannot cancel out in a test;
`timm_to_release` is itself checked against timm's `checkpoint_filter_fn`. Loading timm's
tensors into our modules (`load_timm_state`) goes through the converter's tables, which the
logit and gradient parity with timm then tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re

import numpy as np
import torch
import transformers

SIZES = {
    "poolformer_s12": dict(depths=[2, 2, 6, 2], hidden_sizes=[64, 128, 320, 512]),
    "poolformer_m36": dict(depths=[6, 6, 18, 6], hidden_sizes=[96, 192, 384, 768]),
}


def random_hf_model(variant: str = "poolformer_s12", num_labels: int = 10, seed: int = 0,
                    **config) -> transformers.PoolFormerForImageClassification:
  """An HF PoolFormer whose EVERY parameter is random, so no block is near the identity.

  Norm gains 1 +- 0.2, biases +-0.1, layer scales in [0.1, 1] with random signs, weights
  N(0, 1/fan_in): activations stay O(1) through all blocks.
  """
  cfg = transformers.PoolFormerConfig(**{**SIZES[variant], **config}, num_labels=num_labels,
                                      id2label={i: f"class_{i}" for i in range(num_labels)},
                                      label2id={f"class_{i}": i for i in range(num_labels)})
  model = transformers.PoolFormerForImageClassification(cfg).eval()
  gen = torch.Generator().manual_seed(seed)

  def normal(shape, std, mean=0.0):
    return torch.randn(shape, generator=gen) * std + mean

  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_scale" in name:
        sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
        p.copy_(sign * (0.1 + 0.9 * torch.rand(p.shape, generator=gen)))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(normal(p.shape, 0.2, 1.0))
      elif name.endswith("bias"):
        p.copy_(normal(p.shape, 0.1))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(normal(p.shape, 1.0 / np.sqrt(fan_in)))
  return model


def hf_state(model) -> dict[str, torch.Tensor]:
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def to_release_keys(state: dict) -> dict:
  """HF names -> the release's `patch_embed` / `network.{n}` / `head` names."""
  out = {}
  for k, v in state.items():
    if m := re.fullmatch(r"poolformer\.encoder\.patch_embeddings\.(\d+)\.projection\.(\w+)", k):
      i = int(m[1])
      out["patch_embed.proj." + m[2] if i == 0 else f"network.{2 * i - 1}.proj.{m[2]}"] = v
    elif m := re.fullmatch(r"poolformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)", k):
      sub = {"before_norm": "norm1", "after_norm": "norm2", "output.conv1": "mlp.fc1",
             "output.conv2": "mlp.fc2"}
      rest = m[3]
      for a, b in sub.items():
        rest = re.sub(rf"^{re.escape(a)}\.", b + ".", rest)
      out[f"network.{2 * int(m[1])}.{m[2]}.{rest}"] = v
    elif k.startswith("norm."):
      out[k] = v
    elif k.startswith("classifier."):
      out["head." + k[len("classifier."):]] = v
    else:
      raise KeyError(k)
  return out


def to_timm_keys(state: dict) -> dict:
  """HF names -> timm's `stem` / `stages.{i}` / `head.fc` names."""
  out = {}
  for k, v in state.items():
    if m := re.fullmatch(r"poolformer\.encoder\.patch_embeddings\.(\d+)\.projection\.(\w+)", k):
      i = int(m[1])
      out["stem.conv." + m[2] if i == 0 else f"stages.{i}.downsample.conv.{m[2]}"] = v
    elif m := re.fullmatch(r"poolformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)", k):
      rest = {"layer_scale_1": "layer_scale1.scale", "layer_scale_2": "layer_scale2.scale"}.get(
          m[3], m[3])
      for a, b in {"before_norm": "norm1", "after_norm": "norm2", "output.conv1": "mlp.fc1",
                   "output.conv2": "mlp.fc2"}.items():
        rest = re.sub(rf"^{re.escape(a)}\.", b + ".", rest)
      out[f"stages.{m[1]}.blocks.{m[2]}.{rest}"] = v
    elif k.startswith("norm."):
      out["head.norm." + k[len("norm."):]] = v
    elif k.startswith("classifier."):
      out["head.fc." + k[len("classifier."):]] = v
    else:
      raise KeyError(k)
  return out


def write_layout(model, layout: str, directory: str, *, fmt: str = "safetensors") -> str:
  """Saves `model` in `layout` under `directory`; returns the path to pass to the converter."""
  os.makedirs(directory, exist_ok=True)
  state = hf_state(model)
  if layout == "hf":
    model.save_pretrained(directory)  # config.json + model.safetensors
    if fmt != "safetensors":  # the older HF layout: a pickled pytorch_model.bin instead
      os.remove(os.path.join(directory, "model.safetensors"))
      torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return directory
  state = to_release_keys(state) if layout == "release" else to_timm_keys(state)
  if fmt == "safetensors":
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    path = os.path.join(directory, f"{layout}.safetensors")
    save_file(state, path)
  else:
    path = os.path.join(directory, f"{layout}.pth.tar")
    torch.save({"state_dict": state, "epoch": 300}, path)
  return path


def hf_logits(model, pixels_nchw: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(pixels_nchw)).logits.numpy()


# --------------------------------------------------------------------------- timm (MetaFormer v2)


def import_timm():
  """timm, importable without torchvision.

  timm imports torchvision at import time (`timm.layers` for `FrozenBatchNorm2d`, `timm.data`
  for datasets and transforms), but the registry's torchvision build needs CUDA torch and fails
  to load next to the CPU torch of requirements-torch.txt, so it is not installed. timm's
  MetaFormer models use none of it: a stand-in module provides exactly the names imported at
  import time, as classes that raise if anything ever instantiates them. A real torchvision,
  when present, is used instead.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
    import enum  # pylint: disable=g-import-not-at-top

    class InterpolationMode(enum.Enum):  # torchvision.transforms.functional's, by value
      NEAREST = "nearest"
      NEAREST_EXACT = "nearest-exact"
      BILINEAR = "bilinear"
      BICUBIC = "bicubic"
      BOX = "box"
      HAMMING = "hamming"
      LANCZOS = "lanczos"

    def unavailable(qualname):
      def init(self, *args, **kwargs):
        raise RuntimeError(f"{qualname} is a test stand-in (torchvision is not installed)")
      return type(qualname.rsplit(".", 1)[-1], (), {"__init__": init})

    names = {
        "torchvision": {},
        "torchvision.ops": {},
        "torchvision.ops.misc": {"FrozenBatchNorm2d": None},
        "torchvision.datasets": dict.fromkeys(
            ["CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"]),
        "torchvision.transforms": {"ToTensor": None},
        "torchvision.transforms.functional": {"InterpolationMode": InterpolationMode},
    }
    modules = {}
    for name, attrs in names.items():
      module = types.ModuleType(name)
      module.__path__ = []  # a package, so submodule imports resolve through sys.modules
      for attr, value in attrs.items():
        setattr(module, attr, value if value is not None else unavailable(f"{name}.{attr}"))
      parent, _, child = name.rpartition(".")
      if parent:
        setattr(modules[parent], child, module)
      modules[name] = module
    sys.modules.update(modules)
  import timm  # pylint: disable=g-import-not-at-top
  return timm


def random_mixing_cls(num_tokens: int):
  """RandFormer's token mixer, written from the paper's definition for timm's (NCHW) skeleton.

  `out[:, :, m] = sum_n R[m, n] x[:, :, n]` over the H*W tokens (row-major), with R a frozen
  row-stochastic `softmax(rand(N, N))`. timm has no RandFormer; its MetaFormer takes the mixer
  class per stage (a class, not a partial: it checks `issubclass`).
  """
  class RandomMixing(torch.nn.Module):

    def __init__(self, dim, **kwargs):
      del dim, kwargs
      super().__init__()
      self.random_matrix = torch.nn.Parameter(
          torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1), requires_grad=False)

    def forward(self, x):
      b, c, h, w = x.shape
      x = torch.einsum("mn,bcn->bcm", self.random_matrix, x.reshape(b, c, h * w))
      return x.reshape(b, c, h, w)

  RandomMixing.__name__ = f"RandomMixing{num_tokens}"
  return RandomMixing


def timm_metaformer(name: str, num_classes: int = 1000, tag: str = ""):
  """timm's model for one of our v2 names (IdentityFormer and RandFormer hosted by timm's
  MetaFormer skeleton, as timm has neither). `tag` picks timm's pretrained config (e.g.
  "sail_in1k_384": its preprocessing is what timm's save_for_hf writes)."""
  timm = import_timm()
  from timm.models import metaformer  # pylint: disable=g-import-not-at-top
  family, size = name.split("_")
  if family == "identityformer":
    return timm.create_model(f"poolformerv2_{size}", num_classes=num_classes,
                             token_mixers=torch.nn.Identity)
  if family == "randformer":
    depths = {"s12": (2, 2, 6, 2), "s24": (4, 4, 12, 4)}[size]
    mixers = [torch.nn.Identity, torch.nn.Identity, random_mixing_cls(196),
              random_mixing_cls(49)]
    return metaformer.MetaFormer(depths=depths, dims=(64, 128, 320, 512),
                                 token_mixers=mixers, norm_layers=metaformer.GroupNorm1NoBias,
                                 use_mlp_head=False, num_classes=num_classes)
  return timm.create_model(f"{name}.{tag}" if tag else name, num_classes=num_classes)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Sets EVERY parameter of a MetaFormer to O(1), in place, so no part is near its init.

  Norm gains 1 +- 0.3 and biases +- 0.3; res / layer scales and StarReLU scales in
  +-[0.5, 1.5] (random sign), StarReLU biases in [-0.5, 0.5]; weights N(0, 1/fan_in), which
  keeps activations O(1) through every block; RandFormer's matrices redrawn row-stochastic.
  """
  gen = torch.Generator().manual_seed(seed)

  def uniform(shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen)

  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 2)
      if name.endswith("random_matrix"):
        value = torch.softmax(3 * torch.rand(p.shape, generator=gen), dim=-1)
      elif p.ndim >= 2:
        value = torch.randn(p.shape, generator=gen) / np.sqrt(int(np.prod(p.shape[1:])))
      elif leaf[-1] == "scale" and ("act" in leaf[-2] or "scale" in leaf[-2]):
        sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
        value = sign * uniform(p.shape, 0.5, 1.5)
      elif leaf[-1] == "bias" and "act" in leaf[-2]:
        value = uniform(p.shape, -0.5, 0.5)
      elif leaf[-1] == "weight":  # norm gains
        value = 1.0 + 0.3 * torch.randn(p.shape, generator=gen)
      elif leaf[-1] == "bias":
        value = 0.3 * torch.randn(p.shape, generator=gen)
      else:
        raise KeyError(f"no randomisation rule for {name}")
      p.copy_(value)
  return model


def timm_to_jax(key: str, value: np.ndarray, timm_root: str = "", jax_root: str = ""):
  """(our parameter path, value) of timm's tensor `timm_root + key`, through the converter's
  tables (poolformer_jax.convert.keys), relative to `jax_root`."""
  from poolformer_jax.convert import keys  # pylint: disable=g-import-not-at-top
  canonical, value = keys.from_source(timm_root + key, value, "timm")
  path, entry = keys.lookup(canonical, "canonical")
  assert path.startswith(jax_root), (path, jax_root)
  return path[len(jax_root):], entry.transform.to_jax(value)


def load_timm_state(build, state: dict, timm_root: str = "", jax_root: str = ""):
  """An NNX module built by `build()` (abstractly: no init) holding timm `state`'s values.

  `state` is the state dict of timm's module at `timm_root` (e.g. "stages.2.blocks.0."), whose
  counterpart here is at `jax_root`. Every parameter of ours must come from exactly one timm
  tensor of the right shape, and every timm tensor must land somewhere; all mismatches are
  reported together.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(nnx.eval_shape(build))
  ours = {".".join(map(str, k)): v
          for k, v in nnx.traversals.flatten_mapping(nnx.to_pure_dict(params)).items()}
  filled, errors = {}, []
  for key, tensor in state.items():
    path, value = timm_to_jax(key, tensor.detach().cpu().numpy(), timm_root, jax_root)
    if path not in ours:
      errors.append(f"timm {key} -> {path}: no such parameter")
    elif ours[path].shape != value.shape:
      errors.append(f"timm {key} -> {path}: shape {value.shape}, ours {ours[path].shape}")
    else:
      filled[path] = value
  errors += [f"{path}: not in the timm state" for path in sorted(set(ours) - set(filled))]
  if errors:
    raise KeyError("\n".join(errors))
  pure = nnx.traversals.unflatten_mapping(
      {tuple(int(p) if p.isdigit() else p for p in k.split(".")): jnp.asarray(v)
       for k, v in filled.items()})
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params)


# timm key -> the MetaFormer-baselines release's key, applied in order, first match only. Written
# from the release's module names (metaformer_baselines.py: downsample_layers, stages.{s}.{j},
# norm, head), independently of poolformer_jax.convert; tests check it against timm's own
# checkpoint_filter_fn.
TIMM_TO_RELEASE = (
    (r"^stem\.conv\.", "downsample_layers.0.conv."),
    (r"^stem\.norm\.", "downsample_layers.0.post_norm."),
    (r"^stages\.(\d+)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm."),
    (r"^stages\.(\d+)\.downsample\.conv\.", r"downsample_layers.\1.conv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),  # the MLP head's fc1 / norm / fc2, or the linear head
)


def timm_to_release(state: dict) -> dict:
  """A timm MetaFormer state dict in the release's layout: release names, and every 1x1 conv
  weight (timm's dense layers in channels-first stages) as the release's (out, in) Linear."""
  out = {}
  for key, value in state.items():
    for pattern, replacement in TIMM_TO_RELEASE:
      new, n = re.subn(pattern, replacement, key)
      if n:
        break
    else:
      raise KeyError(f"no release name for timm's {key}")
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    out[new] = value.clone().contiguous()
  return out


# --------------------------------------------------------------------------- logits vs ours


@contextlib.contextmanager
def head_norm_eps(model, eps):
  """A timm reference's MLP-head LayerNorm eps set to ours for a comparison, then restored
  (ours keeps the release's 1e-5, timm uses 1e-6); other models pass through."""
  norm = getattr(getattr(getattr(model, "head", None), "fc", None), "norm", None)
  old = getattr(norm, "eps", None)
  if norm is not None:
    norm.eps = eps
  try:
    yield model
  finally:
    if norm is not None:
      norm.eps = old


@functools.cache
def _jax_forward():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.jit(lambda model, x: model(x))


def max_logit_diff(model, preprocessing, ref, images, *, min_std: float = 0.5) -> float:
  """Max |logit difference| of our `model` and the PyTorch `ref` (timm's or transformers') on
  `images`, both given the same pixels (our `preprocess` with `preprocessing`), float32 at the
  highest matmul precision. The reference's logits must not be degenerate (std > min_std)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from poolformer_jax import inference  # pylint: disable=g-import-not-at-top
  pixels = inference.preprocess(images, preprocessing)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(_jax_forward()(model, jnp.asarray(pixels)))
  with torch.no_grad(), head_norm_eps(ref, model.cfg.head_norm_eps):
    out = ref(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))))
  want = (out.logits if hasattr(out, "logits") else out).numpy()
  assert want.std() > min_std  # non-degenerate logits
  return float(np.abs(ours - want).max())
