"""Test-wide environment. Runs before any test module imports jax, torch or transformers."""

import os

# 8 fake CPU devices so sharding is exercised on a laptop; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Nothing may wait on the network: the HF hub is never contacted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
