"""PoolFormer (MetaFormer) in JAX / Flax NNX."""

from poolformer_jax.hub import create_model, list_pretrained, load_pretrained
from poolformer_jax.inference import predict, preprocess
from poolformer_jax.model import (
    VARIANTS,
    MetaFormer,
    MetaFormerConfig,
    count_params,
    get_config,
    list_models,
)

__all__ = [
    "VARIANTS",
    "MetaFormer",
    "MetaFormerConfig",
    "count_params",
    "create_model",
    "get_config",
    "list_models",
    "list_pretrained",
    "load_pretrained",
    "predict",
    "preprocess",
]
