"""Test setup: 8 simulated CPU devices, offline Hugging Face, temp HF cache."""

import os
import tempfile

# Compile at XLA:CPU optimisation level 0: tests need correct numerics, not fast kernels,
# and compiling dominates their time on 2 cores.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="jaxtrain-hf-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXTRAIN_CACHE", tempfile.mkdtemp(prefix="jaxtrain-cache-"))

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 CPU devices: import jax only after conftest"
