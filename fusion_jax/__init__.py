"""fusion-jax: identity-preserving image synthesis (Face Fusion, FaceStudio, FlashFace) in JAX / Flax NNX."""

__version__ = "0.1.0"

from fusion_jax.xla_defaults import apply_xla_cpu_defaults as _apply_xla_cpu_defaults

_apply_xla_cpu_defaults()  # before any backend starts: XLA reads XLA_FLAGS once (see xla_defaults.py)
