"""Face Fusion (seed 000): the UNet itself encodes the reference faces; new key/value projections fuse them.

Pieces (docs/DESIGN.md section 3):
- `attach_identity_projections(unet, cfg)`: gives each participating transformer block's cross-attention (`attn2`)
  new projections `to_k_ref` / `to_v_ref` (init `copy`: copies of the block's self-attention key/value
  projections, which read the same kind of spatial hidden states; `zero`: key copied, value zero, so a
  `decoupled` model starts exactly at the base model).
- `encode_references(unet, ref_latents, text_emb_empty, cfg, ...)`: runs the references through the same UNet
  (shared weights; t=0, clean latents and the empty prompt for `reference_timestep: fixed`, or noised to the
  current t for `current`) and captures, per participating layer, the hidden states entering its cross-attention
  (norm2 output) as an `IdentityContext`. With `fixed` it is computed once per image and reused at every step.
- `fusion_forward(...)`: one denoising call for `current` (reference branch at t, then the generated branch).
  Running the reference rows in a separate call is the same computation as running them in the same batch:
  reference rows never read the generated rows.
- Multi-reference: the tokens of all N references of an identity are concatenated. Multi-identity: boxes become
  per-level region masks (`region_masks_from_boxes`); a query sees only the tokens of identities whose region
  contains it; outside all regions only text.
- Training: `fusion_loss` (denoising loss; text and references dropped independently) and `trainable_filter`
  ('identity' | 'identity+lora' | 'all'); `attach_lora` adds LoRA adapters to the UNet attention projections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.identity.base import IdentityMethod, register
from fusion_jax.identity.context import IdentityContext, ReferenceCapture, resolution_key
from fusion_jax.identity.slots import LORA_TARGETS, attach_lora  # noqa: F401  (shared with the token methods)
from fusion_jax.schedulers import NoiseSchedule, add_noise, training_target

COMBINES = ("joint", "decoupled")
REFERENCE_TIMESTEPS = ("fixed", "current")
INITS = ("copy", "zero")
TRAINABLE = ("identity", "identity+lora", "all")
BLOCK_GROUPS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


@dataclass(frozen=True)
class FusionConfig:
    """`fusion.*` options of the Face Fusion method."""

    combine: Literal["joint", "decoupled"] = "joint"  # one softmax over [text; ref] or text + strength * ref attn
    reference_timestep: Literal["fixed", "current"] = "fixed"  # refs clean at t=0 (cached) or noised to current t
    init: Literal["copy", "zero"] = "copy"  # W'k, W'v from the block's self-attention, or with W'v = 0
    blocks: tuple[str, ...] = ("down", "mid", "up")  # taking part: 'down' | 'mid' | 'up' or layer-name prefixes
    reference_size: int | None = None  # latent side the references are resized to (None: as given)
    strength: float = 1.0  # default identity strength
    text_dropout: float = 0.1  # training: probability of replacing a caption by the empty prompt
    reference_dropout: float = 0.1  # training: probability of dropping a sample's references (strength 0)
    lora_rank: int = 4  # 'identity+lora': rank of the LoRA adapters on the UNet attention projections

    def __post_init__(self):
        for key, value, allowed in (("combine", self.combine, COMBINES),
                                    ("reference_timestep", self.reference_timestep, REFERENCE_TIMESTEPS),
                                    ("init", self.init, INITS)):
            if value not in allowed:
                raise ValueError(f"fusion.{key} must be one of {allowed}, got {value!r}")
        if isinstance(self.blocks, str) or not self.blocks:
            raise ValueError(f"fusion.blocks must be a non-empty list of 'down'/'mid'/'up' or layer-name prefixes, "
                             f"got {self.blocks!r}")
        for key in ("text_dropout", "reference_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"fusion.{key} must be a probability in [0, 1], got {getattr(self, key)!r}")
        if self.reference_size is not None and self.reference_size <= 0:
            raise ValueError(f"fusion.reference_size must be a positive latent size or None, got "
                             f"{self.reference_size!r}")
        if self.lora_rank <= 0:
            raise ValueError(f"fusion.lora_rank must be positive, got {self.lora_rank!r}")
        if self.strength < 0:
            raise ValueError(f"fusion.strength must be >= 0, got {self.strength!r}")


# ----------------------------------------------------------------------------------------------------------------
# model surgery
# ----------------------------------------------------------------------------------------------------------------


def participating_layers(unet, cfg: FusionConfig) -> list[str]:
    """Layer names (forward order) of the transformer blocks that take part, per `fusion.blocks`."""
    prefixes = tuple(BLOCK_GROUPS.get(b, b) for b in cfg.blocks)
    names = [n for n in unet.transformer_blocks() if n.startswith(prefixes)]
    if not names:
        raise ValueError(f"fusion.blocks={cfg.blocks!r} selects no transformer block of this UNet")
    return names


def _linear_like(src: nnx.Linear, *, rngs: nnx.Rngs) -> nnx.Linear:
    in_f, out_f = src.kernel.get_value().shape
    return nnx.Linear(in_f, out_f, use_bias=src.bias is not None, dtype=src.dtype,
                      param_dtype=src.kernel.get_value().dtype, rngs=rngs)


def attach_identity_projections(unet, cfg: FusionConfig, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Give every participating block's `attn2` new projections `to_k_ref`, `to_v_ref` (in place).

    Returns the participating layer names. Base parameters are not touched. With `init: copy` the projections
    are copies of the block's self-attention `attn1.to_k` / `attn1.to_v` (same input kind: normalised spatial
    hidden states); with `init: zero`, `to_v_ref` is zero (the key is still copied).
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    names = participating_layers(unet, cfg)
    blocks = unet.transformer_blocks()
    for name in names:
        block = blocks[name]
        attn1, attn2 = block.attn1, block.attn2
        dim = attn2.to_q.kernel.get_value().shape[0]
        if attn1.to_k.kernel.get_value().shape[0] != dim:
            raise ValueError(f"fusion.init: layer {name} has only_cross_attention (attn1 reads text), so its "
                             "self-attention projections cannot seed to_k_ref / to_v_ref")
        k_ref, v_ref = _linear_like(attn1.to_k, rngs=rngs), _linear_like(attn1.to_v, rngs=rngs)
        k_ref.kernel.set_value(attn1.to_k.kernel.get_value())
        v_ref.kernel.set_value(attn1.to_v.kernel.get_value() if cfg.init == "copy"
                               else jnp.zeros_like(attn1.to_v.kernel.get_value()))
        for new, src in ((k_ref, attn1.to_k), (v_ref, attn1.to_v)):
            if src.bias is not None:
                new.bias.set_value(src.bias.get_value() if (cfg.init == "copy" or new is k_ref)
                                   else jnp.zeros_like(src.bias.get_value()))
        attn2.to_k_ref, attn2.to_v_ref = k_ref, v_ref
        attn2.identity_combine = cfg.combine
    return names


_IDENTITY_PARAM = re.compile(r"(^|\.)to_[kv]_ref\.")
_LORA_PARAM = re.compile(r"(^|\.)lora\.lora_[ab]$")


def trainable_filter(mode: str):
    """`train.trainable` for Face Fusion -> an nnx filter `(path, value) -> bool`.

    'identity': only the new `to_k_ref` / `to_v_ref`; 'identity+lora': plus the LoRA adapters (`attach_lora`);
    'all': every parameter.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {TRAINABLE} for Face Fusion, got {mode!r}")

    def selected(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        if mode == "all":
            return True
        key = ".".join(str(p) for p in path)
        if _IDENTITY_PARAM.search(key):
            return True
        return mode == "identity+lora" and bool(_LORA_PARAM.search(key))

    return selected


# ----------------------------------------------------------------------------------------------------------------
# references -> IdentityContext
# ----------------------------------------------------------------------------------------------------------------


def check_reference_latents(ref_latents: jax.Array, batch: int, channels: int) -> jax.Array:
    """(B, N, h, w, C) or (B, K, N, h, w, C) -> (B, K, N, h, w, C); errors name `ref_latents`."""
    shape = tuple(ref_latents.shape)
    if len(shape) == 5:
        ref_latents = ref_latents[:, None]
    elif len(shape) != 6:
        raise ValueError(f"ref_latents must be (B, N, h, w, C) or (B, K, N, h, w, C) latents, got shape {shape}")
    if ref_latents.shape[0] != batch:
        raise ValueError(f"ref_latents: batch {ref_latents.shape[0]} does not match the generated batch {batch}")
    if ref_latents.shape[-1] != channels:
        raise ValueError(f"ref_latents: {ref_latents.shape[-1]} channels, the UNet takes {channels} (NHWC latents)")
    if min(ref_latents.shape[1:5]) <= 0:
        raise ValueError(f"ref_latents: empty axis in shape {shape}")
    return ref_latents


def latent_levels(unet, height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of each UNet resolution level for a (height, width) latent (as the downsamplers compute)."""
    pad = unet.config.downsample_padding
    sizes = [(height, width)]
    for _ in range(len(unet.config.block_out_channels) - 1):
        h, w = sizes[-1]
        # stride-2 3x3 conv: symmetric `pad`, or right/bottom pad 1 when pad == 0
        sizes.append(((h + 2 * pad - 3) // 2 + 1, (w + 2 * pad - 3) // 2 + 1) if pad
                     else ((h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1))
    return sizes


def region_masks_from_boxes(
    boxes: np.ndarray,
    image_size: tuple[int, int],
    levels: list[tuple[int, int]],
) -> dict[str, jax.Array]:
    """Identity boxes (B, K, 4) as pixel (x0, y0, x1, y1) in an image of `image_size` (H, W) -> per-level
    region masks {resolution_key(h, w): (B, K, h*w) bool}; a latent cell is inside if it overlaps the box."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, K, 4) pixel (x0, y0, x1, y1), got shape {boxes.shape}")
    img_h, img_w = image_size
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    bad = ~((0 <= x0) & (x0 < x1) & (x1 <= img_w) & (0 <= y0) & (y0 < y1) & (y1 <= img_h))
    if bad.any():
        b, k = np.argwhere(bad)[0]
        raise ValueError(f"boxes[{b}, {k}] = {boxes[b, k].tolist()} is not a box inside the {img_w}x{img_h} image "
                         "(need 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    masks = {}
    for h, w in levels:
        cols, rows = np.arange(w), np.arange(h)
        in_x = (cols[None, None, :] + 1 > x0[..., None] * w / img_w) & (cols[None, None, :] < x1[..., None] * w / img_w)
        in_y = (rows[None, None, :] + 1 > y0[..., None] * h / img_h) & (rows[None, None, :] < y1[..., None] * h / img_h)
        masks[resolution_key(h, w)] = jnp.asarray((in_y[..., :, None] & in_x[..., None, :]).reshape(
            boxes.shape[0], boxes.shape[1], h * w))
    return masks


def region_masks_from_pixels(masks: np.ndarray, levels: list[tuple[int, int]]) -> dict[str, jax.Array]:
    """Instance masks (B, K, H, W) bool at image resolution -> per-level region masks {resolution_key(h, w):
    (B, K, h*w) bool}; a latent cell is inside if any of its pixels is (the rule `region_masks_from_boxes` uses
    for boxes, so a box-shaped mask gives that box's masks)."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 4:
        raise ValueError(f"instance masks must be (B, K, H, W), got shape {masks.shape}")
    b, k, img_h, img_w = masks.shape
    out = {}
    for h, w in levels:
        rows = np.arange(img_h) * h // img_h  # the latent row / column each pixel row / column falls in
        cols = np.arange(img_w) * w // img_w
        by_row = np.stack([masks[:, :, rows == r].any(axis=2) for r in range(h)], axis=2)  # (B, K, h, W)
        cell = np.stack([by_row[..., cols == c].any(axis=-1) for c in range(w)], axis=-1)  # (B, K, h, w)
        out[resolution_key(h, w)] = jnp.asarray(cell.reshape(b, k, h * w))
    return out


def request_region_masks(unet, request, batch: int, k: int, image_size: tuple[int, int],
                         latent_size: tuple[int, int]) -> dict[str, jax.Array] | None:
    """The per-level region masks of a sampling request: from its instance masks (B, K, H, W) or its boxes
    (B, K, 4); None for one person without either; several people without either is an error."""
    levels = latent_levels(unet, *latent_size)
    if request.masks is not None:
        masks = np.asarray(request.masks, bool)
        if masks.shape != (batch, k) + tuple(image_size):
            raise ValueError(f"identity masks must be (B={batch}, K={k}, {image_size[0]}, {image_size[1]}) bool (one "
                             f"per person, at the generated size), got shape {masks.shape}")
        return region_masks_from_pixels(masks, levels)
    if request.boxes is not None:
        boxes = np.asarray(request.boxes, np.float64)
        if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (B={batch}, K, 4) pixel (x0, y0, x1, y1); got shape {boxes.shape}")
        if boxes.shape[1] != k:
            raise ValueError(f"boxes: {boxes.shape[1]} identity boxes for {k} reference sets; give one box per "
                             "person")
        return region_masks_from_boxes(boxes, image_size, levels)
    if k > 1:
        raise ValueError(f"references hold {k} people but no boxes or masks say where each goes; pass boxes "
                         "(B, K, 4) or identity masks (B, K, H, W)")
    return None


def strength_array(strength, batch: int, num_ids: int) -> jax.Array:
    """Per-identity strength (scalar, (K,) or (B, K)) -> (B, K) float32; errors name `strength`."""
    s = jnp.asarray(strength, jnp.float32)
    if s.ndim == 1 and s.shape[0] == num_ids:
        s = s[None]
    try:
        return jnp.broadcast_to(s, (batch, num_ids))
    except ValueError:
        raise ValueError(f"strength must be a scalar, (K,)=({num_ids},) or (B, K)=({batch}, {num_ids}), "
                         f"got shape {s.shape}") from None


_strength_array = strength_array  # older private name, kept for callers


def capture_reference_tokens(unet, latents, timesteps, encoder_hidden_states, added_cond_kwargs=None
                             ) -> dict[str, jax.Array]:
    """Run the base UNet on `latents` (M, h, w, C) and return {layer_name: (M, h_l*w_l, C_l)} of the hidden states
    entering each identity-slot layer's cross-attention."""
    capture = ReferenceCapture()
    unet(latents, timesteps, encoder_hidden_states, added_cond_kwargs, identity=capture)
    return capture.tokens


def encode_references(
    unet,
    ref_latents: jax.Array,
    text_emb_empty: jax.Array,
    cfg: FusionConfig,
    *,
    timesteps: jax.Array | int = 0,
    noise: jax.Array | None = None,
    schedule: NoiseSchedule | None = None,
    strength: jax.Array | float | None = None,
    reference_valid: jax.Array | None = None,
    boxes: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    latent_size: tuple[int, int] | None = None,
    added_cond_kwargs: dict[str, jax.Array] | None = None,
    batch: int | None = None,
) -> IdentityContext:
    """Reference latents -> `IdentityContext` (the reference branch of Face Fusion).

    Args:
      unet: the UNet with identity projections attached (same weights as the generated branch).
      ref_latents: (B, N, h, w, C) for one identity or (B, K, N, h, w, C) for K identities (VAE latents, scaled).
      text_emb_empty: (1 or B, L, D) empty-prompt embedding used by the reference rows.
      timesteps: `fixed`: 0 (references clean); `current`: the generated branch's timesteps, scalar or (B,),
        with `noise` (same shape as ref_latents) and `schedule` to noise the references to t.
      strength: per identity, scalar / (K,) / (B, K); default cfg.strength.
      reference_valid: (B, K, N) bool, False for padding references (never attended).
      boxes: (B, K, 4) pixel boxes (x0, y0, x1, y1) of each identity's region in the image of `image_size`
        (H, W); `latent_size` (h, w) of the generated latent. None: every identity is seen everywhere.
      added_cond_kwargs: SDXL text_time inputs for the reference rows (broadcast from 1 or B rows).
      batch: the generated batch size B, checked against ref_latents (default: not checked).
    """
    refs = jnp.asarray(ref_latents)
    refs = check_reference_latents(refs, refs.shape[0] if batch is None else batch, unet.config.in_channels)
    b, k, n, h, w, c = refs.shape
    if boxes is not None:
        boxes_np = np.asarray(boxes)
        if boxes_np.ndim != 3 or boxes_np.shape[0] != b:
            raise ValueError(f"boxes must be (B={b}, K, 4), got shape {boxes_np.shape}")
        if boxes_np.shape[1] > k:
            raise ValueError(f"boxes: {boxes_np.shape[1]} identity boxes but only {k} reference sets in ref_latents")
        if boxes_np.shape[1] < k:
            raise ValueError(f"boxes: {boxes_np.shape[1]} identity boxes for {k} reference sets; give one box each")
        if image_size is None or latent_size is None:
            raise ValueError("boxes need image_size (H, W) and latent_size (h, w)")
    masks = None
    if boxes is not None:
        masks = region_masks_from_boxes(boxes, image_size, latent_levels(unet, *latent_size))
    flat = refs.reshape(b * k * n, h, w, c)
    if cfg.reference_size is not None and (h, w) != (cfg.reference_size,) * 2:
        flat = jax.image.resize(flat, (b * k * n, cfg.reference_size, cfg.reference_size, c), "bilinear")
    t = jnp.asarray(timesteps)
    t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (b,))
    t_rows = jnp.repeat(t, k * n)
    if noise is not None:
        if schedule is None:
            raise ValueError("encode_references: noising references (noise given) needs `schedule`")
        noise = jnp.asarray(noise)
        noise = noise[:, None] if noise.ndim == 5 else noise
        if tuple(noise.shape) != tuple(refs.shape):
            raise ValueError(f"noise must match ref_latents {refs.shape}, got {noise.shape}")
        noise_flat = noise.reshape(b * k * n, h, w, c)
        if flat.shape != noise_flat.shape:
            noise_flat = jax.image.resize(noise_flat, flat.shape, "bilinear")
        flat = add_noise(schedule, flat, noise_flat.astype(flat.dtype), t_rows.astype(jnp.int32))
    empty = jnp.asarray(text_emb_empty)
    if empty.ndim != 3 or empty.shape[0] not in (1, b):
        raise ValueError(f"text_emb_empty must be (1 or B={b}, L, D), got shape {empty.shape}")
    empty = jnp.repeat(jnp.broadcast_to(empty, (b,) + empty.shape[1:]), k * n, axis=0)
    added = None
    if added_cond_kwargs is not None:
        added = {key: jnp.repeat(jnp.broadcast_to(v, (b,) + v.shape[1:]), k * n, axis=0)
                 for key, v in added_cond_kwargs.items()}
    captured = capture_reference_tokens(unet, flat, t_rows, empty, added)

    if reference_valid is None:
        valid = jnp.ones((b, k, n), bool)
    else:
        valid = jnp.asarray(reference_valid, bool)
        if valid.shape != (b, k, n):
            raise ValueError(f"reference_valid must be (B, K, N)={(b, k, n)}, got {valid.shape}")
    ids = jnp.where(valid, jnp.arange(k)[None, :, None], -1)  # (B, K, N)
    tokens, token_ids = {}, {}
    for name, value in captured.items():
        per_ref = value.shape[1]
        tokens[name] = value.reshape(b, k * n * per_ref, value.shape[-1])
        token_ids[name] = jnp.repeat(ids.reshape(b, k * n), per_ref, axis=1).astype(jnp.int32)
    return IdentityContext(
        reference_tokens=tokens, token_identity=token_ids,
        strength=strength_array(cfg.strength if strength is None else strength, b, k), region_masks=masks)


def fusion_forward(
    unet,
    sample: jax.Array,
    timesteps: jax.Array | int,
    encoder_hidden_states: jax.Array,
    ref_latents: jax.Array,
    text_emb_empty: jax.Array,
    cfg: FusionConfig,
    *,
    context: IdentityContext | None = None,
    schedule: NoiseSchedule | None = None,
    ref_noise: jax.Array | None = None,
    added_cond_kwargs: dict[str, jax.Array] | None = None,
    **reference_kwargs: Any,
) -> jax.Array:
    """One Face Fusion denoising call. `fixed`: uses `context` (from `encode_references`, cached across steps)
    or computes it; `current`: encodes the references noised to `timesteps` with `ref_noise` first."""
    reference_kwargs.setdefault("batch", sample.shape[0])
    if cfg.reference_timestep == "current":
        if ref_noise is None or schedule is None:
            raise ValueError("fusion.reference_timestep='current' needs ref_noise and schedule")
        context = encode_references(unet, ref_latents, text_emb_empty, cfg, timesteps=timesteps, noise=ref_noise,
                                    schedule=schedule, **reference_kwargs)
    elif context is None:
        context = encode_references(unet, ref_latents, text_emb_empty, cfg, **reference_kwargs)
    return unet(sample, timesteps, encoder_hidden_states, added_cond_kwargs, identity=context)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


def fusion_loss(unet, batch: dict[str, jax.Array], rng: jax.Array, schedule: NoiseSchedule, cfg: FusionConfig,
                encode=None):
    """Denoising loss of Face Fusion: `(loss, aux)` following the trainer's `loss_fn(model, batch, rng)` contract
    (bind `schedule` and `cfg` with functools.partial).

    batch: 'latents' (B, H, W, C) target latents; 'text_emb' (B, L, D); 'empty_text_emb' (1 or B, L, D);
    'reference_latents' (B, N, h, w, C) or (B, K, N, h, w, C) of the same person(s); optional 'reference_valid'
    (B, K, N), 'added_cond_kwargs' (SDXL text_time inputs of the targets) and 'reference_added_cond_kwargs'
    (of the reference rows, 1 or B rows; default: the targets'). The caption is replaced by the empty prompt with probability `text_dropout`, and a sample's
    references are switched off (strength 0, exactly the base model) with probability `reference_dropout`,
    independently, so both guidance terms are learnt. `encode` replaces `encode_references` (same signature; the
    single-token baseline pools its tokens).
    """
    encode = encode_references if encode is None else encode
    for key in ("latents", "text_emb", "empty_text_emb", "reference_latents"):
        if key not in batch:
            raise ValueError(f"fusion_loss: batch has no {key!r} (has {sorted(batch)})")
    x0 = batch["latents"]
    b = x0.shape[0]
    k_t, k_noise, k_text, k_ref, k_ref_noise = jax.random.split(rng, 5)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
    x_t = add_noise(schedule, x0, noise, t)
    drop_text = jax.random.bernoulli(k_text, cfg.text_dropout, (b,))
    empty = jnp.broadcast_to(batch["empty_text_emb"], batch["text_emb"].shape)
    ehs = jnp.where(drop_text[:, None, None], empty, batch["text_emb"])
    drop_ref = jax.random.bernoulli(k_ref, cfg.reference_dropout, (b,))
    refs = check_reference_latents(batch["reference_latents"], b, unet.config.in_channels)
    strength = jnp.where(drop_ref[:, None], 0.0, cfg.strength) * jnp.ones((b, refs.shape[1]))
    added = batch.get("added_cond_kwargs")
    kwargs = dict(strength=strength, reference_valid=batch.get("reference_valid"), batch=b,
                  added_cond_kwargs=batch.get("reference_added_cond_kwargs", added))
    if cfg.reference_timestep == "current":
        ref_noise = jax.random.normal(k_ref_noise, refs.shape, jnp.float32).astype(refs.dtype)
        context = encode(unet, refs, batch["empty_text_emb"], cfg, timesteps=t, noise=ref_noise,
                         schedule=schedule, **kwargs)
    else:
        context = encode(unet, refs, batch["empty_text_emb"], cfg, **kwargs)
    pred = unet(x_t, t, ehs, added, identity=context).astype(jnp.float32)
    target = training_target(schedule, x0, noise, t).astype(jnp.float32)
    loss = jnp.mean((pred - target) ** 2)
    aux = {"text_dropped": jnp.mean(drop_text.astype(jnp.float32)),
           "references_dropped": jnp.mean(drop_ref.astype(jnp.float32))}
    return loss, aux


def fusion_state_dict_keys(unet) -> list[str]:
    """Torch-style names of the identity projections (e.g. to save / load them apart from the base UNet)."""
    from fusion_jax import weights

    return [k for k in weights.torch_keys(unet) if _IDENTITY_PARAM.search(k)]


# ----------------------------------------------------------------------------------------------------------------
# The method (registered; the sampler, trainer, CLI and export reach Face Fusion only through this)
# ----------------------------------------------------------------------------------------------------------------


@register
class FaceFusion(IdentityMethod):
    """Face Fusion behind the identity-method interface (`fusion_jax.identity.base`)."""

    name = "face_fusion"
    section = "fusion"
    config_class = FusionConfig
    trainable_presets = ("identity", "identity+lora")
    display_name = "Face Fusion"
    accepts_identity_masks = True  # regions from instance masks as well as boxes

    def reference_context(self, unet, ref_latents, text_emb_empty, cfg, **kwargs) -> IdentityContext:
        """References -> IdentityContext (`encode_references`); the one place subclasses change the tokens."""
        return encode_references(unet, ref_latents, text_emb_empty, cfg, **kwargs)

    # model
    def attach(self, unet, cfg: FusionConfig, *, trainable: str = "all", rngs=None):
        attach_identity_projections(unet, cfg, rngs=rngs)
        if trainable == "identity+lora":
            attach_lora(unet, cfg.lora_rank, rngs=rngs)
        return unet

    def trainable_filter(self, preset: str, cfg: FusionConfig):
        return trainable_filter(preset)

    # training
    def loss(self, model, batch, rng, schedule, cfg: FusionConfig):
        return fusion_loss(model, batch, rng, schedule, cfg, encode=self.reference_context)

    # sampling
    def sampling_inputs(self, model, cfg: FusionConfig, request, *, batch, image_size, latent_size):
        if not any(block.attn2.has_identity_slot for block in model.transformer_blocks().values()):
            raise ValueError("references given, but the UNet has no identity projections: load a trained Face Fusion "
                             "model or call fusion_jax.identity.fusion.attach_identity_projections(unet, cfg) first")
        k = np.shape(request.references)[1]
        out = {"strength": strength_array(cfg.strength if request.strength is None else request.strength, batch, k)}
        masks = request_region_masks(model, request, batch, k, image_size, latent_size)
        if masks is not None:
            out["region_masks"] = masks
        return out

    def _context(self, model, cfg, parts, t=0, noise=None) -> IdentityContext:
        inputs = parts.inputs
        ctx = self.reference_context(model, parts.ref_latents, parts.empty_text, cfg, timesteps=t, noise=noise,
                                     schedule=parts.schedule if noise is not None else None,
                                     strength=inputs["strength"], reference_valid=inputs["reference_valid"],
                                     batch=parts.batch)
        return ctx.replace(region_masks=inputs.get("region_masks"))

    def encode_references(self, model, cfg: FusionConfig, parts, key):
        """`fixed`: the reference branch once (clean references, empty prompt), reused at every step."""
        return self._context(model, cfg, parts) if cfg.reference_timestep == "fixed" else None

    def guided_prediction(self, model, cfg: FusionConfig, sampling_cfg, cache, parts, x_in, t, step, key):
        """`current` re-encodes the references noised to this step's t (noise drawn from `key` and the step)."""
        from fusion_jax.sampling import identity_guided_prediction

        context = cache
        if context is None:
            ref_latents = parts.ref_latents
            ref_noise = jax.random.normal(jax.random.fold_in(key, step), ref_latents.shape, jnp.float32)
            context = self._context(model, cfg, parts, jnp.round(t).astype(jnp.int32),
                                    ref_noise.astype(ref_latents.dtype))
        return identity_guided_prediction(model, x_in, t, parts.text_uncond, parts.text_cond, context, sampling_cfg)

    # export
    def export_tensors(self, model, cfg: FusionConfig) -> dict[str, np.ndarray]:
        from fusion_jax import weights

        return {k: v for k, v in weights.state_dict(model).items() if _IDENTITY_PARAM.search(k)}

    def load_tensors(self, unet, cfg: FusionConfig, tensors, source: str):
        from fusion_jax import weights

        attach_identity_projections(unet, cfg)
        weights.load_state_dict(unet, tensors, allow_missing=(r".*",), source=source)
        missing = set(fusion_state_dict_keys(unet)) - set(tensors)
        if missing:
            raise ValueError(f"{source}: identity modules missing from the file: {sorted(missing)[:5]}")
        return unet

    # CLI: the generic reference flags (--reference-strength, --identity-box, --guidance-form ...) cover it.


__all__ = [
    "FaceFusion", "FusionConfig", "attach_identity_projections", "attach_lora", "trainable_filter", "participating_layers",
    "check_reference_latents", "latent_levels", "strength_array", "region_masks_from_boxes", "region_masks_from_pixels",
    "request_region_masks", "capture_reference_tokens",
    "encode_references", "fusion_forward", "fusion_loss", "fusion_state_dict_keys",
]
