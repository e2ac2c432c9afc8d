"""fusion-jax: identity-preserving image synthesis (Face Fusion, FaceStudio, FlashFace) in JAX / Flax NNX."""

__version__ = "0.1.0"
