"""Attention and transformer blocks of the SD UNet, with the identity slots (docs/DESIGN.md section 3).

Weight-compatible with diffusers (`Attention`: `to_q`, `to_k`, `to_v`, `to_out[0]`; `FeedForward`: `net[0].proj`
(GEGLU), `net[2]`; `BasicTransformerBlock`: `norm1..3`, `attn1`, `attn2`, `ff`; `Transformer2DModel`: `norm`,
`proj_in`, `transformer_blocks`, `proj_out`). NHWC / (B, tokens, channels) layouts; softmax and norms in float32.

Attention kernels (`kernel=`): `'xla'` (`jax.nn.dot_product_attention`), `'cudnn'` (its cuDNN flash kernel, GPU,
bf16/fp16 only), `'chunked'` (`blocked_attention`: heads-first, queries in blocks of `query_chunk_size`
under `lax.map`, which bounds the (queries x keys) score memory; the fastest CPU path at every length), `'auto'`
(the rule table of `fusion_jax.precision`: cuDNN on a CUDA GPU where its constraints hold, chunked on CPU, else
XLA).

Identity cross-attention slot: an `Attention` may carry `to_k_ref` / `to_v_ref` (created by
`fusion_jax.identity.fusion.attach_identity_projections`). Given an `IdentityContext`, the query also attends to
the layer's reference tokens through those projections, combined with the text attention `'joint'` (one softmax
over [text; reference] tokens, via log-sum-exp merging) or `'decoupled'` (text attention + strength x reference
attention). Reference tokens of identity k get log(strength_k) added to their scores in `'joint'`, so strength 0
removes them exactly; with `identity=None` the slot is not traced at all.

Reference self-attention slot: a `BasicTransformerBlock` may carry `attn_ref` (SA', same shape as `attn1`). Given
an `IdentityContext` with `self_attention_tokens`, the block adds `w * SA'(y, [y; tokens]) + (1 - w) * SA'(y, y)`
(y = norm1(x), w = `self_attention_weight` per sample) beside its kept self-attention; otherwise it is untouched.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax import precision
from fusion_jax.identity.context import IdentityContext, ReferenceCapture
from fusion_jax.models import blocked_attention as _blocked
from fusion_jax.models.remat import REMAT_POLICY, Remat, call_maybe_remat, remat_name  # noqa: F401  (re-exported)
from fusion_jax.models.resnet import GroupNorm, conv2d

AttentionKernel = Literal["auto", "xla", "cudnn", "chunked"]
DEFAULT_QUERY_BLOCK = 1024  # query_chunk_size's default: the block of the explicit 'chunked' kernel and of the
# identity attention ('auto' on CPU takes precision.CPU_QUERY_BLOCK)
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "chunked")
IdentityCombine = Literal["joint", "decoupled"]


# --------------------------------------------------------------------------------------------------------------
# attention functions
# --------------------------------------------------------------------------------------------------------------


def _resolve_kernel(kernel: str, q: jax.Array, k: jax.Array) -> str:
    """The kernel this call runs: `auto` is resolved by `fusion_jax.precision`'s rule table."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    backend = precision.current_backend()
    return precision.resolve_attention_kernel(
        kernel, backend=backend, dtype=q.dtype, head_dim=q.shape[-1], q_len=q.shape[1], kv_len=k.shape[1],
        compute_capability=precision.gpu_compute_capability() if backend == "gpu" else None)


def _map_query_chunks(fn, q: jax.Array, chunk: int, *per_query: jax.Array, query_axes: tuple[int, ...] = ()):
    """Apply `fn(q_chunk, *per_query_chunks)` over blocks of `chunk` queries (axis 1 of q) with `lax.map`.

    `per_query` arrays are split along their own query axis (`query_axes`); `fn` must return arrays shaped
    (B, Lq_chunk, ...), which are stitched back along axis 1. Bounds score memory to (B, H, chunk, Lk).
    """
    length = q.shape[1]
    if length <= chunk:
        return fn(q, *per_query)
    n = -(-length // chunk)
    pad = n * chunk - length

    def split(x, axis):
        x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
        x = x.reshape(x.shape[:axis] + (n, chunk) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    chunks = (split(q, 1),) + tuple(split(x, a) for x, a in zip(per_query, query_axes))
    outs = jax.lax.map(lambda args: fn(*args), chunks)

    def merge(y):
        y = jnp.moveaxis(y, 0, 1)  # (B, n, chunk, ...)
        return y.reshape((y.shape[0], n * chunk) + y.shape[3:])[:, :length]

    return jax.tree.map(merge, outs)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """The CPU kernel: (B, Lq, H, D) attention, `block` queries at a time, with a recomputing backward
    (`fusion_jax.models.blocked_attention`).

    Why (measured, `benchmarks/unet.py`, 2 cores): XLA:CPU runs attention einsums on the (B, L, H, D) layout (that
    of `jax.nn.dot_product_attention`) with a transpose of the whole (B, H, Lq, Lk) score tensor around each
    contraction, and a full 1024 x 1024 score tensor per head no longer fits the cache. Keys and values are moved
    heads-first once; 128 queries at a time (8 heads x 128 x 1024 float32 scores = 4 MiB) made the `mid` UNet
    forward about 1.6x faster. The score memory is bounded by (B, H, block, Lk) for any length, in the backward
    pass too.
    """
    return _blocked.blocked_attention(q, k, v, block)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kernel: AttentionKernel = "auto",
    upcast: bool = False,
    query_chunk_size: int = DEFAULT_QUERY_BLOCK,
) -> jax.Array:
    """Multi-head attention, q (B, Lq, H, D), k / v (B, Lk, H, D) -> (B, Lq, H, D) in q's dtype.

    Scale 1/sqrt(D); softmax in float32. `upcast` computes q.k (and the rest) in float32 (SD 2.x
    `upcast_attention`, which avoids fp16/bf16 overflow in the scores).
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    impl = _resolve_kernel(kernel, q, k)
    if impl == "chunked":
        block = precision.auto_query_block(precision.current_backend()) if kernel == "auto" else None
        out = blocked_attention(q, k, v, block or query_chunk_size)
    else:
        if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention kernel 'cudnn' needs bfloat16/float16 activations, got {q.dtype} "
                             "(set dtype=bfloat16, or use kernel 'xla'; upcast_attention forces float32)")
        out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return out.astype(out_dtype)


def masked_attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention with an additive float32 `bias` (B, 1|H, Lq, Lk) that may be -inf; also returns log-sum-exp.

    Returns out (B, Lq, H, D) float32 and lse (B, H, Lq) float32. A query that sees no key gets out 0 and
    lse -inf (instead of NaN), so merging it with another attention leaves that attention unchanged.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = scores + bias
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    lse = jnp.where(total[..., 0] > 0, jnp.log(jnp.where(total[..., 0] > 0, total[..., 0], 1.0)) + peak[..., 0],
                    -jnp.inf)
    return out, lse


def identity_bias(
    token_identity: jax.Array,
    token_weight: jax.Array,
    query_region: jax.Array | None,
) -> jax.Array:
    """Additive bias (B, 1, Lq, T) for reference tokens: `token_weight` (B, T, float32, may be -inf) where query q
    may see token t, else -inf. q sees t iff t is not padding (`token_identity` >= 0) and, when `query_region`
    (B, K, Lq) is given, q lies inside the region of t's identity."""
    valid = token_identity >= 0
    if query_region is None:
        visible = jnp.broadcast_to(valid[:, None, :], (token_identity.shape[0], 1, token_identity.shape[1]))
    else:
        num_ids = query_region.shape[1]
        onehot = jax.nn.one_hot(jnp.where(valid, token_identity, 0), num_ids, dtype=jnp.float32)  # (B, T, K)
        visible = jnp.einsum("bkq,btk->bqt", query_region.astype(jnp.float32), onehot) > 0
        visible = visible & valid[:, None, :]
    return jnp.where(visible, token_weight[:, None, :], -jnp.inf)[:, None]


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` computed in float32 (two-pass variance), returning the input's dtype."""

    def __init__(self, num_features: int, *, epsilon: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(num_features, epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
                         use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head (self- or cross-) attention with diffusers' parameter names, plus the identity slot."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        upcast_attention: bool = False,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        kernel: AttentionKernel = "auto",
        query_chunk_size: int = DEFAULT_QUERY_BLOCK,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        inner = heads * dim_head
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.dim_head = dim_head
        self.upcast_attention = upcast_attention
        self.kernel = kernel
        self.query_chunk_size = query_chunk_size
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, **kw)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, use_bias=out_bias, **kw), nnx.Dropout(dropout)])
        # identity cross-attention slot: filled by fusion_jax.identity.fusion.attach_identity_projections
        self.to_k_ref: nnx.Linear | None = nnx.data(None)
        self.to_v_ref: nnx.Linear | None = nnx.data(None)
        self.identity_combine: IdentityCombine = "joint"

    @property
    def has_identity_slot(self) -> bool:
        return self.to_k_ref is not None

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        identity: IdentityContext | None = None,
        layer_name: str = "",
        spatial_shape: tuple[int, int] | None = None,
    ) -> jax.Array:
        """x (B, Lq, query_dim), context (B, Lk, cross_attention_dim) or None for self-attention."""
        context = x if context is None else context
        q = self._heads(self.to_q(x))
        k = self._heads(self.to_k(context))
        v = self._heads(self.to_v(context))
        out = dot_product_attention(q, k, v, kernel=self.kernel, upcast=self.upcast_attention,
                                    query_chunk_size=self.query_chunk_size)
        if identity is not None and self.has_identity_slot:
            out = self._add_identity(q, k, out, identity, layer_name, spatial_shape)
        out = out.reshape(out.shape[0], out.shape[1], self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))

    def _add_identity(self, q, k_text, out_text, identity: IdentityContext, layer_name: str,
                      spatial_shape: tuple[int, int] | None) -> jax.Array:
        """Merge attention to this layer's reference tokens into `out_text` (B, Lq, H, D)."""
        if layer_name not in identity.reference_tokens:
            raise ValueError(f"identity: IdentityContext.reference_tokens has no entry for layer {layer_name!r} "
                             f"(has {sorted(identity.reference_tokens)})")
        tokens = identity.reference_tokens[layer_name]
        token_ids = identity.token_identity[layer_name]
        batch = q.shape[0]
        if tokens.ndim != 3 or tokens.shape[0] != batch or token_ids.shape != tokens.shape[:2]:
            raise ValueError(f"identity: reference_tokens[{layer_name!r}] must be (B={batch}, T, C) with "
                             f"token_identity (B, T); got {tokens.shape} and {token_ids.shape}")
        if identity.strength.shape[0] != batch:
            raise ValueError(f"identity: strength must be (B={batch}, K), got {identity.strength.shape}")
        region = None
        if identity.region_masks is not None:
            if spatial_shape is None:
                raise ValueError("identity: region masks need the layer's spatial shape")
            region = identity.region_mask(*spatial_shape)
        k_ref = self._heads(self.to_k_ref(tokens))
        v_ref = self._heads(self.to_v_ref(tokens))
        if self.upcast_attention:
            q, k_ref, k_text = (x.astype(jnp.float32) for x in (q, k_ref, k_text))
        strength = identity.strength.astype(jnp.float32)
        safe_ids = jnp.maximum(token_ids, 0)
        token_strength = jnp.take_along_axis(strength, safe_ids, axis=1)  # (B, T)
        chunk = self.query_chunk_size

        if self.identity_combine == "joint":
            log_strength = jnp.where(token_strength > 0, jnp.log(jnp.maximum(token_strength, 1e-30)), -jnp.inf)

            def joint(qc, out_c, *region_c):
                bias = identity_bias(token_ids, log_strength, region_c[0] if region_c else None)
                out_ref, lse_ref = masked_attention_with_lse(qc, k_ref, v_ref, bias)
                scores = jnp.einsum("bqhd,bkhd->bhqk", qc, k_text, preferred_element_type=jnp.float32)
                lse_text = jax.nn.logsumexp(scores / math.sqrt(qc.shape[-1]), axis=-1)
                w_ref = jnp.exp(lse_ref - jnp.logaddexp(lse_text, lse_ref))  # (B, H, Lq); 0 where nothing seen
                w_ref = jnp.transpose(w_ref, (0, 2, 1))[..., None]
                merged = out_c.astype(jnp.float32) * (1.0 - w_ref) + out_ref * w_ref
                return merged.astype(out_c.dtype)

            extra, axes = ((region,), (2,)) if region is not None else ((), ())
            return _map_query_chunks(joint, q, chunk, out_text, *extra, query_axes=(1,) + axes)

        if self.identity_combine != "decoupled":
            raise ValueError(f"identity_combine must be 'joint' or 'decoupled', got {self.identity_combine!r}")
        num_ids = strength.shape[1]

        def decoupled(qc, out_c, *region_c):
            total = out_c.astype(jnp.float32)
            for ident in range(num_ids):  # K is small and static: one masked softmax per identity
                weight = jnp.where(token_ids == ident, 0.0, -jnp.inf)
                bias = identity_bias(token_ids, weight, region_c[0] if region_c else None)
                out_ref, _ = masked_attention_with_lse(qc, k_ref, v_ref, bias)
                total = total + strength[:, ident][:, None, None, None] * out_ref
            return total.astype(out_c.dtype)

        extra, axes = ((region,), (2,)) if region is not None else ((), ())
        return _map_query_chunks(decoupled, q, chunk, out_text, *extra, query_axes=(1,) + axes)


class GEGLU(nnx.Module):
    """`proj` to 2x width, split into (value, gate), return value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """`net = [GEGLU(dim, mult*dim), Dropout, Linear(mult*dim, dim)]` (diffusers' FeedForward, geglu)."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        inner = dim * mult
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List([GEGLU(dim, inner, **kw), nnx.Dropout(dropout), nnx.Linear(inner, dim, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention (with the identity slot) and GEGLU feed-forward, each pre-LayerNorm and
    residual. `layer_name` is the block's diffusers path; identity contexts are keyed by it."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        layer_name: str,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        kernel: AttentionKernel = "auto",
        query_chunk_size: int = DEFAULT_QUERY_BLOCK,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn_kw = dict(heads=heads, dim_head=dim_head, upcast_attention=upcast_attention, dropout=dropout,
                       kernel=kernel, query_chunk_size=query_chunk_size, **kw)
        self.layer_name = layer_name
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, epsilon=norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attn_kw)
        self.norm2 = LayerNorm(dim, epsilon=norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn_kw)
        self.norm3 = LayerNorm(dim, epsilon=norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.ff = FeedForward(dim, dropout=dropout, **kw)
        # reference self-attention slot SA' (set by an identity method, e.g. FlashFace); used only when the identity
        # context carries `self_attention_tokens` for this layer, so with None the block is exactly the base block
        self.attn_ref: Attention | None = nnx.data(None)

    def __call__(
        self,
        x: jax.Array,
        encoder_hidden_states: jax.Array,
        identity: IdentityContext | None = None,
        *,
        spatial_shape: tuple[int, int] | None = None,
        return_cross_input: bool = False,
        return_self_input: bool = False,
    ):
        """x (B, h*w, dim); encoder_hidden_states (B, L, cross_attention_dim); spatial_shape = (h, w).

        With `return_cross_input`, returns (output, the hidden states entering attn2), the tokens a reference
        branch captures; `return_self_input` appends the self-attention input norm1(x) (reference self-attention
        features)."""
        y = self.norm1(x)
        h = self.attn1(y, encoder_hidden_states if self.only_cross_attention else None) + x
        if self.attn_ref is not None and isinstance(identity, IdentityContext) and (
                identity.self_attention_tokens is not None):
            h = h + self._reference_self_attention(y, identity)
        normed = self.norm2(h)
        h = self.attn2(normed, encoder_hidden_states, identity=identity, layer_name=self.layer_name,
                       spatial_shape=spatial_shape) + h
        out = self.ff(self.norm3(h)) + h
        extras = ((normed,) if return_cross_input else ()) + ((y,) if return_self_input else ())
        return (out,) + extras if extras else out

    def _reference_self_attention(self, y: jax.Array, identity: IdentityContext) -> jax.Array:
        """w * SA'(y, [y; reference tokens]) + (1 - w) * SA'(y, y) of the reference self-attention slot."""
        tokens_by_layer = identity.self_attention_tokens
        if self.layer_name not in tokens_by_layer:
            raise ValueError(f"identity: self_attention_tokens has no entry for layer {self.layer_name!r}, which has "
                             f"a reference self-attention slot (has {sorted(tokens_by_layer)})")
        tokens = tokens_by_layer[self.layer_name]
        batch = y.shape[0]
        if tokens.ndim != 3 or tokens.shape[0] not in (1, batch) or tokens.shape[-1] != y.shape[-1]:
            raise ValueError(f"identity: self_attention_tokens[{self.layer_name!r}] must be (1 or B={batch}, T, "
                             f"{y.shape[-1]}), got {tokens.shape}")
        weight = identity.self_attention_weight
        if weight is None or weight.shape != (batch,):
            raise ValueError(f"identity: self_attention_weight must be (B={batch},), got "
                             f"{None if weight is None else weight.shape}")
        tokens = jnp.broadcast_to(tokens.astype(y.dtype), (batch,) + tokens.shape[1:])
        with_refs = self.attn_ref(y, jnp.concatenate([y, tokens], axis=1))
        own = self.attn_ref(y)
        w = weight.astype(jnp.float32)[:, None, None]
        return (w * with_refs.astype(jnp.float32) + (1.0 - w) * own.astype(jnp.float32)).astype(y.dtype)


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in (1x1 conv, or Linear when `use_linear_projection`) -> transformer blocks -> proj_out,
    plus the input as residual. NHWC in and out."""

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        layer_prefix: str,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        kernel: AttentionKernel = "auto",
        query_chunk_size: int = DEFAULT_QUERY_BLOCK,
        remat: Remat = "none",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        inner = heads * dim_head
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.use_linear_projection = use_linear_projection
        self.remat = remat_name(remat)  # jax.checkpoint policy name of each transformer block (models.remat)
        self.norm = GroupNorm(in_channels, norm_num_groups, epsilon=1e-6, rngs=rngs, param_dtype=param_dtype)
        self.proj_in = nnx.Linear(in_channels, inner, **kw) if use_linear_projection else conv2d(in_channels, inner, 1, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(
                inner, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                layer_name=f"{layer_prefix}.transformer_blocks.{i}", only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention, dropout=dropout, kernel=kernel, query_chunk_size=query_chunk_size,
                **kw)
            for i in range(num_layers)
        ])
        self.proj_out = nnx.Linear(inner, in_channels, **kw) if use_linear_projection else conv2d(inner, in_channels, 1, **kw)

    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array,
                 identity: IdentityContext | ReferenceCapture | None = None) -> jax.Array:
        b, height, width, c = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(b, height * width, c))
        else:
            h = self.proj_in(h)
            h = h.reshape(b, height * width, h.shape[-1])
        capture = identity if isinstance(identity, ReferenceCapture) else None
        for block in self.transformer_blocks:
            if capture is not None:
                want_self = block.layer_name in capture.self_attention_layers
                outs = call_maybe_remat(
                    self.remat,
                    lambda blk, hs, ehs: blk(hs, ehs, spatial_shape=(height, width), return_cross_input=True,
                                             return_self_input=want_self),
                    block, h, encoder_hidden_states)
                h, normed = outs[0], outs[1]
                if block.attn2.has_identity_slot:
                    capture.tokens[block.layer_name] = normed
                if want_self:
                    capture.self_attention_inputs[block.layer_name] = outs[2]
                continue
            h = call_maybe_remat(
                self.remat,
                lambda blk, hs, ehs, ident: blk(hs, ehs, ident, spatial_shape=(height, width)),
                block, h, encoder_hidden_states, identity,
            )
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, height, width, c)
        else:
            h = self.proj_out(h.reshape(b, height, width, h.shape[-1]))
        return h + x
