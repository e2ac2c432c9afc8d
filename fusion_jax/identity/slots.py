"""UNet adaptations that several identity methods share: seeding the cross-attention slot's projections from the
text ones (token methods), and LoRA adapters on the attention projections (Face Fusion's, IP-Adapter's and
FaceStudio's '+lora' presets). The slots themselves live in `fusion_jax.models.attention`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fusion_jax.models.attention import Attention


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


LORA_TARGETS = ("to_q", "to_k", "to_v")


def attach_lora(unet, rank: int, *, rngs: nnx.Rngs | None = None) -> int:
    """Wrap every UNet attention projection (`to_q`, `to_k`, `to_v`, `to_out[0]`) in a LoRA adapter (in place).

    The base kernel / bias keep their paths; adapters add `<proj>.lora.lora_a` / `lora_b` (b starts at zero, so
    the model is unchanged). Identity projections are not wrapped. Returns the number of wrapped projections.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    attentions = [node for _, node in nnx.iter_graph(unet) if isinstance(node, Attention)]
    count = 0

    def wrap(src: nnx.Linear) -> nnx.LoRALinear:
        in_f, out_f = src.kernel.get_value().shape
        lora = nnx.LoRALinear(in_f, out_f, lora_rank=rank, use_bias=src.bias is not None, dtype=src.dtype,
                              param_dtype=src.kernel.get_value().dtype, lora_param_dtype=jnp.float32, rngs=rngs)
        lora.kernel.set_value(src.kernel.get_value())
        if src.bias is not None:
            lora.bias.set_value(src.bias.get_value())
        return lora

    for attn in attentions:
        for name in LORA_TARGETS:
            if not isinstance(getattr(attn, name), nnx.LoRALinear):
                setattr(attn, name, wrap(getattr(attn, name)))
                count += 1
        if not isinstance(attn.to_out[0], nnx.LoRALinear):
            attn.to_out[0] = wrap(attn.to_out[0])
            count += 1
    return count
