"""PoolFormer (MetaFormer) in JAX / Flax NNX."""

from poolformer_jax.inference import predict, preprocess
from poolformer_jax.model import (
    VARIANTS,
    MetaFormer,
    MetaFormerConfig,
    count_params,
    create_model,
    get_config,
    list_models,
)
from poolformer_jax.pretrained import load_pretrained

__all__ = [
    "VARIANTS",
    "MetaFormer",
    "MetaFormerConfig",
    "count_params",
    "create_model",
    "get_config",
    "list_models",
    "load_pretrained",
    "predict",
    "preprocess",
]
