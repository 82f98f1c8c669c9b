"""JAX -> PyTorch: a model's parameters as a state dict in any layout, a transformers directory
(model.safetensors + config.json + preprocessor_config.json) that
`PoolFormerForImageClassification.from_pretrained` loads (PoolFormer v1), and a timm directory
in the HF-hub layout (model.safetensors + config.json) that `timm.create_model("local-dir:DIR",
pretrained=True)` loads (PoolFormerV2, ConvFormer, CAFormer). Converting either back is
bit-exact.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from poolformer_jax import pretrained
from poolformer_jax.convert import keys
from poolformer_jax.errors import ConversionError
from poolformer_jax.model import VARIANTS, MetaFormer, MetaFormerConfig
from poolformer_jax.pretrained import PretrainedInfo

# The families timm implements as the MetaFormer-baselines release does (timm's names are ours).
# timm's PoolFormer v1 is left out on purpose: it normalises the final map after pooling, not
# before as the release (and transformers) do, so it computes another function of the weights.
TIMM_FAMILIES = ("poolformerv2", "convformer", "caformer")
_ARCHITECTURE_FIELDS = ("depths", "widths", "token_mixer", "mixer_size", "head_dim", "mlp_ratio",
                        "in_channels", "version", "norm", "head", "res_scale_init",
                        "layer_scale_init")


def default_labels(num: int) -> tuple[str, ...]:
  """HF's names for unnamed classes."""
  return tuple(f"LABEL_{i}" for i in range(num))


def canonical_state(model: MetaFormer) -> dict[str, np.ndarray]:
  """The model's parameters under canonical names, as PyTorch tensors (dense weights (out, in))."""
  if model.features_only:
    raise ConversionError("only classifiers (built without features_only) can be exported")
  out = {}
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    canon, entry = keys.lookup(jax.tree_util.keystr(path, simple=True, separator="."), "jax")
    out[canon] = np.ascontiguousarray(entry.transform.to_torch(np.asarray(value)))
  return out


def to_torch_state(model: MetaFormer, layout: str = "hf") -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch state dict of numpy arrays in `layout`'s names and
  shapes."""
  cfg = model.cfg
  if cfg.version not in keys.LAYOUT_VERSIONS[layout]:
    fits = [name for name, versions in keys.LAYOUT_VERSIONS.items() if cfg.version in versions]
    raise ConversionError(f"the {layout} layout holds no version-{cfg.version} models; this "
                          f"model's layouts: {', '.join(fits)}")
  if cfg.version == 1 and cfg.token_mixer != "pooling":
    raise ConversionError("only the PoolFormer v1 classifier (token_mixer='pooling') has a "
                          "PyTorch counterpart to export to")
  return {k: np.ascontiguousarray(v) for k, v in
          (keys.to_source(c, v, layout, cfg.stage_token_mixers)
           for c, v in canonical_state(model).items())}


def hf_config_dict(cfg: MetaFormerConfig, labels: tuple[str, ...] | None) -> dict:
  """The fields of transformers.PoolFormerConfig for this model (no transformers needed)."""
  labels = tuple(labels) if labels else default_labels(cfg.num_classes)
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


def require_transformers(cfg: MetaFormerConfig, variant: str) -> None:
  """transformers has PoolFormer v1 only; a ConversionError says where else to go."""
  if cfg.version != 1:
    raise ConversionError(
        f"transformers has PoolFormer v1 only, and {variant} is one of the MetaFormer "
        "baselines (version 2): export it to timm's layout with --to-timm instead")


def export_hf_safetensors(model: MetaFormer, info: PretrainedInfo, directory: str, *,
                          overwrite: bool = False) -> str:
  """Writes a transformers directory (model.safetensors + config.json + preprocessor_config.json).

  `PoolFormerForImageClassification.from_pretrained(directory)` loads it; converting it back
  gives bit-identical parameters. Written atomically like `save_pretrained`. PoolFormer v1
  only: transformers has none of the MetaFormer baselines (use `export_timm`).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  require_transformers(model.cfg, info.variant)
  state = to_torch_state(model, "hf")

  def write(tmp):
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_dict(model.cfg, info.labels), f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump(hf_preprocessor_dict(info.preprocessing), f, indent=2)

  return pretrained.atomic_directory(directory, write, overwrite=overwrite)


def timm_architecture(cfg: MetaFormerConfig, variant: str) -> str:
  """timm's model name for this model; a ConversionError says why when timm has none."""
  family = variant.split("_")[0]
  if family not in TIMM_FAMILIES:
    why = ("timm's poolformer_* normalises the final map after pooling, where the release "
           "normalises it before: another function of the same weights. Export PoolFormer v1 "
           "with --to-hf" if family == "poolformer" else
           f"timm has no {family} (only the release's .pth layout exists for it)")
    raise ConversionError(f"cannot export {variant} to timm: {why}")
  want = VARIANTS[variant]
  diff = [f for f in _ARCHITECTURE_FIELDS if getattr(want, f) != getattr(cfg, f)]
  if diff:
    raise ConversionError(
        f"cannot export to timm: this model is not timm's {variant} (it differs in "
        f"{', '.join(diff)}), so timm.create_model('{variant}') could not hold its weights")
  return variant


def timm_config_dict(cfg: MetaFormerConfig, info: PretrainedInfo) -> dict:
  """timm's config.json (HF-hub layout) for this model: architecture, classes, preprocessing."""
  pre = info.preprocessing
  size = int(pre.get("input_size", 224))
  config = {
      "architecture": timm_architecture(cfg, info.variant),
      "num_classes": cfg.num_classes,
      "num_features": cfg.widths[-1],
      "global_pool": "avg",
      "pretrained_cfg": {
          "input_size": [cfg.in_channels, size, size],
          "fixed_input_size": False,
          "interpolation": pre.get("interpolation", "bicubic"),
          "crop_pct": pre["crop_pct"],
          "crop_mode": "center",
          "mean": list(pre["mean"]),
          "std": list(pre["std"]),
          "num_classes": cfg.num_classes,
          "pool_size": [size // 32, size // 32],
          "first_conv": "stem.conv",
          "classifier": "head.fc.fc2" if cfg.head == "mlp" else "head.fc",
      },
  }
  default = pretrained.imagenet_labels(cfg.num_classes)
  if info.labels is not None and tuple(info.labels) != default:
    config["label_names"] = list(info.labels)
  return config


def export_timm(model: MetaFormer, info: PretrainedInfo, directory: str, *,
                overwrite: bool = False) -> str:
  """Writes a timm directory in the HF-hub layout (model.safetensors + config.json).

  `timm.create_model(f"local-dir:{directory}", pretrained=True)` loads it (the MLP head's
  LayerNorm then runs with timm's eps 1e-6, not the release's 1e-5); converting it back gives
  bit-identical parameters. Written atomically.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  config = timm_config_dict(model.cfg, info)
  state = to_torch_state(model, "timm")

  def write(tmp):
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)

  return pretrained.atomic_directory(directory, write, overwrite=overwrite)
