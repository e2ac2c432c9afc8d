"""Down, mid and up blocks of the SD / SDXL UNet (NHWC; diffusers' module names and skip-connection order).

Down blocks return (hidden, skips) with one skip per resnet (after its attention, if any) plus one after the
downsampler; up blocks pop skips from the end, concatenate them on channels before each resnet, and upsample to
the next skip's spatial size (so odd latent sizes work as in diffusers).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.identity.context import IdentityContext, ReferenceCapture
from fusion_jax.models.attention import DEFAULT_QUERY_BLOCK, AttentionKernel, Transformer2DModel
from fusion_jax.models.remat import Remat, call_maybe_remat, remat_name
from fusion_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

Identity = IdentityContext | ReferenceCapture | None


@dataclass(frozen=True)
class BlockOptions:
    """Settings shared by every block of one UNet."""

    temb_channels: int  # width of the time embedding fed to each resnet
    resnet_eps: float  # GroupNorm epsilon in resnets (config norm_eps)
    resnet_groups: int  # GroupNorm groups (config norm_num_groups)
    use_linear_projection: bool = False  # Transformer2DModel proj_in/out as Linear instead of 1x1 conv
    upcast_attention: bool = False  # attention scores in float32
    dropout: float = 0.0  # dropout rate inside resnets and transformer blocks
    kernel: AttentionKernel = "auto"  # attention kernel, see models.attention
    query_chunk_size: int = DEFAULT_QUERY_BLOCK  # query block size of the chunked attention kernel
    remat: Remat = "none"  # jax.checkpoint policy name of resnets and transformer blocks (models.remat)


def _resnet(opts: BlockOptions, in_ch: int, out_ch: int, *, output_scale_factor: float = 1.0, rngs, dtype,
            param_dtype) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, temb_channels=opts.temb_channels, groups=opts.resnet_groups,
                         eps=opts.resnet_eps, output_scale_factor=output_scale_factor, dropout=opts.dropout,
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _transformer(opts: BlockOptions, channels: int, *, heads: int, cross_attention_dim: int, num_layers: int,
                 only_cross_attention: bool, layer_prefix: str, rngs, dtype, param_dtype) -> Transformer2DModel:
    if channels % heads != 0:
        raise ValueError(f"{layer_prefix}: channels {channels} not divisible by the number of attention heads {heads} "
                         "(config attention_head_dim / num_attention_heads)")
    return Transformer2DModel(
        channels, heads=heads, dim_head=channels // heads, cross_attention_dim=cross_attention_dim,
        layer_prefix=layer_prefix, num_layers=num_layers, norm_num_groups=opts.resnet_groups,
        use_linear_projection=opts.use_linear_projection, only_cross_attention=only_cross_attention,
        upcast_attention=opts.upcast_attention, dropout=opts.dropout, kernel=opts.kernel,
        query_chunk_size=opts.query_chunk_size, remat=opts.remat, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _run_resnet(remat: Remat, resnet: ResnetBlock2D, h: jax.Array, temb: jax.Array) -> jax.Array:
    return call_maybe_remat(remat, lambda r, x, t: r(x, t), resnet, h, temb)


class DownBlock2D(nnx.Module):
    """`num_layers` resnets, then an optional stride-2 conv downsampler."""

    def __init__(self, opts: BlockOptions, in_channels: int, out_channels: int, *, num_layers: int,
                 add_downsample: bool, downsample_padding: int = 1, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat_name(opts.remat)
        self.resnets = nnx.List([
            _resnet(opts, in_channels if i == 0 else out_channels, out_channels, **kw) for i in range(num_layers)])
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, use_conv=True, padding=downsample_padding, **kw)])
            if add_downsample else None)

    def __call__(self, h, temb, encoder_hidden_states=None, identity: Identity = None):
        skips = []
        for resnet in self.resnets:
            h = _run_resnet(self.remat, resnet, h, temb)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class CrossAttnDownBlock2D(nnx.Module):
    """`num_layers` (resnet, Transformer2DModel) pairs, then an optional downsampler."""

    def __init__(self, opts: BlockOptions, in_channels: int, out_channels: int, *, num_layers: int,
                 add_downsample: bool, heads: int, cross_attention_dim: int, transformer_layers: int,
                 only_cross_attention: bool, name: str, downsample_padding: int = 1, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat_name(opts.remat)
        self.resnets = nnx.List([
            _resnet(opts, in_channels if i == 0 else out_channels, out_channels, **kw) for i in range(num_layers)])
        self.attentions = nnx.List([
            _transformer(opts, out_channels, heads=heads, cross_attention_dim=cross_attention_dim,
                         num_layers=transformer_layers, only_cross_attention=only_cross_attention,
                         layer_prefix=f"{name}.attentions.{i}", **kw)
            for i in range(num_layers)])
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, use_conv=True, padding=downsample_padding, **kw)])
            if add_downsample else None)

    def __call__(self, h, temb, encoder_hidden_states, identity: Identity = None):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            h = _run_resnet(self.remat, resnet, h, temb)
            h = attn(h, encoder_hidden_states, identity)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then `num_layers` (Transformer2DModel, resnet) pairs; resnets divide by `output_scale_factor`."""

    def __init__(self, opts: BlockOptions, channels: int, *, heads: int, cross_attention_dim: int,
                 transformer_layers: int, output_scale_factor: float = 1.0, num_layers: int = 1,
                 name: str = "mid_block", rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat_name(opts.remat)
        self.resnets = nnx.List([
            _resnet(opts, channels, channels, output_scale_factor=output_scale_factor, **kw)
            for _ in range(num_layers + 1)])
        self.attentions = nnx.List([
            _transformer(opts, channels, heads=heads, cross_attention_dim=cross_attention_dim,
                         num_layers=transformer_layers, only_cross_attention=False,
                         layer_prefix=f"{name}.attentions.{i}", **kw)
            for i in range(num_layers)])

    def __call__(self, h, temb, encoder_hidden_states, identity: Identity = None):
        h = _run_resnet(self.remat, self.resnets[0], h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = attn(h, encoder_hidden_states, identity)
            h = _run_resnet(self.remat, resnet, h, temb)
        return h


def _up_resnets(opts: BlockOptions, in_channels: int, out_channels: int, prev_output_channel: int,
                num_layers: int, kw: dict) -> nnx.List:
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in = prev_output_channel if i == 0 else out_channels
        resnets.append(_resnet(opts, resnet_in + skip_channels, out_channels, **kw))
    return nnx.List(resnets)


class UpBlock2D(nnx.Module):
    """`num_layers` resnets on [hidden; skip] concatenations, then an optional nearest-x2 + conv upsampler."""

    def __init__(self, opts: BlockOptions, in_channels: int, out_channels: int, prev_output_channel: int, *,
                 num_layers: int, add_upsample: bool, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat_name(opts.remat)
        self.resnets = _up_resnets(opts, in_channels, out_channels, prev_output_channel, num_layers, kw)
        self.upsamplers = nnx.List([Upsample2D(out_channels, use_conv=True, **kw)]) if add_upsample else None

    def __call__(self, h, skips, temb, encoder_hidden_states=None, identity: Identity = None,
                 upsample_size: tuple[int, int] | None = None):
        for resnet, skip in zip(self.resnets, reversed(skips)):
            h = _run_resnet(self.remat, resnet, jnp.concatenate([h, skip], axis=-1), temb)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


class CrossAttnUpBlock2D(nnx.Module):
    """`num_layers` (resnet on [hidden; skip], Transformer2DModel) pairs, then an optional upsampler."""

    def __init__(self, opts: BlockOptions, in_channels: int, out_channels: int, prev_output_channel: int, *,
                 num_layers: int, add_upsample: bool, heads: int, cross_attention_dim: int, transformer_layers: int,
                 only_cross_attention: bool, name: str, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat_name(opts.remat)
        self.resnets = _up_resnets(opts, in_channels, out_channels, prev_output_channel, num_layers, kw)
        self.attentions = nnx.List([
            _transformer(opts, out_channels, heads=heads, cross_attention_dim=cross_attention_dim,
                         num_layers=transformer_layers, only_cross_attention=only_cross_attention,
                         layer_prefix=f"{name}.attentions.{i}", **kw)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, use_conv=True, **kw)]) if add_upsample else None

    def __call__(self, h, skips, temb, encoder_hidden_states, identity: Identity = None,
                 upsample_size: tuple[int, int] | None = None):
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(skips)):
            h = _run_resnet(self.remat, resnet, jnp.concatenate([h, skip], axis=-1), temb)
            h = attn(h, encoder_hidden_states, identity)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h
