"""Test helpers: random HF PoolFormer models written in each PyTorch checkpoint layout.

The key renames here are written out independently of poolformer_jax.convert (from the
layouts documented in the release code, HF and timm), so a bug in the converter's tables
cannot cancel out in a test.
"""

from __future__ import annotations

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
