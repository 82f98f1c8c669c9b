"""Saving and loading ready-to-use models: `config.json` + an Orbax checkpoint of the params.

Layout of a pretrained directory:
  config.json   {"format", "variant", "num_classes", "labels", "preprocessing", "model",
                 "fingerprints"}
  params/       Orbax StandardCheckpointer checkpoint of nnx.state(model, nnx.Param) as a
                plain nested dict.
A training workdir (WORKDIR/config.json + WORKDIR/checkpoints/, see poolformer_jax.train) loads
the same way: `load_params(WORKDIR)` takes its newest verified checkpoint.
Writes are atomic: everything goes to a temporary sibling directory that is renamed into
place at the end, so a crash never leaves a half-written directory under the final name.
Reads are verified: every array's fingerprint is saved in config.json and checked when it is
restored (as for training checkpoints: Orbax restores an altered byte silently), so a damaged
directory is an error naming the array, never wrong weights. Released checkpoints by name
(download, convert, cache) are `poolformer_jax.hub`'s. No torch, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import shutil
import uuid
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath  # An Orbax dependency: local and gs:// paths alike.
from flax import nnx

from poolformer_jax import checkpointing
from poolformer_jax.errors import CheckpointError
from poolformer_jax.model import MetaFormer, MetaFormerConfig, get_config

FORMAT = "poolformer_jax.pretrained/1"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"  # In a training workdir.

# ImageNet-1k, which every released model was trained on: normalisation (0..1 pixel scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Class-name files shipped in the package (WordNet id, tab, names), by head size.
_LABEL_FILES = {1000: "imagenet_classes.txt", 21841: "imagenet21k_classes.txt"}


@functools.cache
def _label_rows(num_classes: int) -> tuple[tuple[str, str], ...] | None:
  if num_classes not in _LABEL_FILES:
    return None
  text = importlib.resources.files("poolformer_jax").joinpath(_LABEL_FILES[num_classes]).read_text()
  return tuple(tuple(line.split("\t", 1)) for line in text.splitlines()
               if line and not line.startswith("#"))


def imagenet_labels(num_classes: int = 1000) -> tuple[str, ...] | None:
  """The class names of an ImageNet-1k (1000) or ImageNet-21k (21841) head in index order
  ('tench', 'goldfish', ...: each class's first name); None for any other number of classes."""
  rows = _label_rows(num_classes)
  return None if rows is None else tuple(names.split(",")[0] for _, names in rows)


def imagenet_wnids(num_classes: int = 1000) -> tuple[str, ...] | None:
  """The WordNet ids of the same classes ('n01440764', ...): the folder names of ImageNet's
  class-per-folder validation layout."""
  rows = _label_rows(num_classes)
  return None if rows is None else tuple(wnid for wnid, _ in rows)


def default_preprocessing(crop_pct: float = 0.9, input_size: int = 224) -> dict:
  """The release's eval transform: resize short side to floor(size / crop_pct), center crop."""
  return {"input_size": input_size, "crop_pct": crop_pct, "interpolation": "bicubic",
          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
  """What a user needs besides the weights: the classes and the eval preprocessing."""

  variant: str
  num_classes: int
  labels: tuple[str, ...] | None = None
  preprocessing: Mapping[str, Any] = dataclasses.field(default_factory=default_preprocessing)


def atomic_directory(directory: str, write: Callable[[str], None], *,
                     overwrite: bool = False) -> str:
  """Calls `write(tmp)` on a fresh temporary sibling, then renames it to `directory`.

  An existing `directory` is refused unless `overwrite`; then it is replaced only after the
  new one is complete. Returns the absolute path.
  """
  directory = os.path.abspath(directory)
  if os.path.lexists(directory) and not overwrite:
    raise CheckpointError(f"{directory} already exists; choose another output or pass "
                          "--overwrite (overwrite=True) to replace it")
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = os.path.join(parent, f".{name}.tmp-{tag}")
  os.makedirs(tmp)
  try:
    write(tmp)
    if os.path.lexists(directory):
      old = os.path.join(parent, f".{name}.old-{tag}")
      os.rename(directory, old)
      os.rename(tmp, directory)
      if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.remove(old)
    else:
      os.rename(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return directory


def _config_to_json(cfg: MetaFormerConfig) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _config_from_json(d: Mapping) -> MetaFormerConfig:
  fields = {f.name for f in dataclasses.fields(MetaFormerConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise CheckpointError(f"unknown model config field(s) {unknown}; was this saved by a newer "
                          "poolformer_jax?")
  return MetaFormerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def write_config(directory: str, cfg: MetaFormerConfig, *, variant: str,
                 labels: list[str] | tuple[str, ...] | None = None,
                 preprocessing: Mapping[str, Any] | None = None,
                 fingerprints: Mapping[str, int] | None = None) -> None:
  """Writes DIRECTORY/config.json: the architecture, classes, eval preprocessing and (for a
  `params/` directory) the fingerprint of every array.

  Also written into a training workdir, which `load_params` then reads like a converted model.
  """
  pre = default_preprocessing(cfg.crop_pct)
  pre.update(preprocessing or {})
  config = {
      "format": FORMAT,
      "variant": variant,
      "num_classes": cfg.num_classes,
      "labels": list(labels) if labels is not None else None,
      "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()},
      "model": _config_to_json(cfg),
  }
  if fingerprints is not None:
    config["fingerprints"] = dict(fingerprints)
  (epath.Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def save_pretrained(directory: str, model: MetaFormer, *, variant: str,
                    labels: list[str] | tuple[str, ...] | None = None,
                    preprocessing: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> str:
  """Writes `model` so that `load_pretrained(directory)` rebuilds it; returns the path."""
  cfg = model.cfg
  if model.features_only:
    raise ValueError("save_pretrained saves classifiers; this model was built features_only")
  if labels is not None and len(labels) != cfg.num_classes:
    raise ValueError(f"{len(labels)} labels for a model with {cfg.num_classes} classes")
  # Orbax needs host or jax arrays; plain numpy keeps the checkpoint device-agnostic.
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def write(tmp):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    # config.json last: a directory with it is complete (the rename makes that moot anyway).
    write_config(tmp, cfg, variant=variant, labels=labels, preprocessing=preprocessing,
                 fingerprints=checkpointing.flat_fingerprints({PARAMS_DIR: params}))

  return atomic_directory(directory, write, overwrite=overwrite)


def read_config(directory: str) -> dict:
  """DIRECTORY/config.json, checked to be ours."""
  path = epath.Path(directory) / CONFIG_FILE
  if not epath.Path(directory).is_dir():
    raise CheckpointError(f"{directory} is not a directory; pass a directory written by "
                          "convert_torch_weights.py, save_pretrained or the trainer")
  if not path.is_file():
    raise CheckpointError(f"{directory} has no {CONFIG_FILE}; it was not written by "
                          "save_pretrained or the trainer (or the write did not finish)")
  try:
    config = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(config, dict) or config.get("format") != FORMAT:
    got = config.get("format") if isinstance(config, dict) else type(config).__name__
    raise CheckpointError(f"{path} has format {got!r}, expected {FORMAT!r}")
  return config


def read_info(directory: str) -> tuple[PretrainedInfo, MetaFormerConfig]:
  """Reads config.json only (no weights)."""
  return _parse_info(read_config(directory))


def _parse_info(config: dict) -> tuple[PretrainedInfo, MetaFormerConfig]:
  cfg = (_config_from_json(config["model"]) if "model" in config else
         get_config(config["variant"], num_classes=config["num_classes"]))
  labels = config.get("labels")
  info = PretrainedInfo(variant=config["variant"], num_classes=int(config["num_classes"]),
                        labels=tuple(labels) if labels is not None else None,
                        preprocessing=dict(config["preprocessing"]))
  return info, cfg


def abstract_params(cfg: MetaFormerConfig) -> dict:
  """The parameter tree of `cfg` as shapes on one device: the target to restore a checkpoint into."""
  abstract = nnx.eval_shape(lambda: MetaFormer(cfg, rngs=nnx.Rngs(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def load_params(directory: str) -> tuple[dict, PretrainedInfo, MetaFormerConfig]:
  """(parameters as a nested dict of numpy arrays, info, architecture) from either

  * a pretrained directory (`params/`, written by the converter or `save_pretrained`), or
  * a training workdir (`checkpoints/`): its newest checkpoint that passes verification.
  """
  config = read_config(directory)
  info, cfg = _parse_info(config)
  target = abstract_params(cfg)
  root = epath.Path(checkpointing.orbax_path(directory))
  if (root / PARAMS_DIR).is_dir():
    params = _restore_verified(root, target, config.get("fingerprints"))
  elif (root / CHECKPOINTS_DIR).is_dir():
    ckpt = checkpointing.Checkpointer(str(root / CHECKPOINTS_DIR), async_save=False,
                                      read_only=True)
    restored = ckpt.restore_latest({"params": target})
    ckpt.close()
    if restored is None:
      raise CheckpointError(f"{directory} is a training workdir without any checkpoint yet")
    params = restored[0]["params"]
  else:
    raise CheckpointError(f"{directory} has neither {PARAMS_DIR}/ (a converted model) nor "
                          f"{CHECKPOINTS_DIR}/ (a training workdir)")
  return jax.tree.map(np.asarray, params), info, cfg


def _restore_verified(root: epath.Path, target: dict, expected: dict | None) -> dict:
  """DIRECTORY/params restored into `target` and checked against the `expected` fingerprints
  of config.json (directories written before fingerprints were saved are restored unchecked)."""
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(root / PARAMS_DIR, target)
  except Exception as e:  # Orbax/TensorStore raise many types; all mean "unreadable".
    raise CheckpointError(f"{root / PARAMS_DIR} cannot be read: {checkpointing.summarise(e)}; "
                          "the directory is damaged: convert or save it again") from e
  bad = expected and checkpointing.first_mismatch(expected, {PARAMS_DIR: params})
  if bad:
    raise CheckpointError(f"{root} is corrupt: array '{bad.split('/', 1)[1]}' in {PARAMS_DIR}/ "
                          "does not match the fingerprint saved with it (a file was altered or "
                          "damaged after saving): convert or save it again")
  return params


def build_model(params: dict, cfg: MetaFormerConfig, *, rngs: nnx.Rngs | None = None,
                features_only: bool = False, **module_kwargs) -> MetaFormer:
  """The model of `cfg` holding `params` (a plain nested dict as `load_params` returns it),
  built without initialising anything; `module_kwargs` are MetaFormer's (dtype, remat). `rngs`
  only seeds variables that are not in `params` (none of the released models have any)."""
  abstract = nnx.eval_shape(
      lambda r: MetaFormer(cfg, features_only=features_only, rngs=r, **module_kwargs),
      rngs if rngs is not None else nnx.Rngs(0))
  graphdef, state = nnx.split(abstract)
  if features_only:  # The classifier's tensors have no place in a feature extractor.
    params = {k: v for k, v in params.items() if k in nnx.to_pure_dict(state)}
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
