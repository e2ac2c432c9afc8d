"""The single-token baseline: Face Fusion's reference branch pooled to ONE token per reference image per layer.

An IP-Adapter-like comparison point for the miniature reproduction: each reference image becomes one pooled
embedding per layer (the mean of its captured hidden states), projected by the same new key/value projections
into one extra cross-attention token. Everything else (training, guidance, export) is Face Fusion's, so the two
differ only in "feature maps vs one token". Config section `single_token` (a `FusionConfig`: the same options).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from fusion_jax.identity.base import register
from fusion_jax.identity.context import IdentityContext
from fusion_jax.identity.fusion import FaceFusion, FusionConfig


@dataclasses.dataclass(frozen=True)
class SingleTokenConfig(FusionConfig):
    """`single_token.*`: the same options as `fusion.*` (Face Fusion's), for the pooled one-token variant."""


def pool_tokens(ctx: IdentityContext, per_image: int) -> IdentityContext:
    """Mean-pool each reference image's tokens of every layer into one token (per_image = K * N images a row)."""
    tokens, ids = {}, {}
    for name, value in ctx.reference_tokens.items():
        b, t, c = value.shape
        tokens[name] = value.reshape(b, per_image, t // per_image, c).mean(axis=2)
        ids[name] = ctx.token_identity[name].reshape(b, per_image, t // per_image)[:, :, 0]
    return ctx.replace(reference_tokens=tokens, token_identity=ids)


@register
class SingleToken(FaceFusion):
    """Face Fusion with one pooled token per reference image (the baseline of the seed papers' comparisons)."""

    name = "single_token"
    section = "single_token"
    config_class = SingleTokenConfig
    display_name = "single-token baseline"

    def reference_context(self, unet, ref_latents, text_emb_empty, cfg, **kwargs) -> IdentityContext:
        ctx = super().reference_context(unet, ref_latents, text_emb_empty, cfg, **kwargs)
        refs = jnp.asarray(ref_latents)
        return pool_tokens(ctx, int(np.prod(refs.shape[1:-3])))
