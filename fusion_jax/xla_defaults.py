"""XLA:CPU flags the library sets by default, added to `XLA_FLAGS` by `import fusion_jax` (no jax import here:
the config layer stays light).

Why: jaxlib 0.10 hands every lone dot and convolution to YNNPACK, which on the UNet's shapes is slower than
XLA's own Eigen kernels; keeping YNNPACK for the fusions it forms (dot + elementwise) but not for lone dots and
convolutions made the `mid` UNet forward about 1.2x faster on 2 cores (`python benchmarks/unet.py --configs mid`,
docs/DESIGN.md section 9). Turning YNNPACK off altogether was slower. XLA reads `XLA_FLAGS` once, when the first
backend starts, so the flags are added only while no backend is up, and never over a value the user set for the
same flag; `FUSION_JAX_XLA_DEFAULTS=0` turns them off. They only concern the CPU backend (on a GPU machine, the
host's small computations). The flag is jaxlib-version specific: re-measure when jaxlib moves.
"""

from __future__ import annotations

import os
import sys

XLA_CPU_DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_dot,-individual_convolution",
}


def _backend_started() -> bool:
    """True once a JAX backend exists (only possible if jax is imported; never imports it)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def apply_xla_cpu_defaults() -> list[str]:
    """Add `XLA_CPU_DEFAULTS` to `XLA_FLAGS` (each flag the user did not set); returns the flags added.

    Adds nothing once a JAX backend has started (XLA has read its flags by then) or with
    `FUSION_JAX_XLA_DEFAULTS=0`.
    """
    if os.environ.get("FUSION_JAX_XLA_DEFAULTS", "") == "0" or _backend_started():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in XLA_CPU_DEFAULTS.items() if f"--{name}" not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
