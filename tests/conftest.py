"""Test-session setup: 8 fake CPU devices (for sharding tests) and JAX's persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives at the top of conftest.
"""

import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "fusion_jax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
