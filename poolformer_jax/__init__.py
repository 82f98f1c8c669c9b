"""PoolFormer (MetaFormer) in JAX / Flax NNX.

The names below are imported on first use (PEP 562), so that `main.py` and the light modules
(`cpu_tuning`, `multihost`, `errors`) start without importing JAX: every entry point re-executes
itself once before JAX starts, and a multi-process run keeps a small supervising parent.
"""

import importlib

_EXPORTS = {
    "create_model": "hub",
    "list_pretrained": "hub",
    "load_pretrained": "hub",
    "predict": "inference",
    "preprocess": "inference",
    "VARIANTS": "model",
    "MetaFormer": "model",
    "MetaFormerConfig": "model",
    "count_params": "model",
    "get_config": "model",
    "list_models": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'poolformer_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"poolformer_jax.{_EXPORTS[name]}"), name)
  globals()[name] = value  # Looked up once.
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
