"""The CPU attention kernel: queries in blocks, with a hand-written backward pass.

Forward: batch and heads merged into one leading dimension ((B*H, L, D): XLA:CPU runs dots with one batch
dimension several times faster than with two at batch > 1), `block` queries at a time under `lax.map`, so score
memory is bounded by (B*H, block, Lk); the softmax is normalised after the value product (two fewer passes over
the scores). It returns the log-sum-exp of each query's scores as well.

Backward (`jax.custom_vjp`, the flash-attention recurrence): per query block, the probabilities are recomputed
from q, k and the saved log-sum-exp instead of being stored by autodiff for every block, and the key / value
gradients are accumulated transposed ((B*H, D, Lk) += "nqd,nqk->ndk", the small operand first). Why, measured on 2 cores
(`benchmarks/attention.py`): autodiff through the blocked forward contracts the (block, Lk) probabilities over
their query axis ("nqk,nqd->nkd"), a form XLA:CPU runs 5-8x slower than the same product written with the
small operand first; at 1024 tokens, 8 heads of 16 that backward alone was 2.5-3.4x PyTorch's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _heads(x: jax.Array) -> jax.Array:
    """(B, L, H, D) -> (B*H, L, D)."""
    b, l, h, d = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, l, d)


def _unheads(x: jax.Array, b: int, h: int) -> jax.Array:
    """(B*H, L, D) -> (B, L, H, D)."""
    return jnp.transpose(x.reshape((b, h) + x.shape[1:]), (0, 2, 1, 3))


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, L, H, ...) -> (n, B*H, block, ...), L zero-padded to n * block."""
    b, l, h = x.shape[:3]
    n = -(-l // block)
    x = jnp.pad(x, [(0, 0), (0, n * block - l)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, block, h) + x.shape[3:])
    x = jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)  # (n, B, H, block, ...)
    return x.reshape((n, b * h, block) + x.shape[4:])


def _unblocks(x: jax.Array, b: int, h: int, length: int) -> jax.Array:
    """(n, B*H, block, ...) -> (B, length, H, ...)."""
    n, _, block = x.shape[:3]
    x = x.reshape((n, b, h, block) + x.shape[3:])
    x = jnp.moveaxis(jnp.moveaxis(x, 0, 1), 2, 3)  # (B, n, block, H, ...)
    return x.reshape((b, n * block, h) + x.shape[4:])[:, :length]


def _forward(q, k, v, block):
    b, length, h, d = q.shape
    block = min(block, length)  # a sequence shorter than a block is one unpadded block
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    kh, vh = _heads(k), _heads(v)

    def one_block(qb):
        scores = jnp.einsum("nqd,nkd->nqk", qb * scale, kh, preferred_element_type=jnp.float32)
        peak = scores.max(axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        total = weights.sum(axis=-1, keepdims=True)
        out = jnp.einsum("nqk,nkd->nqd", weights.astype(v.dtype), vh, preferred_element_type=jnp.float32) / total
        return out.astype(q.dtype), (peak + jnp.log(total))[..., 0]

    out_blocks, lse = jax.lax.map(one_block, _blocks(q, block))
    return _unblocks(out_blocks, b, h, length), (q, k, v, out_blocks, lse)


def _backward(block, residuals, grad):
    q, k, v, out_blocks, lse = residuals
    b, length, h, d = q.shape
    block = min(block, length)
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(d)
    kh, vh = _heads(k).astype(f32), _heads(v).astype(f32)
    grad_blocks = _blocks(grad.astype(f32), block)
    delta = (grad_blocks * out_blocks.astype(f32)).sum(-1)  # rowsum(dO * O): the softmax's Jacobian term

    def one_block(carry, xs):
        dk_t, dv_t = carry
        qb, gb, lse_b, delta_b = xs
        qb = qb.astype(f32) * scale
        probs = jnp.exp(jnp.einsum("nqd,nkd->nqk", qb, kh) - lse_b[..., None])
        dv_t = dv_t + jnp.einsum("nqd,nqk->ndk", gb, probs)
        dscores = probs * (jnp.einsum("nqd,nkd->nqk", gb, vh) - delta_b[..., None])
        dk_t = dk_t + jnp.einsum("nqd,nqk->ndk", qb, dscores)
        return (dk_t, dv_t), jnp.einsum("nqk,nkd->nqd", dscores, kh) * scale

    zeros = jnp.zeros((kh.shape[0], d, kh.shape[1]), f32)
    (dk_t, dv_t), dq = jax.lax.scan(one_block, (zeros, zeros), (_blocks(q, block), grad_blocks, lse, delta))
    dk, dv = (_unheads(jnp.swapaxes(x, 1, 2), b, h) for x in (dk_t, dv_t))
    return _unblocks(dq, b, h, length).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _primal(q, k, v, block):
    return _forward(q, k, v, block)[0]


blocked_attention = jax.custom_vjp(_primal, nondiff_argnums=(3,))
blocked_attention.defvjp(_forward, _backward)
blocked_attention.__doc__ = """(B, Lq, H, D) attention over k / v (B, Lk, H, D), `block` queries at a time -> (B, Lq, H, D) in
q's dtype; scale 1/sqrt(D), float32 scores and softmax; gradients by the recomputing backward above."""

__all__ = ["blocked_attention"]
