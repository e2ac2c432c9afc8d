"""Classifier-free guidance rescale (Lin et al. 2023, arXiv 2305.08891, section 3.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def guidance_rescale(noise_cfg: jax.Array, noise_pred_text: jax.Array, phi: float | jax.Array) -> jax.Array:
    """Rescale the guided prediction to the per-sample std of the text prediction, mixed by phi.

    As diffusers' `rescale_noise_cfg`: std over all non-batch axes (H, W, C for NHWC) with Bessel's
    correction (torch.std's default), result = phi * rescaled + (1 - phi) * noise_cfg. phi=0 is a no-op.
    """
    if noise_cfg.shape != noise_pred_text.shape or noise_cfg.ndim < 2:
        raise ValueError(
            "noise_cfg and noise_pred_text must have the same shape (B, ...) with a batch axis, "
            f"got {noise_cfg.shape} and {noise_pred_text.shape}"
        )
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return phi * rescaled + (1.0 - phi) * noise_cfg
