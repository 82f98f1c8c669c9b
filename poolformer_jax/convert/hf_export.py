"""JAX -> PyTorch: a model's parameters as a state dict in any layout, and an HF transformers
directory (model.safetensors + config.json + preprocessor_config.json) that
`PoolFormerForImageClassification.from_pretrained` loads; converting it back is bit-exact.
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
from poolformer_jax.model import MetaFormer, MetaFormerConfig
from poolformer_jax.pretrained import PretrainedInfo


def default_labels(num: int) -> tuple[str, ...]:
  """HF's names for unnamed classes."""
  return tuple(f"LABEL_{i}" for i in range(num))


def to_torch_state(model: MetaFormer, layout: str = "hf") -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch state dict of numpy arrays in `layout`'s names."""
  if model.cfg.token_mixer != "pooling" or model.features_only:
    raise ConversionError("only the PoolFormer classifier (token_mixer='pooling', with head) "
                          "has a PyTorch counterpart to export to")
  out = {}
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    canon, entry = keys.lookup(jax.tree_util.keystr(path, simple=True, separator="."), "jax")
    out[keys.source_key(canon, layout)] = np.ascontiguousarray(
        entry.transform.to_torch(np.asarray(value)))
  return out


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

