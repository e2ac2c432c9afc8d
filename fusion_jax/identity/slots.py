"""Helpers for the UNet's identity slots that several methods share (the slots themselves live in
`fusion_jax.models.attention`)."""

from __future__ import annotations

from flax import nnx


def copy_text_projections(unet, combine: str, *, rngs: nnx.Rngs) -> None:
    """Token methods (IP-Adapter, FaceStudio): give every block's cross-attention `to_k_ref` / `to_v_ref` as
    copies of its text `to_k` / `to_v` (identity tokens live in the text-embedding space, so they start where the
    text projections are), combined with the text attention as `combine` ('joint' | 'decoupled')."""
    for block in unet.transformer_blocks().values():
        attn = block.attn2
        pair = []
        for src in (attn.to_k, attn.to_v):
            in_f, out_f = src.kernel.get_value().shape
            lin = nnx.Linear(in_f, out_f, use_bias=False, dtype=src.dtype, param_dtype=src.kernel.get_value().dtype,
                             rngs=rngs)
            lin.kernel.set_value(src.kernel.get_value())
            pair.append(lin)
        attn.to_k_ref, attn.to_v_ref = pair
        attn.identity_combine = combine
