"""FlashFace (Zhang et al., arXiv 2403.17008) as an identity method, as the released code computes it.

The released model (github ali-vilab/FlashFace, `flashface/all_finetune`) in our diffusers-shaped modules:

- **ReferenceNet**: a second copy of the UNet's `conv_in`, down blocks and up blocks (`FlashFaceModel.reference_net`)
  runs on the clean reference latents (224 px crops -> 28x28) at the *current* timestep with the negative-prompt
  context. As released, the reference pass uses the *main* UNet's time embedding and mid block (the checkpoint's
  `ref_middle` copy is never called). At every transformer block of the mid block and the decoder it records the
  self-attention input y = norm1(x): `FlashFaceModel.reference_features` -> {layer: (R, L, C)}.
- **Reference attention** in the main UNet's mid / decoder blocks: the generic reference self-attention slot
  (`BasicTransformerBlock.attn_ref`, SA', initialised as a copy of the block's `attn1`) adds
  `lambda * SA'(y, [y; ref_1..ref_R]) + (1 - lambda) * SA'(y, y)` beside the kept self-attention SA(y); the tokens
  of all R references are concatenated, no mask.
- **Face position mask**: a 5th input channel of the main UNet (`conv_in` gets a zero-initialised 5th input
  channel); the released demo fills a square of side max(x2 - y1, y2 - y1) (sic: its typo for max(w, h); option
  `mask_side`) anchored at the box's top-left on the pixel grid, then strides it down by 8.
- **Guidance** (`guided_noise`): above the gate (any t > gate) a 2-way batch [text, negative], both with the
  references at lambda_before (0.85): out = u + g_text (y - u); at and below it a 3-way batch
  [text + refs, text, negative] with lambda [lambda, 0, 0]: out = u + g_text (y - u) + g_ref (y_ref - y). Then
  guidance rescale with the std of the text branch y (the reference-free one in the 3-way case):
  out *= phi * std(y) / (std(out) + 1e-12) + (1 - phi). The reference pass runs once per call at `timesteps[0]`.
- **Checkpoint** (`load_flashface`): the released `flashface.ckpt` (LDM-style names: `time_embedding`, `encoder`,
  `middle`, `decoder`, `head`, `ref_encoder`, `ref_decoder`, `ref_middle`, `ori_encoder`, `ori_decoder`,
  `ori_middle`; the `ori_*` copies are what the released code uses, `encoder` / `middle` / `decoder` are aliases of
  them, `ref_middle` is unused) or a safetensors file with the same keys, or a folder from
  `python -m fusion_jax.convert flashface`.

Sampling through the interface (`FlashFace`): `sampling_inputs` cycles the references to `num_references` (4) and
builds the mask from the caller's pixel box or `flashface.face_box` (`--face-box`, normalised); `encode_references`
caches nothing for the released `current` mode (the reference pass depends on t) and the t=0 features for
`cached`; `guided_prediction` reads the sampling config's guidance_scale, reference_guidance_scale,
reference_guidance_max_timestep (the gate) and guidance_rescale (`preset('code' | 'paper')` sets them).
Reference photos for FlashFace must show exactly one face each (`reference_crops`).

Deliberate differences from the released script (documented, tested): references are padded to 4 by cycling
through the given ones (the demo picks random duplicates); with several samples the mask and timesteps are paired
with their own sample in every guidance branch (the released `repeat_interleave` only agrees when all samples share
one mask and one t, which the demo always has).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.identity.base import IdentityMethod, ReferenceRequest, SamplingParts, register
from fusion_jax.identity.context import IdentityContext, ReferenceCapture

PRESETS = ("code", "paper")
REFERENCE_TIMESTEPS = ("current", "cached")
MASK_SIDES = ("released", "max_wh")
INITS = ("copy", "zero")
TRAINABLE = ("reference",)

# diffusers' config.json of the Stable Diffusion 1.5 UNet (the base FlashFace was trained on)
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# the released UNet's GroupNorms (resnets, output head) use eps 1e-6 where diffusers' SD 1.5 config says 1e-5
RELEASED_NORM_EPS = 1e-6


@dataclass(frozen=True)
class FlashFaceConfig:
    """`flashface.*` options of the FlashFace method."""

    feature_strength: float = 1.2  # lambda of the reference branch at and below the gate (released default 1.2)
    feature_strength_before_gate: float = 0.85  # lambda of both branches of the 2-way batch above the gate
    num_references: int = 4  # references per generation (the released model always sees 4); fewer are cycled
    reference_size: int = 224  # pixel side of the reference crops (-> 28x28 latents)
    reference_timestep: Literal["current", "cached"] = "current"  # ReferenceNet at each step's t (released), or
    #                                                             # once at t=0, reused by every step ('cached')
    mask_side: Literal["released", "max_wh"] = "released"  # face-mask square side: max(x2 - y1, y2 - y1) as the
    #                                                      # released demo computes it, or max(x2 - x1, y2 - y1)
    init: Literal["copy", "zero"] = "copy"  # SA' from attn1; 'zero' also zeroes its output projection (base model)
    text_dropout: float = 0.1  # training: probability of replacing a caption by the empty prompt
    reference_dropout: float = 0.1  # training: probability of dropping a sample's references and mask together
    face_box: Optional[tuple[float, ...]] = None  # normalised (x1, y1, x2, y2) face position (--face-box), used
    #                                             # when the caller passes no pixel boxes; None: no mask

    def __post_init__(self):
        if self.face_box is not None:
            object.__setattr__(self, "face_box", normalized_box(self.face_box, "flashface.face_box"))
        for key, value, allowed in (("reference_timestep", self.reference_timestep, REFERENCE_TIMESTEPS),
                                    ("mask_side", self.mask_side, MASK_SIDES), ("init", self.init, INITS)):
            if value not in allowed:
                raise ValueError(f"flashface.{key} must be one of {allowed}, got {value!r}")
        for key in ("feature_strength", "feature_strength_before_gate"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and np.isfinite(value)):
                raise ValueError(f"flashface.{key} must be a finite number, got {value!r}")
        for key in ("text_dropout", "reference_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"flashface.{key} must be a probability in [0, 1], got {getattr(self, key)!r}")
        if not isinstance(self.num_references, int) or self.num_references < 1:
            raise ValueError(f"flashface.num_references must be a positive int, got {self.num_references!r}")
        if not isinstance(self.reference_size, int) or self.reference_size < 8:
            raise ValueError(f"flashface.reference_size must be an int >= 8 pixels, got {self.reference_size!r}")

    @property
    def strength(self) -> float:
        """The identity strength generic callers read (the CLI's default --reference-strength): feature_strength."""
        return self.feature_strength


@dataclass(frozen=True)
class Guidance:
    """One step's guidance settings (`guided_noise`); `preset('code')` are the released defaults."""

    text: float = 7.5  # g_text
    reference: float = 3.2  # g_ref of the 3-way batch; <= 0: always the 2-way batch
    gate: Optional[int] = 750  # 2-way batch while any t > gate; None: always 3-way (the paper's form)
    feature_strength: Any = 1.2  # lambda of the reference branch at / below the gate: scalar or (B,)
    feature_strength_before_gate: Any = 0.85  # lambda of both 2-way branches: scalar or (B,)
    rescale: float = 0.5  # guidance rescale phi (0 = off)


def preset(name: str, flag: str = "--preset") -> dict[str, Any]:
    """The settings of a preset: 'code' (the released notebook: DDIM trailing 35 steps, g_text 7.5, g_ref 3.2,
    gate 750, lambda 1.2 / 0.85 before the gate, rescale 0.5) or 'paper' (lambda 0.85, g_ref 2, no gate, DDIM 50;
    the paper states no rescale). Keys: 'flashface' (FlashFaceConfig fields), 'sampling' (SamplingConfig fields),
    'guidance' (a Guidance)."""
    if name == "code":
        ff = dict(feature_strength=1.2, feature_strength_before_gate=0.85)
        sampling = dict(num_steps=35, guidance_scale=7.5, reference_guidance_scale=3.2,
                        reference_guidance_max_timestep=750, guidance_rescale=0.5, scheduler="ddim",
                        scheduler_options=(("timestep_spacing", "trailing"),), reference_guidance="disentangled")
    elif name == "paper":
        ff = dict(feature_strength=0.85, feature_strength_before_gate=0.85)
        sampling = dict(num_steps=50, guidance_scale=7.5, reference_guidance_scale=2.0,
                        reference_guidance_max_timestep=None, guidance_rescale=0.0, scheduler="ddim",
                        scheduler_options=(("timestep_spacing", "trailing"),), reference_guidance="disentangled")
    else:
        raise ValueError(f"{flag}: unknown FlashFace preset {name!r}; choose one of {PRESETS}")
    guidance = Guidance(text=sampling["guidance_scale"], reference=sampling["reference_guidance_scale"],
                        gate=sampling["reference_guidance_max_timestep"], rescale=sampling["guidance_rescale"], **ff)
    return {"flashface": ff, "sampling": sampling, "guidance": guidance}


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------


class ReferenceNet(nnx.Module):
    """The ReferenceNet's own weights: `conv_in` (4 channels), `down_blocks`, `up_blocks` of a UNet copy. Its mid
    block and time embedding are the main UNet's (as the released code runs it)."""

    def __init__(self, unet):
        self.config = unet.config
        self.conv_in = unet.conv_in
        self.down_blocks = unet.down_blocks
        self.up_blocks = unet.up_blocks


def reference_layers(unet) -> list[str]:
    """Names (forward order) of the transformer blocks that take references: those of the mid block and decoder."""
    return [n for n in unet.transformer_blocks() if n.startswith(("mid_block.", "up_blocks."))]


class FlashFaceModel(nnx.Module):
    """The FlashFace identity model: `unet` (the main UNet: 5 input channels = latents + face mask, reference
    self-attention slots in its mid / decoder blocks) and `reference_net` (`ReferenceNet`).

    `config` is the latent-space / base architecture config (C input channels: 4 for SD latents);
    `unet.config` has C + 1 (the mask).
    """

    def __init__(self, unet, reference_net: ReferenceNet):
        self.unet = unet
        self.reference_net = reference_net
        self.layers = tuple(reference_layers(unet))

    @property
    def config(self):
        return self.reference_net.config

    def reference_features(self, references: jax.Array, timestep, reference_context: jax.Array
                           ) -> dict[str, jax.Array]:
        """The reference pass: `references` (R, h, w, 4) clean latents at `timestep` (scalar, or (R,) one per
        reference) with `reference_context` (R, T, D) -> {layer_name: (R, L, C)} of norm1(x) at each mid / decoder
        transformer block."""
        unet, ref = self.unet, self.reference_net
        references = jnp.asarray(references)
        if references.ndim != 4 or references.shape[-1] != ref.config.in_channels:
            raise ValueError(f"flashface: references must be (R, h, w, {ref.config.in_channels}) NHWC latents, got "
                             f"shape {references.shape}")
        r = references.shape[0]
        reference_context = jnp.asarray(reference_context)
        if reference_context.ndim != 3 or reference_context.shape[0] != r:
            raise ValueError(f"flashface: reference_context must be (R={r}, T, D), got {reference_context.shape}")
        t = jnp.asarray(timestep)
        t = t.reshape(()) if t.size == 1 else t
        emb = unet._time_embedding(t, r, None)
        ehs = reference_context.astype(unet.dtype)
        h = references.astype(unet.dtype)
        if ref.config.center_input_sample:
            h = 2 * h - 1.0
        capture = ReferenceCapture(self_attention_layers=self.layers)
        h = ref.conv_in(h)
        skips = [h]
        for block in ref.down_blocks:
            h, block_skips = block(h, emb, ehs, None)
            skips.extend(block_skips)
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb, ehs, capture)
        for block in ref.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, block_skips, emb, ehs, capture, upsample_size=upsample_size)
        missing = [n for n in self.layers if n not in capture.self_attention_inputs]
        if missing:
            raise ValueError(f"flashface: the reference pass recorded no features for {missing}")
        return {name: capture.self_attention_inputs[name] for name in self.layers}

    def denoise(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array, features: dict,
                feature_strength) -> jax.Array:
        """The main UNet on `sample` (B, H, W, 5) with reference `features` from `reference_features`: shared
        {layer: (R, L, C)} or per sample {layer: (B, R, L, C)}; `feature_strength` lambda, scalar or (B,)."""
        sample = jnp.asarray(sample)
        b = sample.shape[0]
        tokens = {}
        for name in self.layers:
            if name not in features:
                raise ValueError(f"flashface: features have no entry for layer {name!r} (has {sorted(features)})")
            v = features[name]
            if v.ndim == 3:
                tokens[name] = v.reshape(1, v.shape[0] * v.shape[1], v.shape[2])
            elif v.ndim == 4 and v.shape[0] == b:
                tokens[name] = v.reshape(b, v.shape[1] * v.shape[2], v.shape[3])
            else:
                raise ValueError(f"flashface: features[{name!r}] must be (R, L, C) or (B={b}, R, L, C), got {v.shape}")
        lam = jnp.asarray(feature_strength, jnp.float32)
        if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape[0] != b):
            raise ValueError(f"flashface: feature_strength must be a scalar or (B={b},), got shape {lam.shape}")
        ctx = IdentityContext.self_attention_only(tokens, jnp.broadcast_to(lam, (b,)))
        return self.unet(sample, timesteps, encoder_hidden_states, identity=ctx)

    def __call__(self, sample, timesteps, encoder_hidden_states, references=None, reference_context=None,
                 feature_strength=None, **unused):
        """Noise prediction (B, H, W, 4) for `sample` (B, H, W, 5) (latents + mask channel); the reference pass on
        `references` (R, h, w, 4) with `reference_context` (R, T, D) uses `timesteps[0]`."""
        if references is None or reference_context is None or feature_strength is None:
            raise ValueError("flashface: FlashFaceModel needs references, reference_context and feature_strength "
                             "(it is not a plain UNet: generate without references with the base pipeline)")
        sample = jnp.asarray(sample)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (sample.shape[0],))
        features = self.reference_features(references, t[0], reference_context)
        return self.denoise(sample, t, encoder_hidden_states, features, feature_strength)


# ----------------------------------------------------------------------------------------------------------------
# building the model from a base UNet
# ----------------------------------------------------------------------------------------------------------------


def _conv_like(src: nnx.Conv, in_features: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    kernel = src.kernel.get_value()
    return nnx.Conv(in_features, kernel.shape[-1], kernel.shape[:2], strides=src.strides, padding=src.padding,
                    use_bias=src.bias is not None, dtype=src.dtype, param_dtype=kernel.dtype, rngs=rngs)


def attach_flashface(unet, cfg: FlashFaceConfig, *, rngs: nnx.Rngs | None = None) -> FlashFaceModel:
    """Turn a base UNet (in place) into the main UNet of a `FlashFaceModel` and build the ReferenceNet as a copy
    of it. The base UNet's input channels C equal its output channels (4 for SD latents, 12 for the miniature's
    2x2-folded pixels); conv_in gets a (C+1)-th, zero input channel (the face mask); every mid / decoder
    transformer block gets `attn_ref` (a copy of its `attn1`; init 'zero' zeroes the copy's output projection).
    A UNet that already has C+1 input channels (an export's `unet/`) keeps its conv_in and gets a ReferenceNet
    with a fresh C-channel conv_in, to be filled by `load_tensors`."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    channels, latent_channels = unet.config.in_channels, unet.config.out_channels
    if channels not in (latent_channels, latent_channels + 1):
        raise ValueError(f"flashface: the base UNet must have as many input channels as output channels "
                         f"({latent_channels}), or one more for an exported FlashFace UNet (the mask), got "
                         f"in_channels={channels}")
    reference_unet = nnx.clone(unet)
    latent_config = dataclasses.replace(unet.config, in_channels=latent_channels)
    if channels == latent_channels + 1:
        reference_unet.conv_in = _conv_like(unet.conv_in, latent_channels, rngs=rngs)
    else:
        old = unet.conv_in
        new = _conv_like(old, latent_channels + 1, rngs=rngs)
        kernel = old.kernel.get_value()
        if isinstance(kernel, jax.ShapeDtypeStruct):  # a shape-only model (the trainer's abstract pass)
            new.kernel.set_value(jax.ShapeDtypeStruct(kernel.shape[:2] + (latent_channels + 1,) + kernel.shape[3:],
                                                      kernel.dtype))
        else:
            new.kernel.set_value(jnp.concatenate([kernel, jnp.zeros(kernel.shape[:2] + (1,) + kernel.shape[3:],
                                                                    kernel.dtype)], axis=2))
        if old.bias is not None:
            new.bias.set_value(old.bias.get_value())
        unet.conv_in = new
        unet.config = dataclasses.replace(unet.config, in_channels=latent_channels + 1)
    reference_unet.config = latent_config
    blocks = unet.transformer_blocks()
    for name in reference_layers(unet):
        block = blocks[name]
        if block.only_cross_attention:
            raise ValueError(f"flashface: layer {name} has only_cross_attention (attn1 reads text), so it has no "
                             "self-attention to attend to references")
        if block.attn_ref is None:
            block.attn_ref = nnx.clone(block.attn1)
            if cfg.init == "zero":
                out = block.attn_ref.to_out[0]
                for var in (out.kernel, out.bias) if out.bias is not None else (out.kernel,):
                    if not isinstance(var.get_value(), jax.ShapeDtypeStruct):
                        var.set_value(jnp.zeros_like(var.get_value()))
    return FlashFaceModel(unet, ReferenceNet(reference_unet))


def build_flashface_model(unet_config, cfg: FlashFaceConfig | None = None, *, dtype=jnp.float32,
                          param_dtype=jnp.float32, abstract: bool = False, seed: int = 0) -> FlashFaceModel:
    """A FlashFaceModel for a 4-channel base `UNetConfig` (random init; shape-only with `abstract`)."""
    from fusion_jax.models.unet import UNet2DConditionModel

    cfg = cfg or FlashFaceConfig()

    def make():
        unet = UNet2DConditionModel(unet_config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
        return attach_flashface(unet, cfg, rngs=nnx.Rngs(seed + 1))

    return nnx.eval_shape(make) if abstract else make()


# ----------------------------------------------------------------------------------------------------------------
# guidance
# ----------------------------------------------------------------------------------------------------------------


def _rescale(out: jax.Array, text: jax.Array, phi: float) -> jax.Array:
    """Guidance rescale as released: out * (phi * std(text) / (std(out) + 1e-12) + 1 - phi), per sample."""
    if not phi:
        return out
    axes = tuple(range(1, out.ndim))
    ratio = jnp.std(text, axis=axes, keepdims=True, ddof=1) / (jnp.std(out, axis=axes, keepdims=True, ddof=1) + 1e-12)
    return out * (phi * ratio + (1.0 - phi))


def _tile(x, times: int):
    return jnp.concatenate([x] * times, axis=0)


def _tile_features(features: dict, times: int) -> dict:
    """Per-sample features (B, R, L, C) tiled for `times` guidance branches; shared (R, L, C) stay shared."""
    return {k: v if v.ndim == 3 else _tile(v, times) for k, v in features.items()}


def guided_from_features(ff: FlashFaceModel, x_t, t, context, negative_context, features: dict, face_mask,
                         guidance: Guidance) -> jax.Array:
    """`guided_noise` with the reference features already computed (shared or per sample, see `denoise`)."""
    x_t = jnp.asarray(x_t)
    b = x_t.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (b,))
    face_mask = jnp.asarray(face_mask, x_t.dtype)
    if face_mask.shape != x_t.shape[:3] + (1,):
        raise ValueError(f"flashface: face_mask must be (B, H, W, 1)={x_t.shape[:3] + (1,)}, got {face_mask.shape}")
    sample = jnp.concatenate([x_t, face_mask], axis=-1)
    strength = jnp.broadcast_to(jnp.asarray(guidance.feature_strength, jnp.float32), (b,))
    before = jnp.broadcast_to(jnp.asarray(guidance.feature_strength_before_gate, jnp.float32), (b,))

    def two_way(lam):
        out = ff.denoise(_tile(sample, 2), _tile(t, 2), jnp.concatenate([context, negative_context], axis=0),
                         _tile_features(features, 2), _tile(lam, 2)).astype(jnp.float32)
        y, u = out[:b], out[b:]
        return _rescale(u + guidance.text * (y - u), y, guidance.rescale)

    def three_way():
        lam = jnp.concatenate([strength, jnp.zeros((2 * b,), jnp.float32)])
        out = ff.denoise(_tile(sample, 3), _tile(t, 3),
                         jnp.concatenate([context, context, negative_context], axis=0),
                         _tile_features(features, 3), lam).astype(jnp.float32)
        y_ref, y, u = out[:b], out[b:2 * b], out[2 * b:]
        return _rescale(u + guidance.text * (y - u) + guidance.reference * (y_ref - y), y, guidance.rescale)

    if guidance.gate is None:
        above = jnp.asarray(False)
    else:
        above = jnp.any(t > guidance.gate)
    if guidance.reference <= 0:  # released: no reference guidance -> always the 2-way batch
        return two_way(jnp.where(above, before, strength))
    if guidance.gate is None:
        return three_way()
    return jax.lax.cond(above, lambda: two_way(before), three_way)


def guided_noise(ff: FlashFaceModel, x_t, t, context, negative_context, references, reference_context, face_mask,
                 guidance: Guidance) -> jax.Array:
    """The combined prediction of one step (see the module docstring): `x_t` (B, H, W, 4), `t` (B,), `context` /
    `negative_context` (B, T, D), `references` (R, h, w, 4) clean latents, `reference_context` (R, T, D),
    `face_mask` (B, H, W, 1) at latent resolution. The reference pass runs once, at t[0]."""
    t = jnp.asarray(t).reshape(-1)
    features = ff.reference_features(references, t[0], reference_context)
    return guided_from_features(ff, x_t, t, context, negative_context, features, face_mask, guidance)


# ----------------------------------------------------------------------------------------------------------------
# face mask, references
# ----------------------------------------------------------------------------------------------------------------


def face_mask(boxes, image_size: tuple[int, int], latent_size: tuple[int, int], mask_side: str = "released",
              flag: str = "boxes") -> np.ndarray:
    """Pixel face boxes (B, 4) (x1, y1, x2, y2) in an image of `image_size` (H, W) -> (B, h, w, 1) float32 masks at
    `latent_size`: a square of side max(x2 - y1, y2 - y1) ('released', the demo's formula) or max(w, h) ('max_wh')
    anchored at (x1, y1) on the pixel grid, strided down to the latent grid. An all-zero box means no mask."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{flag}: face boxes must be (B, 4) pixel (x1, y1, x2, y2), got shape {boxes.shape}")
    img_h, img_w = image_size
    lat_h, lat_w = latent_size
    if img_h % lat_h or img_w % lat_w or img_h // lat_h != img_w // lat_w:
        raise ValueError(f"{flag}: image size {image_size} is not a whole multiple of the latent size {latent_size}")
    stride = img_h // lat_h
    out = np.zeros((boxes.shape[0], lat_h, lat_w, 1), np.float32)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = box
        if not np.all(np.isfinite(box)) or not (0 <= x1 <= x2 <= img_w and 0 <= y1 <= y2 <= img_h):
            raise ValueError(f"{flag}[{i}] = {box.tolist()} is not a box inside the {img_w}x{img_h} image "
                             "(need 0 <= x1 <= x2 <= width, 0 <= y1 <= y2 <= height)")
        x1, y1, x2, y2 = (int(v) for v in box)
        side = max(x2 - y1, y2 - y1) if mask_side == "released" else max(x2 - x1, y2 - y1)
        if side <= 0:
            continue
        full = np.zeros((img_h, img_w), np.float32)
        full[y1:y1 + side, x1:x1 + side] = 1.0
        out[i, :, :, 0] = full[::stride, ::stride]
    return out


def normalized_box(value, flag: str = "--face-box") -> tuple[float, float, float, float]:
    """'x1,y1,x2,y2' (or 4 numbers) normalised to [0, 1] -> a tuple; errors name `flag`."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        box = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: expected x1,y1,x2,y2 as numbers in [0, 1], got {value!r}") from None
    if len(box) != 4:
        raise ValueError(f"{flag}: expected 4 numbers x1,y1,x2,y2, got {value!r}")
    x1, y1, x2, y2 = box
    if not all(np.isfinite(box)) or not (0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1):
        raise ValueError(f"{flag}: {value!r} is not a box inside [0, 1] (need 0 <= x1 <= x2 <= 1, 0 <= y1 <= y2 <= 1)")
    return box


def reference_crops(paths, analyzer, size: int = 224, margin: float | None = None, flag: str = "--reference"
                    ) -> np.ndarray:
    """Reference photos -> (N, size, size, 3) float32 crops in [-1, 1]. Each photo must show exactly one face (as
    the released demo requires); errors name the flag and the file."""
    from fusion_jax import references as refs_lib
    from fusion_jax.data.faces import align_face
    from fusion_jax.data.images import read_image

    margin = refs_lib.DEFAULT_MARGIN if margin is None else margin
    if not paths:
        raise refs_lib.ReferenceError(f"{flag}: no reference photos")
    crops = []
    for path in paths:
        try:
            image = read_image(path)
        except Exception as e:
            raise refs_lib.ReferenceError(f"{flag} {path}: cannot read the photo ({e})") from e
        faces = analyzer.detect(image, with_embeddings=False)
        if len(faces) != 1:
            what = "no face" if not faces else f"{len(faces)} faces"
            raise refs_lib.ReferenceError(f"{flag} {path}: found {what} in the photo; FlashFace needs exactly one "
                                          "face per reference photo")
        crops.append(align_face(image, faces[0].landmarks, size, margin).astype(np.float32) / 127.5 - 1.0)
    return np.stack(crops)


def pad_references(references: np.ndarray, valid: Optional[np.ndarray], count: int, flag: str = "references"
                   ) -> np.ndarray:
    """(B, N, H, W, 3) references with (B, N) validity -> (B, count, H, W, 3): the valid ones, cycled to `count`."""
    b, n = references.shape[:2]
    valid = np.ones((b, n), bool) if valid is None else np.asarray(valid, bool).reshape(b, n)
    out = np.empty((b, count) + references.shape[2:], references.dtype)
    for i in range(b):
        idx = np.flatnonzero(valid[i])
        if idx.size == 0:
            raise ValueError(f"{flag}: example {i} has no (valid) reference")
        if idx.size > count:
            raise ValueError(f"{flag}: example {i} has {idx.size} references; FlashFace takes at most {count} "
                             "(flashface.num_references)")
        out[i] = references[i, idx[np.arange(count) % idx.size]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# the released checkpoint
# ----------------------------------------------------------------------------------------------------------------

_RESNET = (("norm1", "layer1.0"), ("conv1", "layer1.2"), ("time_emb_proj", "embedding.1"), ("norm2", "layer2.0"),
           ("conv2", "layer2.3"), ("conv_shortcut", "shortcut"))
_TRANSFORMER = (("norm", "norm1"), ("proj_in", "conv1"), ("proj_out", "conv2"))
_BLOCK = (("attn_ref", "self_attn.self_attn_first"), ("attn1", "self_attn"), ("attn2", "cross_attn"),
          ("ff.net.0.proj", "ffn.0.proj"), ("ff.net.2", "ffn.2"), ("norm1", "norm1"), ("norm2", "norm2"),
          ("norm3", "norm3"))
_ATTN = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))


def _rename(rest: str, table) -> str:
    for ours, theirs in table:
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def _resnet_key(rest: str) -> str:
    return _rename(rest, _RESNET)


def _transformer_key(rest: str) -> str:
    m = re.match(r"transformer_blocks\.(\d+)\.(.*)$", rest)
    if not m:
        return _rename(rest, _TRANSFORMER)
    inner = m.group(2)
    renamed = _rename(inner, _BLOCK)
    for ours, theirs in (("attn_ref", "self_attn.self_attn_first"), ("attn1", "self_attn"), ("attn2", "cross_attn")):
        if inner.startswith(ours + "."):
            renamed = theirs + "." + _rename(inner[len(ours) + 1:], _ATTN)
            break
    return f"blocks.{m.group(1)}.{renamed}"


def released_module_map(config) -> dict[str, str]:
    """Our module prefixes (diffusers paths of a UNet with `config`) -> the released LDM-style module prefixes
    (without the `encoder` / `ori_encoder` / `ref_encoder` root choice: 'E.' / 'M.' / 'D.' stand for encoder,
    middle and decoder)."""
    n = len(config.block_out_channels)
    layers = config.layers()
    out = {"conv_in": "E.0", "time_embedding.linear_1": "time_embedding.0",
           "time_embedding.linear_2": "time_embedding.2", "conv_norm_out": "head.0", "conv_out": "head.2"}
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            out[f"down_blocks.{i}.resnets.{j}"] = f"E.{k}.0"
            if config.down_block_types[i] == "CrossAttnDownBlock2D":
                out[f"down_blocks.{i}.attentions.{j}"] = f"E.{k}.1"
            k += 1
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"E.{k}"
            k += 1
    out["mid_block.resnets.0"] = "M.0"
    out["mid_block.attentions.0"] = "M.1"
    out["mid_block.resnets.1"] = "M.2"
    k = 0
    rev_layers = list(reversed(layers))
    for u in range(n):
        for j in range(rev_layers[u] + 1):
            out[f"up_blocks.{u}.resnets.{j}"] = f"D.{k}.0"
            idx = 1
            if config.up_block_types[u] == "CrossAttnUpBlock2D":
                out[f"up_blocks.{u}.attentions.{j}"] = f"D.{k}.1"
                idx = 2
            if u < n - 1 and j == rev_layers[u]:
                out[f"up_blocks.{u}.upsamplers.0.conv"] = f"D.{k}.{idx}.1"
            k += 1
    return out


def released_key(our_key: str, module_map: dict[str, str]) -> str:
    """One of our FlashFaceModel keys (e.g. 'unet.mid_block.attentions.0.transformer_blocks.0.attn_ref.to_q.weight',
    'reference_net.down_blocks.0.resnets.0.norm1.weight') -> its key in the released checkpoint."""
    root, _, key = our_key.partition(".")
    roots = {"unet": {"E": "ori_encoder", "M": "ori_middle", "D": "ori_decoder"},
             "reference_net": {"E": "ref_encoder", "D": "ref_decoder"}}[root]
    for prefix in sorted(module_map, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            target = module_map[prefix]
            rest = key[len(prefix) + 1:]
            if ".resnets." in prefix:
                rest = _resnet_key(rest)
            elif ".attentions." in "." + prefix:
                rest = _transformer_key(rest)
            head, _, tail = target.partition(".")
            if head in roots:
                target = roots[head] + "." + tail
            elif root != "unet":  # the ReferenceNet has only conv_in, down and up blocks
                break
            return f"{target}.{rest}"
    raise KeyError(f"flashface: no released name for parameter {our_key!r}")


_ALIASES = {"encoder.": "ori_encoder.", "middle.": "ori_middle.", "decoder.": "ori_decoder."}
_UNUSED = ("ref_middle.",)


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    if leaf in ("weight",) and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf in ("weight",) and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _our_torch_shapes(model) -> dict[str, tuple]:
    from fusion_jax import weights

    shapes = {}
    for path, var in weights._param_variables(model).items():
        key = weights._torch_key(path)
        shapes[key] = _torch_shape(key.rsplit(".", 1)[-1], tuple(var.get_value().shape))
    return shapes


def convert_released_state_dict(tensors: dict, model, source: str) -> dict[str, np.ndarray]:
    """Released-layout tensors -> our torch-style names for `model` (a FlashFaceModel). Every released key is
    mapped, an alias (checked against its `ori_*` key) or unused (`ref_middle`); anything else, and every missing
    or mis-shaped key, raises `CheckpointMismatchError` naming the released keys and `source`."""
    from fusion_jax.weights import CheckpointMismatchError, _describe

    module_map = released_module_map(model.config)
    shapes = _our_torch_shapes(model)
    renamed, missing, mismatched, used = {}, [], [], set()
    for key, shape in shapes.items():
        theirs = released_key(key, module_map)
        if theirs not in tensors:
            missing.append(theirs)
            continue
        used.add(theirs)
        got = tuple(np.shape(tensors[theirs]))
        if got != shape:
            mismatched.append(f"{theirs}: checkpoint {got} vs model {shape}")
            continue
        renamed[key] = tensors[theirs]
    unexpected = []
    for key in tensors:
        if key in used:
            continue
        if key.startswith(_UNUSED):
            continue
        alias = next((a for a in _ALIASES if key.startswith(a)), None)
        if alias is not None:
            original = _ALIASES[alias] + key[len(alias):]
            if original not in tensors:
                unexpected.append(f"{key} (alias without {original})")
            elif np.shape(tensors[original]) != np.shape(tensors[key]):
                mismatched.append(f"{key}: {np.shape(tensors[key])} vs its original {original} "
                                  f"{np.shape(tensors[original])}")
            continue
        unexpected.append(key)
    problems = []
    if missing:
        problems.append(f"missing keys (the model needs them, the checkpoint lacks them): {_describe(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {_describe(mismatched)}")
    if problems:
        raise CheckpointMismatchError(f"{source} is not a FlashFace checkpoint for this UNet config: "
                                      + "; ".join(problems))
    return renamed


def _unet_config(unet_config, norm_eps):
    from fusion_jax.models.unet import UNetConfig

    if unet_config is None:
        raw = dict(SD15_UNET_CONFIG)
    elif isinstance(unet_config, dict):
        raw = dict(unet_config)
    else:
        path = Path(unet_config)
        path = path / "config.json" if path.is_dir() else path
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"unet_config {unet_config}: cannot read a diffusers config.json ({e})") from e
    config = UNetConfig.from_dict(raw)
    if config.in_channels != 4:
        raise ValueError(f"unet_config: the base UNet must have 4 input channels, got {config.in_channels}")
    if norm_eps is not None:
        config = dataclasses.replace(config, norm_eps=norm_eps)
    return config


def load_flashface(path, unet_config=None, allow_pickle: bool = False, *, norm_eps: Optional[float] = RELEASED_NORM_EPS,
                   dtype=jnp.float32, cfg: FlashFaceConfig | None = None) -> FlashFaceModel:
    """The released FlashFace UNet as a `FlashFaceModel`.

    `path`: `flashface.ckpt` (a torch pickle: refused unless `allow_pickle=True`, then read with
    `torch.load(weights_only=True)`), a `.safetensors` file with the same keys, or a folder written by
    `python -m fusion_jax.convert flashface` (its `unet/` + `identity/`). `unet_config`: the 4-channel base UNet's
    diffusers config.json (dict, file or folder), SD 1.5's by default. `norm_eps`: GroupNorm epsilon of resnets and
    the output head (the released model computes with 1e-6; None keeps the config's)."""
    from fusion_jax import weights

    path = Path(path)
    if path.is_dir():
        from fusion_jax.identity import export

        model, method, _ = export.load_identity_model(path, FlashFace.instance(), dtype=dtype)
        return model
    cfg = cfg or FlashFaceConfig()
    tensors = weights.read_tensors(path, allow_pickle=allow_pickle)
    config = _unet_config(unet_config, norm_eps)
    model = build_flashface_model(config, cfg, dtype=dtype, param_dtype=dtype, abstract=True)
    renamed = convert_released_state_dict(tensors, model, str(path))
    weights.load_state_dict(model, renamed, source=str(path))
    leftover = [weights._path_to_key(p) for p, v in nnx.to_flat_state(nnx.state(model))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftover:
        raise weights.CheckpointMismatchError(f"{path}: model state not filled: {weights._describe(leftover)}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# the released VAE (sd-v1-vae.pth)
# ----------------------------------------------------------------------------------------------------------------

# diffusers' config.json of the SD 1.x VAE, which the released `sd_v1_vae` builds (dim 128, mult 1-2-4-4)
SD1_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}


def _released_vae_attention_class():
    from fusion_jax.models.attention import dot_product_attention
    from fusion_jax.models.vae import VAEAttention

    class ReleasedVAEAttention(VAEAttention):
        """The VAE mid-block attention as the released FlashFace VAE computes it: its output tokens (L, C) are
        reshaped to (C, H, W) without a transpose before the output projection (a bug the released images carry)."""

        def __call__(self, x: jax.Array) -> jax.Array:
            b, h, w, c = x.shape
            tokens = self.group_norm(x).reshape(b, h * w, c)
            q, k, v = (self._heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
            out = dot_product_attention(q, k, v, kernel=self.kernel, upcast=self.upcast_attention,
                                        query_chunk_size=self.query_chunk_size).reshape(b, h * w, c)
            out = out.reshape(b, c, h, w).transpose(0, 2, 3, 1)  # (L, C) memory read as (C, H, W), as released
            return x + self.to_out[0](out.reshape(b, h * w, c)).reshape(b, h, w, c)

    return ReleasedVAEAttention


def released_vae_tensors(tensors: dict, config) -> dict[str, np.ndarray]:
    """The released VAE's state dict (`encoder.conv1`, `encoder.downsamples.N`, `middle`, `head`, `conv1` / `conv2`,
    `decoder.upsamples.N`; attention `to_qkv` / `proj`) -> diffusers AutoencoderKL names. Unknown keys raise
    `CheckpointMismatchError` naming them (missing ones are reported by the loader)."""
    from fusion_jax.weights import CheckpointMismatchError, _describe

    n, layers = len(config.block_out_channels), config.layers_per_block
    modules = {"encoder.conv1": "encoder.conv_in", "encoder.head.0": "encoder.conv_norm_out",
               "encoder.head.2": "encoder.conv_out", "conv1": "quant_conv", "conv2": "post_quant_conv",
               "decoder.conv1": "decoder.conv_in", "decoder.head.0": "decoder.conv_norm_out",
               "decoder.head.2": "decoder.conv_out"}
    for part in ("encoder", "decoder"):
        modules[f"{part}.middle.0"] = f"{part}.mid_block.resnets.0"
        modules[f"{part}.middle.1"] = f"{part}.mid_block.attentions.0"
        modules[f"{part}.middle.2"] = f"{part}.mid_block.resnets.1"
    k = 0
    for i in range(n):
        for j in range(layers):
            modules[f"encoder.downsamples.{k}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            k += 1
        if i < n - 1:
            modules[f"encoder.downsamples.{k}.resample.1"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
            k += 1
    k = 0
    for i in range(n):
        for j in range(layers + 1):
            modules[f"decoder.upsamples.{k}"] = f"decoder.up_blocks.{i}.resnets.{j}"
            k += 1
        if i < n - 1:
            modules[f"decoder.upsamples.{k}.resample.1"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
            k += 1
    inner = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut", "norm": "group_norm", "proj": "to_out.0"}
    out, unknown = {}, []
    for key, value in tensors.items():
        prefix = next((p for p in sorted(modules, key=len, reverse=True) if key.startswith(p + ".")), None)
        if prefix is None:
            unknown.append(key)
            continue
        rest = key[len(prefix) + 1:]
        target = modules[prefix]
        if rest.startswith("to_qkv."):
            leaf = rest[len("to_qkv."):]
            for name, part in zip(("to_q", "to_k", "to_v"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{target}.{name}.{leaf}"] = part
            continue
        head = next((p for p in inner if rest.startswith(p + ".")), None)
        if head is not None:
            rest = inner[head] + rest[len(head):]
        elif rest not in ("weight", "bias"):
            unknown.append(key)
            continue
        out[f"{target}.{rest}"] = value
    if unknown:
        raise CheckpointMismatchError(f"released VAE: unexpected keys {_describe(sorted(unknown))}")
    return out


def load_released_vae(path, *, allow_pickle: bool = False, quirk: bool = True, vae_config=None, dtype=jnp.float32):
    """The released FlashFace VAE (`sd-v1-vae.pth`: a pickle, refused unless `allow_pickle=True`; or a
    .safetensors with its keys) as our AutoencoderKL. `quirk=True` reproduces the released mid-block attention's
    transpose-free reshape (the released images); False computes the attention correctly (diffusers)."""
    from fusion_jax import weights
    from fusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

    config = AutoencoderKLConfig.from_dict(dict(vae_config or SD1_VAE_CONFIG))
    tensors = released_vae_tensors(weights.read_tensors(Path(path), allow_pickle=allow_pickle), config)
    cls = _released_vae_attention_class() if quirk else None

    def make():
        vae = AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
        if cls is not None:
            for mid in (vae.encoder.mid_block, vae.decoder.mid_block):
                channels = mid.attentions[0].to_q.kernel.get_value().shape[0]
                mid.attentions[0] = cls(channels, groups=config.norm_num_groups, rngs=nnx.Rngs(0), dtype=dtype,
                                        param_dtype=dtype)
        return vae

    return weights.build_from_tensors(make, tensors, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# the released CLIP text encoder (openai-clip-vit-large-14.pth, text tower)
# ----------------------------------------------------------------------------------------------------------------

# transformers' config of the SD 1.x text encoder (OpenAI CLIP ViT-L/14 text tower), which the released CLIP is
CLIP_VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def released_clip_text_tensors(tensors: dict) -> dict[str, np.ndarray]:
    """The released CLIP's text tower (`textual.token_embedding`, `pos_embedding`, `transformer.N.{norm1, attn.to_qkv,
    attn.proj, norm2, mlp.0, mlp.2}`, `norm`) -> transformers CLIPTextModel names. The vision tower (`visual.*`),
    `log_scale` and the text `head` (the contrastive projection, unused by Stable Diffusion) are dropped; any
    other key raises `CheckpointMismatchError` naming it."""
    from fusion_jax.weights import CheckpointMismatchError, _describe

    out, unknown = {}, []
    inner = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.0": "mlp.fc1",
             "mlp.2": "mlp.fc2"}
    for key, value in tensors.items():
        if key.startswith("visual.") or key in ("log_scale", "logit_bias", "textual.head", "head"):
            continue
        rest = key[len("textual."):] if key.startswith("textual.") else key
        if rest == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif rest == "pos_embedding":
            out["text_model.embeddings.position_embedding.weight"] = np.asarray(value).reshape(
                np.shape(value)[-2], np.shape(value)[-1])
        elif rest.startswith("norm."):
            out["text_model.final_layer_norm." + rest[len("norm."):]] = value
        elif rest.startswith("transformer."):
            layer, _, tail = rest[len("transformer."):].partition(".")
            prefix = f"text_model.encoder.layers.{layer}."
            if tail.startswith("attn.to_qkv."):
                leaf = tail[len("attn.to_qkv."):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                    out[f"{prefix}self_attn.{name}.{leaf}"] = part
                continue
            head = next((h for h in inner if tail.startswith(h + ".")), None)
            if head is None:
                unknown.append(key)
                continue
            out[prefix + inner[head] + tail[len(head):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(f"released CLIP: unexpected keys {_describe(sorted(unknown))}")
    return out


def load_released_text_encoder(path, *, allow_pickle: bool = False, text_config=None, dtype=jnp.float32):
    """The released CLIP text encoder (`openai-clip-vit-large-14.pth`: a pickle, refused unless
    `allow_pickle=True`; or a .safetensors with its keys) as our CLIPTextModel (last_hidden_state is what the
    released `encode_text` returns: token + position embeddings, causal transformer, final LayerNorm)."""
    from fusion_jax import weights
    from fusion_jax.models.clip import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_dict(dict(text_config or CLIP_VIT_L14_TEXT_CONFIG))
    tensors = released_clip_text_tensors(weights.read_tensors(Path(path), allow_pickle=allow_pickle))
    return weights.build_from_tensors(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype),
                                      tensors, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# the identity method
# ----------------------------------------------------------------------------------------------------------------

_REFERENCE_PARAM = re.compile(r"^reference_net\.|\.attn_ref\.|^unet\.conv_in\.")


def _flat_key(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


@register
class FlashFace(IdentityMethod):
    """FlashFace: ReferenceNet features attended by a reference self-attention; disentangled guidance."""

    name = "flashface"
    section = "flashface"
    config_class = FlashFaceConfig
    trainable_presets = TRAINABLE
    batch_keys = ("face_mask",)
    display_name = "FlashFace"
    description = "FlashFace: ReferenceNet features + reference self-attention, face mask channel (arXiv 2403.17008)"

    @classmethod
    def instance(cls) -> "FlashFace":
        from fusion_jax.identity import base

        return base.get(cls.name)

    # -- model ---------------------------------------------------------------------------------------------------
    def attach(self, unet, cfg, *, trainable: str = "all", rngs=None):
        return attach_flashface(unet, cfg, rngs=rngs)

    def base_unet(self, model):
        return model.unet

    def trainable_filter(self, preset: str, cfg):
        if preset not in TRAINABLE + ("all",):
            raise ValueError(f"train.trainable must be one of {TRAINABLE + ('all',)} for FlashFace, got {preset!r}")

        def selected(path, value) -> bool:
            if not isinstance(value, nnx.Param):
                return False
            return preset == "all" or bool(_REFERENCE_PARAM.search(_flat_key(path)))

        return selected

    # -- training ------------------------------------------------------------------------------------------------
    def loss(self, model, batch, rng, schedule, cfg):
        """Denoising loss on the target photo (a different photo of the references' person, as the stream draws
        them): references and face mask dropped together (lambda 0, mask 0) with p=`reference_dropout`, caption
        replaced by the empty prompt with p=`text_dropout`; the reference pass runs at each sample's t with the
        empty prompt; lambda 1 when kept."""
        from fusion_jax.schedulers import add_noise, training_target

        for key in ("latents", "text_emb", "empty_text_emb", "reference_latents", "face_mask"):
            if key not in batch:
                raise ValueError(f"flashface loss: batch has no {key!r} (has {sorted(batch)})")
        x0 = batch["latents"]
        b, h, w, _ = x0.shape
        refs = batch["reference_latents"]
        if refs.ndim == 6:
            if refs.shape[1] != 1:
                raise ValueError(f"flashface loss: reference_latents must hold one identity, got shape {refs.shape}")
            refs = refs[:, 0]
        if refs.ndim != 5 or refs.shape[0] != b:
            raise ValueError(f"flashface loss: reference_latents must be (B={b}, N, h, w, C), got {refs.shape}")
        n = refs.shape[1]
        mask = batch["face_mask"]
        if mask.ndim != 4 or mask.shape[0] != b or mask.shape[1] % h or mask.shape[2] % w:
            raise ValueError(f"flashface loss: face_mask must be (B={b}, R, R, 1) at a multiple of the latent size "
                             f"{(h, w)}, got {mask.shape}")
        mask = mask[:, :: mask.shape[1] // h, :: mask.shape[2] // w, :1].astype(x0.dtype)
        k_t, k_noise, k_text, k_ref = jax.random.split(rng, 4)
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
        x_t = add_noise(schedule, x0, noise, t)
        drop_text = jax.random.bernoulli(k_text, cfg.text_dropout, (b,))
        empty = jnp.broadcast_to(batch["empty_text_emb"], batch["text_emb"].shape)
        ehs = jnp.where(drop_text[:, None, None], empty, batch["text_emb"])
        drop_ref = jax.random.bernoulli(k_ref, cfg.reference_dropout, (b,))
        mask = jnp.where(drop_ref[:, None, None, None], 0.0, mask).astype(x0.dtype)
        lam = jnp.where(drop_ref, 0.0, 1.0)
        flat = refs.reshape((b * n,) + refs.shape[2:])
        ref_ctx = jnp.repeat(empty, n, axis=0)
        feats = model.reference_features(flat, jnp.repeat(t, n), ref_ctx)
        feats = {k: v.reshape((b, n) + v.shape[1:]) for k, v in feats.items()}
        pred = model.denoise(jnp.concatenate([x_t, mask], axis=-1), t, ehs, feats, lam).astype(jnp.float32)
        target = training_target(schedule, x0, noise, t).astype(jnp.float32)
        loss = jnp.mean((pred - target) ** 2)
        return loss, {"text_dropped": jnp.mean(drop_text.astype(jnp.float32)),
                      "references_dropped": jnp.mean(drop_ref.astype(jnp.float32))}

    # -- sampling ------------------------------------------------------------------------------------------------
    def sampling_inputs(self, model, cfg, request: ReferenceRequest, *, batch: int, image_size, latent_size):
        refs = np.asarray(request.references, np.float32)
        if refs.ndim == 6:
            if refs.shape[1] != 1:
                raise ValueError(f"references: FlashFace takes one identity per image (K=1), got shape {refs.shape}")
            refs = refs[:, 0]
        if refs.ndim != 5 or refs.shape[0] != batch or refs.shape[-1] != 3:
            raise ValueError(f"references must be (B={batch}, N, H, W, 3) crops in [-1, 1], got shape {refs.shape}")
        valid = request.reference_valid
        if valid is not None:
            valid = np.asarray(valid, bool)
            if valid.size != refs.shape[0] * refs.shape[1]:
                raise ValueError(f"reference_valid must be (B, N)=({batch}, {refs.shape[1]}) (or (B, 1, N)), got "
                                 f"shape {valid.shape}")
        refs = pad_references(refs, valid, cfg.num_references)
        if request.boxes is None and cfg.face_box is not None:
            boxes = np.broadcast_to(face_box_pixels(cfg.face_box, *image_size, flag="flashface.face_box"), (batch, 4))
        elif request.boxes is None:
            boxes = np.zeros((batch, 4))
        else:
            boxes = np.asarray(request.boxes, np.float64)
            if boxes.ndim == 3:
                if boxes.shape[1] != 1:
                    raise ValueError(f"boxes: FlashFace takes one face box per image, got shape {boxes.shape}")
                boxes = boxes[:, 0]
            if boxes.shape != (batch, 4):
                boxes = np.broadcast_to(boxes, (batch, 4)) if boxes.shape == (4,) else boxes
            if boxes.shape != (batch, 4):
                raise ValueError(f"boxes must be (B={batch}, 4) or (B, 1, 4) pixel boxes, got shape {boxes.shape}")
        mask = face_mask(boxes, image_size, latent_size, cfg.mask_side)
        strength = cfg.feature_strength if request.strength is None else request.strength
        strength = np.asarray(strength, np.float32).reshape(-1)
        if strength.size not in (1, batch):
            raise ValueError(f"strength: FlashFace takes one feature strength (scalar or (B,)), got "
                             f"shape {np.shape(request.strength)}")
        return {"references": refs[:, None], "face_mask": mask,
                "feature_strength": np.broadcast_to(strength, (batch,)).copy()}

    def _features(self, model, parts: SamplingParts, timestep):
        refs = parts.ref_latents[:, 0]  # (B, N, h, w, C)
        b, n = refs.shape[:2]
        ctx = jnp.repeat(parts.text_uncond, n, axis=0)
        feats = model.reference_features(refs.reshape((b * n,) + refs.shape[2:]), timestep, ctx)
        return {k: v.reshape((b, n) + v.shape[1:]) for k, v in feats.items()}

    def encode_references(self, model, cfg, parts: SamplingParts, key):
        if cfg.reference_timestep == "cached":
            return self._features(model, parts, 0)
        return None

    def guided_prediction(self, model, cfg, sampling_cfg, cache, parts: SamplingParts, x_in, t, step, key):
        b = x_in.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (b,))
        features = cache if cache is not None else self._features(model, parts, t[0])
        reference = sampling_cfg.reference_guidance_scale
        if getattr(sampling_cfg, "reference_guidance", "disentangled") == "cfg":
            reference = 0.0
        guidance = Guidance(text=sampling_cfg.guidance_scale, reference=reference,
                            gate=sampling_cfg.reference_guidance_max_timestep,
                            feature_strength=parts.inputs["feature_strength"],
                            feature_strength_before_gate=cfg.feature_strength_before_gate,
                            rescale=sampling_cfg.guidance_rescale)
        return guided_from_features(model, x_in, t, parts.text_cond, parts.text_uncond, features,
                                    parts.inputs["face_mask"], guidance)

    # -- export --------------------------------------------------------------------------------------------------
    def export_tensors(self, model, cfg):
        from fusion_jax import weights

        out = {}
        for key, value in weights.state_dict(model).items():
            if key.startswith("reference_net."):
                out[key] = value
            elif ".attn_ref." in key:
                out[key[len("unet."):]] = value
        return out

    def load_tensors(self, unet, cfg, tensors, source):
        from fusion_jax import weights

        model = attach_flashface(unet, cfg)
        renamed = {k if k.startswith("reference_net.") else "unet." + k: v for k, v in tensors.items()}
        weights.load_state_dict(model, renamed, allow_missing=[r"^unet\.(?!.*\.attn_ref\.)"], source=source)
        return model

    # -- CLI -----------------------------------------------------------------------------------------------------
    def reference_size(self, cfg: FlashFaceConfig) -> int:
        return cfg.reference_size

    def reference_photos(self, groups, analyzer, size: int, margin: float, cfg: FlashFaceConfig):
        """One person; every photo must show exactly one face (as the released demo requires)."""
        from fusion_jax import references as refs_lib

        if len(groups) != 1:
            raise refs_lib.ReferenceError(f"--reference: FlashFace takes one person, got {len(groups)} (IDs 0..)")
        crops = reference_crops(groups[0], analyzer, size, margin)
        records = [{"identity": 0, "index": n, "path": str(path), "detector": analyzer.backend}
                   for n, path in enumerate(groups[0])]
        return refs_lib.ReferenceSet(crops[None], np.ones((1, len(crops)), bool), records)

    def add_arguments(self, parser) -> None:
        group = parser  # the CLI hands each method its own argument group (a group in a group hides from --help)
        group.add_argument("--preset", choices=PRESETS, default=None,
                           help="'code': the released defaults (DDIM trailing 35 steps, g_ref 3.2, gate 750, "
                                "lambda 1.2 / 0.85, rescale 0.5); 'paper': lambda 0.85, g_ref 2, no gate, DDIM 50")
        group.add_argument("--feature-strength", type=float, default=None,
                           help="lambda of the reference branch at and below the gate (flashface.feature_strength)")
        group.add_argument("--feature-strength-before-gate", type=float, default=None,
                           help="lambda of both branches above the gate (flashface.feature_strength_before_gate)")
        group.add_argument("--face-box", default=None,
                           help="x1,y1,x2,y2 normalised to [0, 1]: where the face goes (the mask channel)")

    def apply_arguments(self, args, cfg, sampling_cfg):
        name = getattr(args, "preset", None)
        if name is not None:
            settings = preset(name)
            cfg = dataclasses.replace(cfg, **settings["flashface"])
            sampling_cfg = dataclasses.replace(sampling_cfg, **settings["sampling"])
        for flag, field in (("feature_strength", "feature_strength"),
                            ("feature_strength_before_gate", "feature_strength_before_gate")):
            value = getattr(args, flag, None)
            if value is not None:
                if not np.isfinite(value):
                    raise ValueError(f"--{flag.replace('_', '-')}: must be a finite number, got {value!r}")
                cfg = dataclasses.replace(cfg, **{field: float(value)})
        if getattr(args, "face_box", None) is not None:
            cfg = dataclasses.replace(cfg, face_box=normalized_box(args.face_box, "--face-box"))
        return cfg, sampling_cfg


def face_box_pixels(value, height: int, width: int, flag: str = "--face-box") -> np.ndarray:
    """A normalised `--face-box` -> pixel (x1, y1, x2, y2) in a `height` x `width` image, as the released demo
    rounds it (int(v * size))."""
    x1, y1, x2, y2 = normalized_box(value, flag)
    return np.array([int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)], np.float64)


__all__ = [
    "FlashFaceConfig", "FlashFace", "FlashFaceModel", "ReferenceNet", "Guidance", "PRESETS", "preset",
    "attach_flashface", "build_flashface_model", "reference_layers", "guided_noise", "guided_from_features",
    "face_mask", "normalized_box", "face_box_pixels", "reference_crops", "pad_references", "load_flashface",
    "released_module_map", "released_key", "convert_released_state_dict", "SD15_UNET_CONFIG", "SD1_VAE_CONFIG",
    "load_released_vae", "released_vae_tensors", "CLIP_VIT_L14_TEXT_CONFIG", "load_released_text_encoder",
    "released_clip_text_tensors",
]
