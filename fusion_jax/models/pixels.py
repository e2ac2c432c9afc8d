"""Pixel-space models: the identity "VAE" and the lossless f x f pixel folding (space-to-depth).

A pixel-space UNet with 3 f^2 input channels sees the image folded f x f into channels: (H, W, 3) pixels become
(H/f, W/f, 3 f^2) "latents". Why: on a CPU the cost of a small UNet is set by its full-resolution levels (few
channels over many positions); folding 2 x 2 halves the side, so the same compute buys 4x the channels, as a
latent model does with a VAE, but the "encoder" is exact (a reshape) and has nothing to learn. The fold factor is
read from the UNet itself (`fold_factor`), so a pipeline folder or a training config never states it twice.
Channel order inside a fold: (row offset, column offset, RGB), the same as `jax.nn` / PyTorch `pixel_unshuffle`
up to the position of the RGB axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx


def fold_factor(in_channels: int) -> int:
    """f with 3 f^2 = `in_channels` (1 for an RGB UNet); an error for a channel count no fold gives."""
    f = math.isqrt(max(int(in_channels) // 3, 0))
    if f < 1 or 3 * f * f != int(in_channels):
        raise ValueError(f"a pixel-space UNet needs 3 * f^2 input channels (3, 12, 27, ...; f = the pixel fold), "
                         f"this one has {in_channels}")
    return f


def fold_pixels(images: jax.Array, f: int) -> jax.Array:
    """(..., H, W, C) -> (..., H/f, W/f, f*f*C): each f x f block of pixels becomes one position's channels."""
    if f == 1:
        return images
    *lead, h, w, c = images.shape
    if h % f or w % f:
        raise ValueError(f"pixel fold {f}: image side {h}x{w} must be a multiple of {f}")
    x = images.reshape(*lead, h // f, f, w // f, f, c)
    x = jnp.moveaxis(x, -4, -3)  # (..., H/f, W/f, f_row, f_col, C)
    return x.reshape(*lead, h // f, w // f, f * f * c)


def unfold_pixels(latents: jax.Array, f: int) -> jax.Array:
    """Inverse of `fold_pixels`: (..., H/f, W/f, f*f*C) -> (..., H, W, C)."""
    if f == 1:
        return latents
    *lead, h, w, cf = latents.shape
    c = cf // (f * f)
    if c * f * f != cf:
        raise ValueError(f"pixel fold {f}: {cf} channels are not a multiple of {f * f}")
    x = latents.reshape(*lead, h, w, f, f, c)
    x = jnp.moveaxis(x, -3, -4)  # (..., H/f, f_row, W/f, f_col, C)
    return x.reshape(*lead, h * f, w * f, c)


@dataclasses.dataclass(frozen=True)
class PixelCodecConfig:
    """What the sampler reads from a VAE config: downsampling f (2^(levels-1)), no scaling or shift."""

    block_out_channels: tuple[int, ...] = (3,)  # len = 1 + log2(fold): vae_scale_factor = fold
    scaling_factor: float = 1.0  # latents are the (folded) pixels
    shift_factor: Optional[float] = None  # no shift
    downscale_factor: int = 1  # pixels per latent (= fold)


@dataclasses.dataclass
class _Posterior:
    mean: jax.Array


class PixelCodec(nnx.Module):
    """The "VAE" of a pixel-space model: encode(x).mean = fold(x), decode(z) = unfold(z) (exact inverses)."""

    def __init__(self, fold: int = 1):
        levels = int(round(math.log2(fold))) if fold >= 1 else -1
        if levels < 0 or 2 ** levels != fold:
            raise ValueError(f"PixelCodec: fold must be a power of two >= 1, got {fold}")
        self.fold = fold
        self.config = PixelCodecConfig(block_out_channels=(3,) * (levels + 1), downscale_factor=fold)

    def encode(self, images: jax.Array) -> _Posterior:
        return _Posterior(fold_pixels(images, self.fold))

    def decode(self, latents: jax.Array) -> jax.Array:
        return unfold_pixels(latents, self.fold)
