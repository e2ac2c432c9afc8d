"""Process-wide JAX settings that every entry point wants: XLA:CPU flags and the persistent compilation cache.

XLA:CPU flags (`XLA_CPU_DEFAULTS`, applied by `import fusion_jax` through `apply_xla_cpu_defaults`): jaxlib 0.10
hands every lone dot and convolution to YNNPACK, which on the UNet's shapes is slower than XLA's own Eigen
kernels; keeping YNNPACK for the fusions it forms (dot + elementwise) and not for lone dots / convolutions made
the `mid` UNet forward about 1.15x faster on 2 cores (`python benchmarks/unet.py --configs mid`, docs/DESIGN.md
section 9). XLA reads `XLA_FLAGS` once, when the first backend starts, so the flags are added to the environment
only while no backend is up, and never over a value the user set for the same flag; `FUSION_JAX_XLA_DEFAULTS=0`
turns them off. They only concern the CPU backend (on a GPU machine, the host's small computations).

Compiling the sampler or the train step is the slowest part of a short run; JAX's persistent cache keeps the
compiled executables on disk so a second run with the same shapes starts in seconds (docs/DESIGN.md section 9:
9.5 s cold vs 2.4 s warm). On by default; `FUSION_JAX_COMPILATION_CACHE=0` turns it off and any other value
names the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

XLA_CPU_DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_dot,-individual_convolution",
}


def apply_xla_cpu_defaults() -> list[str]:
    """Add `XLA_CPU_DEFAULTS` to `XLA_FLAGS` (each flag the user did not set); returns the flags added.

    Adds nothing once a JAX backend has started (XLA has read its flags by then) or with
    `FUSION_JAX_XLA_DEFAULTS=0`.
    """
    from jax._src import xla_bridge

    if os.environ.get("FUSION_JAX_XLA_DEFAULTS", "") == "0" or xla_bridge.backends_are_initialized():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in XLA_CPU_DEFAULTS.items() if f"--{name}" not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


DEFAULT_CACHE_DIR = Path("~/.cache/fusion_jax/jax_compilation_cache").expanduser()
_enabled = False


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (idempotent); returns the folder, or None when disabled."""
    global _enabled
    setting = os.environ.get("FUSION_JAX_COMPILATION_CACHE", "")
    if setting == "0":
        return None
    if jax.config.jax_compilation_cache_dir and path is None:  # already configured (e.g. by the test harness)
        _enabled = True
        return Path(jax.config.jax_compilation_cache_dir)
    folder = Path(path or setting or DEFAULT_CACHE_DIR).expanduser()
    if not _enabled or path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        _enabled = True
    return folder
