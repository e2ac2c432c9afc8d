"""The CPU attention kernel's hand-written backward against PyTorch's scaled_dot_product_attention gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusion_jax.models.blocked_attention import blocked_attention


def _torch_grads(q, k, v, g):
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float64)).permute(0, 2, 1, 3).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    grads = torch.autograd.grad(out, (tq, tk, tv), torch.tensor(np.asarray(g, np.float64)).permute(0, 2, 1, 3))
    return out.detach().permute(0, 2, 1, 3).numpy(), [x.permute(0, 2, 1, 3).numpy() for x in grads]


@pytest.mark.parametrize("lq,lk,block", [(50, 50, 16), (40, 77, 16), (33, 19, 64), (64, 64, 32)])
def test_forward_and_gradients_equal_torch_sdpa(lq, lk, block):
    """Ragged last block (50 = 3 x 16 + 2), cross-attention lengths, one block larger than the sequence, an exact
    split: output and the three gradients equal float64 PyTorch within float32 rounding (scores of O(1) inputs,
    sums over at most 77 keys: 1e-5 relative is a few hundred ulps of margin)."""
    rng = np.random.default_rng(lq + lk)
    b, h, d = 2, 3, 8
    q, g = (rng.standard_normal((b, lq, h, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, lk, h, d)).astype(np.float32) for _ in range(2))
    out, vjp = jax.vjp(lambda q, k, v: blocked_attention(q, k, v, block), q, k, v)
    grads = vjp(jnp.asarray(g))
    ref_out, ref_grads = _torch_grads(q, k, v, g)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    for name, ours, theirs in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_under_jit_and_in_bfloat16_the_dtypes_are_kept():
    """Jitted gradients equal the eager ones; bf16 inputs give bf16 outputs and gradients near float32's (bf16 has
    8 mantissa bits: 2e-2 relative L2)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 24, 2, 16)), jnp.float32) for _ in range(3))

    def loss(q, k, v):
        return jnp.sum(jnp.sin(blocked_attention(q, k, v, 8)).astype(jnp.float32))

    eager = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    half = jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    for a, b in zip(half, eager):
        assert a.dtype == jnp.bfloat16
        a = np.asarray(a.astype(jnp.float32))
        assert np.linalg.norm(a - np.asarray(b)) / np.linalg.norm(np.asarray(b)) < 2e-2
