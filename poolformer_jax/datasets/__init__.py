"""TFDS builders shipped with poolformer_jax (importing this registers them with TFDS)."""

from poolformer_jax.datasets.digits import Digits

__all__ = ["Digits"]
