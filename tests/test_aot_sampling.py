"""Ahead-of-time compiled sampler (`sampling.compile_generate`) with the persistent compilation cache.

Two fresh processes (tests/aot_sampling_worker.py) share one empty cache folder. The first compiles (a miss: the
folder gains the executable) and its compiled generator gives the same image as `generate`; the second, with the
same shapes, gets its executable from the folder (jax's cache-hit event: `from_cache`) and writes nothing new (the
folder's files are the same), and draws the same image. XLA runs at its lowest optimisation level here to keep
the two compiles short on CI's CPU; the cache logic does not depend on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run_worker(out: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("FUSION_JAX_COMPILATION_CACHE", None)
    env.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # cache every executable, however fast
                "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip(),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    proc = subprocess.run([sys.executable, "-m", "tests.aot_sampling_worker", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_compiled_generator_matches_generate_and_second_process_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    first = _run_worker(tmp_path / "first.npz", cache)
    files = sorted(p.name for p in cache.iterdir())
    assert not bool(first["from_cache"])
    assert any(name.startswith("jit_run-") for name in files), files  # the sampler's executable was written
    np.testing.assert_array_equal(first["aot"], first["generate"])  # the compiled generator is generate's program
    assert first["aot"].shape == (1, 16, 16, 3) and first["aot"].dtype == np.uint8
    assert "differ from the compiled shapes" in str(first["mismatch"])

    second = _run_worker(tmp_path / "second.npz", cache)
    assert bool(second["from_cache"])  # jax reported a persistent-cache hit for the compile
    assert sorted(p.name for p in cache.iterdir()) == files  # nothing was compiled anew and written
    np.testing.assert_array_equal(second["aot"], first["aot"])
    np.testing.assert_array_equal(second["generate"], first["aot"])
