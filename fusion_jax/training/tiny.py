"""A tiny NNX model (~1.6k params) with diffusers-style module names, and its denoising-style loss.

For tests, benchmarks and `python -m fusion_jax.training`: it exercises every sharding rule family (conv
kernels, attention q/k/v/out projections, feed-forward, norms, biases) at a size 8 fake CPU devices train in
milliseconds. Paths look like `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

CHANNELS = 4  # image channels in and out
WIDTH = 8  # conv channels = attention width (divisible by fsdp 4 and tensor 2: sharding is exercised)
FF = 16  # feed-forward hidden width
SIZE = 4  # image height = width


class Attention(nnx.Module):
    """Single-head self-attention with diffusers' projection names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.to_q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(dim, dim, rngs=rngs)])

    def __call__(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        logits = jnp.einsum("bqd,bkd->bqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.to_out[0](jnp.einsum("bqk,bkd->bqd", weights, v))


class FeedForward(nnx.Module):
    """GELU MLP named like diffusers' FeedForward (net.0.proj, net.2)."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.net = nnx.List([_Proj(dim, hidden, rngs), _Identity(), nnx.Linear(hidden, dim, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](jax.nn.gelu(self.net[0](x)))


class _Proj(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim, hidden, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class _Identity(nnx.Module):
    """Stands where diffusers has dropout, so the path index of the output layer is 2."""


class TransformerBlock(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn1 = Attention(dim, rngs)
        self.norm3 = nnx.LayerNorm(dim, rngs=rngs)
        self.ff = FeedForward(dim, FF, rngs)

    def __call__(self, x):
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm3(x))


class _Transformer(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.transformer_blocks = nnx.List([TransformerBlock(dim, rngs)])


class _DownBlock(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.attentions = nnx.List([_Transformer(dim, rngs)])


class TinyDenoiser(nnx.Module):
    """conv_in -> one transformer block over the pixels -> conv_out (NHWC)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv_in = nnx.Conv(CHANNELS, WIDTH, (3, 3), rngs=rngs)
        self.down_blocks = nnx.List([_DownBlock(WIDTH, rngs)])
        self.conv_norm_out = nnx.GroupNorm(WIDTH, num_groups=2, rngs=rngs)
        self.conv_out = nnx.Conv(WIDTH, CHANNELS, (3, 3), rngs=rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        b, hh, ww, c = h.shape
        tokens = h.reshape(b, hh * ww, c)
        tokens = self.down_blocks[0].attentions[0].transformer_blocks[0](tokens)
        h = tokens.reshape(b, hh, ww, c)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


def make_tiny_model(rngs: nnx.Rngs) -> TinyDenoiser:
    return TinyDenoiser(rngs)


BATCH_SPEC = {"x": (SIZE, SIZE, CHANNELS), "target": (SIZE, SIZE, CHANNELS)}


def tiny_loss(model: TinyDenoiser, batch, rng):
    """Denoising-style MSE: predict `target` from `x` plus fresh noise (so the step RNG matters)."""
    noise = 0.1 * jax.random.normal(rng, batch["x"].shape, batch["x"].dtype)
    pred = model(batch["x"] + noise).astype(jnp.float32)
    err = jnp.mean((pred - batch["target"].astype(jnp.float32)) ** 2)
    return err, {"pred_rms": jnp.sqrt(jnp.mean(pred**2))}
