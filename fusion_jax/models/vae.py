"""AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, weight-compatible with diffusers' `AutoencoderKL`.

Images are NHWC in [-1, 1]. `encode` returns the diagonal Gaussian posterior over latents and `decode` maps
latents back to images; like diffusers, neither applies `scaling_factor` (nor `shift_factor`). The helpers
`latents_from_images` / `images_from_latents` do, and are what diffusion code should call.

Module tree (= diffusers' state-dict keys): `encoder.{conv_in, down_blocks[i].{resnets[j], downsamplers[0]},
mid_block.{resnets[0..1], attentions[0]}, conv_norm_out, conv_out}`, `quant_conv`, `post_quant_conv`,
`decoder.{conv_in, mid_block, up_blocks[i].{resnets[j], upsamplers[0]}, conv_norm_out, conv_out}`.
The residual / resampling blocks and attention are the UNet's (`fusion_jax.models.resnet`, `.attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.models.attention import Attention
from fusion_jax.models.resnet import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv2d

_VAE_EPS = 1e-6  # diffusers' Encoder / Decoder fix every norm epsilon to 1e-6 (not in config.json)
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def _fail(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"AutoencoderKL config key {key!r} is {value!r}; expected {expected}")


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, value, "an int")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, value, "a number")
    return float(value)


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _as_tuple(key: str, value: Any, item) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _fail(key, value, "a list")
    return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, "a string")
    return value


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of diffusers' `AutoencoderKL` config.json (defaults are diffusers' defaults)."""

    in_channels: int = 3  # image channels into the encoder
    out_channels: int = 3  # image channels out of the decoder
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)  # one per resolution; only DownEncoderBlock2D exists
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)  # one per resolution; only UpDecoderBlock2D exists
    block_out_channels: tuple[int, ...] = (64,)  # encoder channels per resolution (decoder: reversed)
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks have one more)
    act_fn: str = "silu"  # activation; SD VAEs all use silu (the only one supported)
    latent_channels: int = 4  # channels of the latent (the posterior has twice as many: mean, logvar)
    norm_num_groups: int = 32  # GroupNorm groups everywhere (every channel count must divide by it)
    sample_size: int = 32  # nominal image size (used by diffusers' tiling only; kept for round trips)
    scaling_factor: float = 0.18215  # latents fed to the UNet are (z - shift_factor) * scaling_factor
    shift_factor: float | None = None  # subtracted before scaling (None = 0; SD3 / Flux VAEs set it)
    latents_mean: tuple[float, ...] | None = None  # per-channel latent mean (SDXL-style pipelines; optional)
    latents_std: tuple[float, ...] | None = None  # per-channel latent std, used with latents_mean
    force_upcast: bool = True  # pipelines should run this VAE in float32 (fp16 overflows in SD/SDXL VAEs)
    use_quant_conv: bool = True  # 1x1 conv on the posterior moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on the latents before the decoder
    mid_block_add_attention: bool = True  # self-attention between the two mid-block resnets

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("AutoencoderKL config key 'block_out_channels' must list at least one channel count")
        n = len(self.block_out_channels)
        for key, types, allowed in (("down_block_types", self.down_block_types, _DOWN_BLOCK),
                                    ("up_block_types", self.up_block_types, _UP_BLOCK)):
            if len(types) != n:
                raise ValueError(f"AutoencoderKL config key {key!r} has {len(types)} entries; "
                                 f"block_out_channels has {n}")
            if any(t != allowed for t in types):
                raise ValueError(f"AutoencoderKL config key {key!r} is {list(types)}; only {allowed!r} is supported")
        if self.act_fn != "silu":
            raise ValueError(f"AutoencoderKL config key 'act_fn' is {self.act_fn!r}; only 'silu' is supported")
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            if getattr(self, key) <= 0:
                raise ValueError(f"AutoencoderKL config key {key!r} must be positive, got {getattr(self, key)}")
        bad = [c for c in self.block_out_channels if c <= 0 or c % self.norm_num_groups]
        if bad:
            raise ValueError(f"AutoencoderKL config key 'block_out_channels' {list(self.block_out_channels)}: every "
                             f"entry must be a positive multiple of norm_num_groups ({self.norm_num_groups})")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("AutoencoderKL config keys 'latents_mean' and 'latents_std' must be given together")
        for key in ("latents_mean", "latents_std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.latent_channels:
                raise ValueError(f"AutoencoderKL config key {key!r} has {len(value)} entries; "
                                 f"latent_channels is {self.latent_channels}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """From a diffusers `config.json` dict. Bookkeeping keys (`_class_name`, `_diffusers_version`, ...) and
        keys we do not use are ignored; a key we read with the wrong type is an error naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"AutoencoderKL config must be a dict (a parsed config.json), got {type(data).__name__}")
        name = data.get("_class_name")
        if name is not None and name != "AutoencoderKL":
            raise ValueError(f"AutoencoderKL config has _class_name {name!r}; expected 'AutoencoderKL'")
        readers = {
            "in_channels": _as_int, "out_channels": _as_int, "layers_per_block": _as_int,
            "latent_channels": _as_int, "norm_num_groups": _as_int, "act_fn": _as_str,
            "down_block_types": lambda k, v: _as_tuple(k, v, _as_str),
            "up_block_types": lambda k, v: _as_tuple(k, v, _as_str),
            "block_out_channels": lambda k, v: _as_tuple(k, v, _as_int),
            "sample_size": lambda k, v: _as_int(k, v[0] if isinstance(v, (list, tuple)) and v else v),
            "scaling_factor": _as_float, "shift_factor": _as_float,
            "latents_mean": lambda k, v: _as_tuple(k, v, _as_float),
            "latents_std": lambda k, v: _as_tuple(k, v, _as_float),
            "force_upcast": _as_bool, "use_quant_conv": _as_bool, "use_post_quant_conv": _as_bool,
            "mid_block_add_attention": _as_bool,
        }
        values = {key: read(key, data[key]) for key, read in readers.items() if data.get(key) is not None}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict that diffusers' `AutoencoderKL.from_pretrained` reads back."""
        out = {"_class_name": "AutoencoderKL"}
        for key, value in dataclasses.asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


def rename_legacy_vae_keys(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Old diffusers VAE checkpoints name the mid-block attention `query/key/value/proj_attn`; diffusers
    renames them on load to `to_q/to_k/to_v/to_out.0`. Same here (shapes are unchanged)."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if ".attentions." in key and len(parts) >= 2 and parts[-2] in renames:
            key = ".".join(parts[:-2] + [renames[parts[-2]], parts[-1]])
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Posterior
# ----------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)); a pytree, so it can leave jit."""

    mean: jax.Array  # (B, h, w, latent_channels)
    logvar: jax.Array  # same shape, clipped to [-30, 20] as diffusers does

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split the encoder output (B, h, w, 2 * latent_channels) into mean and clipped log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """One reparameterised draw: mean + std * N(0, 1)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, 1)) per example, summed over latent dimensions (diffusers' `kl()`)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------
# Blocks specific to the VAE
# ----------------------------------------------------------------------------------------------------------


class VAEAttention(Attention):
    """Spatial self-attention of the VAE mid block: x + attention(group_norm(x)) over all H*W positions.

    The shared `Attention` (to_q/k/v with bias, to_out[0]) plus what diffusers adds for the VAE
    (`Attention(norm_num_groups=..., residual_connection=True)`): a GroupNorm on the input and the residual.
    One head of width C, as diffusers builds it (attention_head_dim = channels); float32 scores.
    """

    def __init__(self, channels: int, *, groups: int, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast_attention=True, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(channels, groups, epsilon=_VAE_EPS, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return x + super().__call__(tokens).reshape(b, h, w, c)


class VAEMidBlock(nnx.Module):
    """diffusers' `UNetMidBlock2D` without time embedding: resnet, (attention), resnet."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attentions = nnx.List([VAEAttention(channels, groups=groups, **kw)] if add_attention else [])
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_VAE_EPS, **kw)
             for _ in range(2)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except at the last resolution) a stride-2 conv padded right/bottom."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_downsample: bool,
                 rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                           eps=_VAE_EPS, **kw) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, **kw)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except at the last resolution) nearest x2 upsampling and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_upsample: bool,
                 rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                           eps=_VAE_EPS, **kw) for i in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = conv2d(config.in_channels, channels[0], 3, **kw)
        self.down_blocks = nnx.List(
            [DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block,
                                groups=groups, add_downsample=i < len(channels) - 1, **kw)
             for i in range(len(channels))]
        )
        self.mid_block = VAEMidBlock(channels[-1], groups=groups, add_attention=config.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(channels[-1], groups, epsilon=_VAE_EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv2d(channels[-1], 2 * config.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = conv2d(config.latent_channels, channels[0], 3, **kw)
        self.mid_block = VAEMidBlock(channels[0], groups=groups, add_attention=config.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List(
            [UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block + 1,
                              groups=groups, add_upsample=i < len(channels) - 1, **kw)
             for i in range(len(channels))]
        )
        self.conv_norm_out = GroupNorm(channels[-1], groups, epsilon=_VAE_EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv2d(channels[-1], config.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class AutoencoderKL(nnx.Module):
    """The SD VAE: `encode(images) -> DiagonalGaussian`, `decode(latents) -> images`, NHWC, images in [-1, 1]."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = conv2d(2 * c, 2 * c, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(c, c, 1, **kw) if config.use_post_quant_conv else None

    def _check(self, name: str, x: jax.Array, channels: int, multiple: int) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(
                f"{name} must be NHWC (batch, height, width, {channels}) with height and width multiples of "
                f"{multiple}, got shape {tuple(x.shape)}"
            )
        return x

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Posterior over (unscaled) latents of NHWC `images` in [-1, 1]."""
        images = self._check("images", images, self.config.in_channels, self.config.downscale_factor)
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, latents: jax.Array) -> jax.Array:
        """NHWC images (roughly in [-1, 1]; not clipped) from (unscaled) latents."""
        latents = self._check("latents", latents, self.config.latent_channels, 1)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode(posterior sample with `key`, else its mean)."""
        posterior = self.encode(images)
        return self.decode(posterior.mean if key is None else posterior.sample(key))

    def _latent_stats(self, dtype) -> tuple[jax.Array, jax.Array]:
        """(offset, scale) with diffusion latents = (z - offset) * scale."""
        c = self.config
        if c.latents_mean is not None:
            mean = jnp.asarray(c.latents_mean, dtype)
            return mean, c.scaling_factor / jnp.asarray(c.latents_std, dtype)
        return jnp.asarray(c.shift_factor or 0.0, dtype), jnp.asarray(c.scaling_factor, dtype)

    def latents_from_images(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The UNet's latents of `images`: a posterior sample (mean when `key` is None), shifted and scaled."""
        posterior = self.encode(images)
        z = posterior.mean if key is None else posterior.sample(key)
        offset, scale = self._latent_stats(z.dtype)
        return (z - offset) * scale

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `latents_from_images`' scaling, then decode: NHWC images roughly in [-1, 1]."""
        latents = jnp.asarray(latents)
        offset, scale = self._latent_stats(latents.dtype)
        return self.decode(latents / scale + offset)
