"""`IdentityContext`: the identity information the UNet's transformer blocks consume (DESIGN.md section 3).

A pytree of arrays, built by an identity method (Face Fusion here; FlashFace and FaceStudio later) and passed as
`unet(..., identity=ctx)`. Each `BasicTransformerBlock` looks up its own entries by its static `layer_name`
(its diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0`).

Cross-attention slot (Face Fusion, FaceStudio): `reference_tokens[layer]` are extra key/value inputs to that
layer's `attn2` (projected by its `to_k_ref` / `to_v_ref`). Tokens carry an identity index (`token_identity`);
`region_masks` restrict which query positions see which identity; `strength` scales each identity (0 = off,
bit-exactly). The reference self-attention slot (FlashFace) will add its own per-layer field here.
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

    @property
    def num_identities(self) -> int:
        return self.strength.shape[-1]

    def with_strength(self, strength: jax.Array | float) -> "IdentityContext":
        """The same context with `strength` broadcast to (B, K) (e.g. 0 for a reference-free guidance branch)."""
        return self.replace(strength=jnp.broadcast_to(jnp.asarray(strength, jnp.float32), self.strength.shape))

    def repeat_batch(self, times: int) -> "IdentityContext":
        """Tile the batch axis `times` times (e.g. to serve several guidance branches in one UNet call)."""
        return jax.tree.map(lambda x: jnp.concatenate([x] * times, axis=0), self)

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
    (works under jit, lax loops and remat, which Flax's mutable `sow` does not inside a loop body)."""

    def __init__(self):
        self.tokens: dict[str, jax.Array] = {}
