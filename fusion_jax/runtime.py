"""Process-wide JAX settings that every entry point wants: the persistent compilation cache (the XLA:CPU flag
defaults are `fusion_jax.xla_defaults`, applied by `import fusion_jax` before any backend starts).

Compiling the sampler or the train step is the slowest part of a short run; JAX's persistent cache keeps the
compiled executables on disk so a second run with the same shapes starts in seconds (docs/DESIGN.md section 9:
9.5 s cold vs 2.4 s warm). On by default; `FUSION_JAX_COMPILATION_CACHE=0` turns it off and any other value
names the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

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
