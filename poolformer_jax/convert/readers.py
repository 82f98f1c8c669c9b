"""Reading PyTorch checkpoints: .pth / .pth.tar / .bin / .safetensors files and model directories
(transformers' PoolFormer, or timm's HF-hub layout: config.json with "architecture" and
"pretrained_cfg").

`.safetensors` is read without torch; pickled files only through torch's weights-only
unpickler, so a downloaded checkpoint cannot run code. Every failure is a ConversionError that
names the file and says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping

import numpy as np

from poolformer_jax import pretrained
from poolformer_jax.errors import ConversionError
from poolformer_jax.model import VARIANTS

_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
_TORCH_HINT = ("reading .pth/.pth.tar/.bin files needs PyTorch (pip install torch; the CPU "
               "build is enough), or convert the file to .safetensors")


@dataclasses.dataclass
class Source:
  """What was read: tensors by source name, plus the metadata a config.json gives.

  `name` is the file's name, or the directory's for a model directory: release files say
  what the tensors cannot (`identityformer_s12.pth` vs `poolformerv2_s12.pth`, `_384`).
  """

  path: str
  tensors: dict[str, np.ndarray]
  hf_config: dict | None = None  # transformers' config.json
  hf_preprocessor: dict | None = None
  timm_config: dict | None = None  # timm's config.json (HF-hub layout)
  name: str = ""


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


# What torch.save writes: a zip archive (PyTorch >= 1.6), or before that a pickle (protocol 2:
# PROTO opcode 0x80). Anything else is not a PyTorch checkpoint at all.
_TORCH_HEADS = {b"PK\x03\x04": "a zip archive", b"\x80": "a pickle"}


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """Torch's weights-only unpickler: plain tensors and containers, never arbitrary code."""
  with open(path, "rb") as f:
    head = f.read(8)
  kind = next((k for magic, k in _TORCH_HEADS.items() if head.startswith(magic)), None)
  if kind is None:
    raise ConversionError(
        f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (before PyTorch "
        f"1.6, a pickle), and this file is neither (it starts with {head!r}). Pass a "
        ".pth/.pth.tar/.bin state dict, a .safetensors file or a model directory")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f"cannot read {path}: {_TORCH_HINT}") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch raises RuntimeError (bad zip), UnpicklingError (a damaged pickle, or a global the
    # weights-only unpickler refuses), EOFError (truncated legacy pickle), KeyError (garbage).
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
      raise ConversionError(
          f"refused to load {path}: it contains a pickled {refused[1]}, which would run code "
          "on this machine. Only plain state dicts of tensors are loaded (torch weights-only "
          "unpickler); re-save the checkpoint as a state dict or as .safetensors from a "
          "trusted environment") from None
    # torch's own text for a damaged file advises loading it with weights_only=False, which
    # runs whatever code the file holds: it is not passed on.
    msg = (text.strip().splitlines()[0] if text.strip() and "weights_only" not in text else
           "torch's weights-only reader cannot parse it")
    raise ConversionError(
        f"{path} starts like a PyTorch checkpoint ({kind}) but cannot be read ({type(e).__name__}:"
        f" {msg}): it is truncated or damaged. Download it again") from None
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
  tensors = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):  # Anything else (e.g. a step count) is not a weight.
      v = v.detach().cpu()
      if v.dtype in (torch.bfloat16, torch.float16):
        v = v.float()
      tensors[str(k)] = v.numpy()
  if not tensors:
    raise ConversionError(f"{path} holds no tensors (keys: {sorted(map(str, obj))[:10]})")
  return tensors


def read_source(path: str) -> Source:
  """Reads a file (.pth, .pth.tar, .bin, .safetensors) or a model directory (transformers' or
  timm's HF-hub layout: config.json + model.safetensors or pytorch_model.bin)."""
  if not os.path.exists(path):
    raise ConversionError(f"{path} does not exist")
  config = preproc = None
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise ConversionError(f"{path} is a directory without config.json; pass a model "
                            "directory as downloaded from the HF hub (config.json + "
                            "model.safetensors or pytorch_model.bin) or a checkpoint file")
    weights = (os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin"))
    file = next(filter(os.path.isfile, weights), None)  # safetensors first: no torch, no pickle.
  else:
    file = path
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    hf_file = os.path.basename(path) in ("model.safetensors", "pytorch_model.bin")
    cfg_path = sibling if hf_file and os.path.isfile(sibling) else None
  timm_config = None
  if cfg_path:
    config = _read_json(cfg_path)
    if config.get("format") == pretrained.FORMAT:
      raise ConversionError(f"{path} is already a converted poolformer_jax directory; to export "
                            "it back to PyTorch pass --to-hf (PoolFormer v1, transformers) or "
                            "--to-timm (timm)")
    if "architecture" in config and config.get("model_type") in (None, "timm_wrapper"):
      timm_config, config = config, None  # timm's HF-hub layout
      _check_timm_architecture(timm_config, cfg_path)
    else:
      model_type = config.get("model_type")
      if model_type != "poolformer":
        raise ConversionError(f"{cfg_path} describes a {model_type!r} model, not a PoolFormer "
                              "(model_type 'poolformer') or a timm MetaFormer ('architecture')")
      pp = os.path.join(os.path.dirname(cfg_path), "preprocessor_config.json")
      preproc = _read_json(pp) if os.path.isfile(pp) else None
  if file is None:
    raise ConversionError(f"{path} has config.json but neither model.safetensors nor "
                          "pytorch_model.bin")
  if file.endswith(".safetensors"):
    tensors = _read_safetensors(file)
  elif os.path.getsize(file) < 8:
    raise ConversionError(f"{file} is empty or truncated ({os.path.getsize(file)} bytes)")
  else:
    tensors = _read_torch(file)
  if all(k.startswith("module.") for k in tensors):  # Saved from DistributedDataParallel.
    tensors = {k[len("module."):]: v for k, v in tensors.items()}
  named = os.path.dirname(os.path.abspath(file)) if cfg_path else file
  return Source(path=path, tensors=tensors, hf_config=config, hf_preprocessor=preproc,
                timm_config=timm_config, name=os.path.basename(named))


def _check_timm_architecture(config: dict, cfg_path: str) -> None:
  """timm's config.json must name one of the models this package has."""
  arch = config.get("architecture")
  if arch not in VARIANTS:
    raise ConversionError(
        f"{cfg_path} describes timm's {arch!r}, not one of this package's models "
        f"({', '.join(sorted(VARIANTS))})")
  pre = config.get("pretrained_cfg") or {}
  size = pre.get("input_size")
  if size is not None and (len(size) != 3 or size[1] != size[2]):
    raise ConversionError(f"{cfg_path}: pretrained_cfg.input_size {size} is not a square "
                          "(channels, size, size) input")

