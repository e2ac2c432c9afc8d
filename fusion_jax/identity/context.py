"""`IdentityContext`: the identity information the UNet's transformer blocks consume (docs/DESIGN.md section 3).

A pytree of arrays, built by an identity method (Face Fusion here; FlashFace and FaceStudio later) and passed as
`unet(..., identity=ctx)`. Each `BasicTransformerBlock` looks up its own entries by its static `layer_name`
(its diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0`).

Cross-attention slot (Face Fusion, FaceStudio): `reference_tokens[layer]` are extra key/value inputs to that
layer's `attn2` (projected by its `to_k_ref` / `to_v_ref`). Tokens carry an identity index (`token_identity`);
`region_masks` restrict which query positions see which identity; `strength` scales each identity (0 = off,
bit-exactly).

Reference self-attention slot (FlashFace): a block whose `attn_ref` is set and whose layer has an entry in
`self_attention_tokens` adds, beside its kept self-attention SA on y = norm1(x),
`w * SA'(y, [y; tokens]) + (1 - w) * SA'(y, y)` with SA' = `attn_ref` and w = `self_attention_weight` per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def resolution_key(height: int, width: int) -> str:
    """Key of `IdentityContext.region_masks` for a latent level of `height` x `width` positions."""
    return f"{height}x{width}"


@struct.dataclass
class IdentityContext:
    """Per-layer identity tokens plus who-sees-what (a pytree; all leaves are arrays).

    Shapes: B batch, K identities, T_l tokens of layer l (K * N references * h_l * w_l for Face Fusion),
    C_l the layer's hidden width, P = h * w query positions of a latent level.
    """

    # layer_name -> (B, T_l, C_l): hidden states of the references entering that layer's cross-attention
    reference_tokens: dict[str, jax.Array]
    # layer_name -> (B, T_l) int32: identity index in [0, K) of every token; -1 marks padding (never attended)
    token_identity: dict[str, jax.Array]
    # (B, K) float32: per-identity strength; 0 removes that identity's tokens exactly
    strength: jax.Array
    # resolution_key(h, w) -> (B, K, h*w) bool: query positions inside identity k's region; None = everywhere
    region_masks: dict[str, jax.Array] | None = None
    # layer_name -> (1 or B, T_l, C_l): extra key/value tokens of that layer's reference self-attention (`attn_ref`);
    # a leading 1 is shared by the whole batch. None: the slot is off everywhere.
    self_attention_tokens: dict[str, jax.Array] | None = None
    # (B,) float32: weight w of the attention over [own tokens; reference tokens] in the slot (1 - w on own tokens)
    self_attention_weight: jax.Array | None = None

    @classmethod
    def self_attention_only(cls, tokens: dict[str, jax.Array], weight: jax.Array) -> "IdentityContext":
        """A context that only feeds the reference self-attention slot (no cross-attention reference tokens)."""
        weight = jnp.asarray(weight, jnp.float32)
        return cls(reference_tokens={}, token_identity={}, strength=jnp.zeros(weight.shape + (0,), jnp.float32),
                   self_attention_tokens=tokens, self_attention_weight=weight)

    @property
    def num_identities(self) -> int:
        return self.strength.shape[-1]

    def with_strength(self, strength: jax.Array | float) -> "IdentityContext":
        """The same context with `strength` broadcast to (B, K) (e.g. 0 for a reference-free guidance branch)."""
        return self.replace(strength=jnp.broadcast_to(jnp.asarray(strength, jnp.float32), self.strength.shape))

    def repeat_batch(self, times: int) -> "IdentityContext":
        """Tile the batch axis `times` times (e.g. to serve several guidance branches in one UNet call)."""
        shared = self.self_attention_tokens
        tiled = jax.tree.map(lambda x: jnp.concatenate([x] * times, axis=0), self.replace(self_attention_tokens=None))
        if shared is not None:  # batch-shared (leading 1) slot tokens stay shared
            shared = {k: v if v.shape[0] == 1 else jnp.concatenate([v] * times, axis=0) for k, v in shared.items()}
        return tiled.replace(self_attention_tokens=shared)

    def region_mask(self, height: int, width: int) -> jax.Array | None:
        """(B, K, h*w) bool mask of this latent level, or None when identities are not restricted to regions."""
        if self.region_masks is None:
            return None
        key = resolution_key(height, width)
        if key not in self.region_masks:
            raise ValueError(
                f"IdentityContext.region_masks has no entry for latent level {key}; has {sorted(self.region_masks)}"
            )
        return self.region_masks[key]


class ReferenceCapture:
    """Passed as `unet(..., identity=ReferenceCapture())`: run the base UNet and record, for every block that has
    an identity slot, the hidden states entering its cross-attention into `tokens` (layer_name -> (B, h*w, C)).

    A host-side collector, not a pytree: read `tokens` right after the call, inside the same traced function
    (works under jit, lax loops and remat, which Flax's mutable `sow` does not inside a loop body).

    With `self_attention_layers` (layer names), it also records those blocks' self-attention input norm1(x) into
    `self_attention_inputs` (layer_name -> (B, h*w, C)), the features a reference self-attention slot consumes."""

    def __init__(self, self_attention_layers=()):
        self.tokens: dict[str, jax.Array] = {}
        self.self_attention_layers = frozenset(self_attention_layers)
        self.self_attention_inputs: dict[str, jax.Array] = {}
