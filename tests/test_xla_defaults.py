"""`fusion_jax.xla_defaults`: the XLA:CPU flags are added by `import fusion_jax` before any backend starts, never
over the user's own value for the same flag, and off with FUSION_JAX_XLA_DEFAULTS=0. Each case is a fresh interpreter,
because XLA reads XLA_FLAGS once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusion_jax import xla_defaults

PROBE = ("import json, os, fusion_jax, jax; jax.numpy.ones(1).block_until_ready(); "
         "from fusion_jax import xla_defaults; "
         "print(json.dumps([os.environ.get('XLA_FLAGS', ''), xla_defaults.apply_xla_cpu_defaults()]))")
FLAG = "xla_cpu_experimental_ynn_fusion_type"


def _probe(**env) -> tuple[str, list]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FUSION_JAX_XLA_DEFAULTS")}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full_env, capture_output=True, text=True, check=True)
    flags, added_after_start = json.loads(out.stdout.strip().splitlines()[-1])
    return flags, added_after_start


@pytest.mark.parametrize("env, expected", [
    ({}, f"--{FLAG}={xla_defaults.XLA_CPU_DEFAULTS[FLAG]}"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     f"--xla_force_host_platform_device_count=2 --{FLAG}={xla_defaults.XLA_CPU_DEFAULTS[FLAG]}"),
    ({"XLA_FLAGS": f"--{FLAG}=-eltwise"}, f"--{FLAG}=-eltwise"),  # the user's value wins
    ({"FUSION_JAX_XLA_DEFAULTS": "0"}, ""),
])
def test_xla_cpu_defaults(env, expected):
    flags, added_after_start = _probe(**env)
    assert flags == expected
    assert added_after_start == []  # once the backend is up, nothing more is added
