"""Timestep embeddings of the Stable Diffusion UNet (weight-compatible with diffusers).

`timestep_embedding` is the sinusoidal projection (diffusers' `Timesteps`, no parameters); `TimestepEmbedding` is
the two-layer MLP on top of it (`linear_1`, `linear_2`). SDXL's `text_time` additional embedding reuses both: time
ids go through the sinusoidal projection, are concatenated with the pooled text embedding and go through a second
`TimestepEmbedding` (`add_embedding`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim), always float32.

    Frequencies are `exp(-log(max_period) * i / (dim // 2 - freq_shift))`; the output is `[sin, cos]`, or
    `[cos, sin]` when `flip_sin_to_cos`; an odd `dim` is zero-padded by one column (as diffusers does).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: `timesteps` must be 1-D (N,), got shape {timesteps.shape}")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """MLP `linear_2(silu(linear_1(x)))` turning a sinusoidal embedding into the UNet's time embedding."""

    def __init__(
        self,
        in_features: int,
        time_embed_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.linear_1 = nnx.Linear(in_features, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def text_time_embedding_input(
    text_embeds: jax.Array,
    time_ids: jax.Array,
    *,
    time_embed_dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
) -> jax.Array:
    """SDXL `text_time` input: concat(pooled text embeds (B, Dt), sinusoid of each time id (B, K) -> (B, K*dim)).

    The result feeds `UNet2DConditionModel.add_embedding`, whose in_features is
    `projection_class_embeddings_input_dim = Dt + K * addition_time_embed_dim`.
    """
    if text_embeds.ndim != 2:
        raise ValueError(f"added_cond_kwargs['text_embeds'] must be (B, D), got shape {text_embeds.shape}")
    if time_ids.ndim != 2 or time_ids.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"added_cond_kwargs['time_ids'] must be (B, K) with B={text_embeds.shape[0]}, got shape {time_ids.shape}"
        )
    batch = text_embeds.shape[0]
    time_embeds = timestep_embedding(
        time_ids.reshape(-1), time_embed_dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift
    ).reshape(batch, -1)
    return jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
