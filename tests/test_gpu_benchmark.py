"""benchmarks/gpu.py runs end to end on CPU at --size tiny and writes its figures as JSON.

A smoke test of the accelerator benchmark's code paths (its numbers on a CPU mean nothing): the text-to-image
section (one CFG step at batch 1, whole generations at batch 16 through the ahead-of-time compiled sampler) and
the diffusers comparison's skip (torch sees no CUDA device here). Every figure must be present, finite and
positive; the ones a CPU has no figure for (peak FLOPs, device memory statistics) must be None ('n/a' in the
table). The identity and train sections share the sampler / trainer calls but cost a compile per row (about 15 s
per identity method, 2-3 min per train row on a loaded 2-core CPU), so CI leaves them out:
`python benchmarks/gpu.py --size tiny --steps 1 --repeats 1 --train-steps 1 --torch cpu` runs every row (30 min
there). XLA runs at its lowest optimisation level to keep the compiles short.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _positive(value, name):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
    assert math.isfinite(value) and value > 0, (name, value)


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "FUSION_JAX_COMPILATION_CACHE": "0",
                "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()})
    cmd = [sys.executable, "benchmarks/gpu.py", "--size", "tiny", "--steps", "1", "--repeats", "1",
           "--sections", "t2i,torch", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ms per CFG step" in proc.stdout and "comparison skipped" in proc.stdout
    data = json.loads(out.read_text())

    assert data["size"] == "tiny" and data["backend"] == "cpu"
    assert data["compute_dtype"] == "float32"  # auto on CPU
    assert data["peak_flops"] is None and data["peak_device_memory_mib"] is None  # n/a on CPU
    t2i = data["text_to_image"]
    for name in ("ms_per_cfg_step_batch1", "images_per_s_large_batch"):
        _positive(t2i[name], name)
    for name in ("ms_per_step", "compile_s", "step_gflop", "xla_mib"):
        _positive(t2i["batch1_step"][name], name)
    large = t2i["large_batch"]
    assert large["batch"] == 16 and large["from_cache"] is False  # the cache is off in this test
    for name in ("seconds_per_batch", "seconds_per_image", "images_per_s", "compile_s", "xla_mib"):
        _positive(large[name], name)
    assert "identity" not in data and "train" not in data  # sections not asked for are not in the JSON
    assert "no CUDA device" in data["torch"]["skipped"]
