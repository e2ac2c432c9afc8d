"""`UNet2DConditionModel`: the Stable Diffusion 1.x / 2.x / SDXL denoiser in Flax NNX, NHWC.

The module tree mirrors diffusers' `UNet2DConditionModel` exactly (`conv_in`, `time_embedding`, `add_embedding`,
`down_blocks[i]`, `mid_block`, `up_blocks[i]`, `conv_norm_out`, `conv_out`), so `fusion_jax.weights` maps any
diffusers checkpoint onto it by name. `UNetConfig` reads / writes diffusers' `config.json` dictionaries.

Call: `unet(sample (B, H, W, C), timesteps () or (B,), encoder_hidden_states (B, L, D),
added_cond_kwargs=None, identity=None) -> (B, H, W, out_channels)`. `identity` (an `IdentityContext`) reaches
every `BasicTransformerBlock`; with `identity=None` the computation is exactly the base model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.identity.context import IdentityContext, ReferenceCapture
from fusion_jax.models import attention as attention_lib
from fusion_jax.models import remat as remat_lib
from fusion_jax.models.embeddings import TimestepEmbedding, text_time_embedding_input, timestep_embedding
from fusion_jax.models.remat import Remat
from fusion_jax.models.resnet import GroupNorm, conv2d
from fusion_jax.models.unet_blocks import (
    BlockOptions,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys we read but only accept at the value that SD / SDXL checkpoints use (key -> allowed).
_FIXED_KEYS: dict[str, tuple] = {
    "dual_cross_attention": (False,),
    "num_class_embeds": (None,),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# diffusers config keys that have no effect on SD / SDXL UNets and are accepted with any value.
_IGNORED_KEYS = ("addition_embed_type_num_heads", "mid_block_only_cross_attention")


def _per_block(value, n: int, key: str, kind=int) -> tuple:
    """An int/bool/None (same for every down block) or a per-block list of length n -> a tuple of length n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNetConfig.{key}: per-block list must have {n} entries (one per down block), "
                             f"got {len(value)}: {value!r}")
        for v in value:
            if isinstance(v, (list, tuple)):
                raise ValueError(f"UNetConfig.{key}: nested per-layer lists are not supported, got {value!r}")
        return tuple(value)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"UNetConfig.{key}: expected {kind.__name__} or a list of {n}, got {value!r}")
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers `UNet2DConditionModel` config.json that SD 1.x / 2.x / SDXL use."""

    sample_size: int | None = None  # latent size the model was trained at (informational)
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels predicted
    center_input_sample: bool = False  # map the input x -> 2x - 1 first
    flip_sin_to_cos: bool = True  # timestep sinusoid order [cos, sin] instead of [sin, cos]
    freq_shift: int = 0  # frequency denominator shift of the timestep sinusoid (SD: 0)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # one per resolution
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # or None (no mid block)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # mirror of down blocks
    only_cross_attention: bool | tuple[bool, ...] = False  # attn1 attends to text too (per block or all)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks have one more)
    downsample_padding: int = 1  # padding of the stride-2 downsampling convs
    mid_block_scale_factor: float = 1.0  # mid-block resnet outputs are divided by this
    dropout: float = 0.0  # dropout in resnets and transformer blocks (training only)
    act_fn: str = "silu"  # nonlinearity; only silu (swish) is supported
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon of resnets and the output norm
    cross_attention_dim: int | tuple[int, ...] = 1280  # text embedding width (per block or all)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # BasicTransformerBlocks per Transformer2DModel
    attention_head_dim: int | tuple[int, ...] = 8  # diffusers' (mis)name: number of heads, per block or all
    num_attention_heads: int | tuple[int, ...] | None = None  # number of heads; overrides attention_head_dim
    dual_cross_attention: bool = False  # must be False
    use_linear_projection: bool = False  # Linear proj_in/out in transformers (SD 2.x, SDXL) instead of 1x1 conv
    upcast_attention: bool = False  # attention scores in float32 (SD 2.1)
    num_class_embeds: int | None = None  # must be None
    resnet_time_scale_shift: str = "default"  # must be 'default'
    addition_embed_type: str | None = None  # None or 'text_time' (SDXL)
    addition_time_embed_dim: int | None = None  # text_time: sinusoid width per time id
    projection_class_embeddings_input_dim: int | None = None  # text_time: pooled text width + 6 * time dim
    conv_in_kernel: int = 3  # kernel size of conv_in
    conv_out_kernel: int = 3  # kernel size of conv_out

    def __post_init__(self):
        self._validate()

    # -- derived per-block settings ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    def heads(self) -> tuple[int, ...]:
        """Number of attention heads per down block (diffusers: num_attention_heads or attention_head_dim)."""
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        key = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        return _per_block(value, self.num_blocks, key)

    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    def only_cross(self) -> tuple[bool, ...]:
        return _per_block(self.only_cross_attention, self.num_blocks, "only_cross_attention", bool)

    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    # -- validation --------------------------------------------------------------------------------------------
    def _validate(self):
        n = self.num_blocks
        if len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig.up_block_types: need {n} entries like down_block_types, got "
                             f"{self.up_block_types!r}")
        if len(self.block_out_channels) != n:
            raise ValueError(f"UNetConfig.block_out_channels: need {n} entries (one per down block), got "
                             f"{self.block_out_channels!r}")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"UNetConfig.down_block_types: unsupported {t!r}; supported {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"UNetConfig.up_block_types: unsupported {t!r}; supported {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"UNetConfig.mid_block_type: unsupported {self.mid_block_type!r}; "
                             f"supported {MID_BLOCK_TYPES}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"UNetConfig.act_fn: only 'silu' is supported, got {self.act_fn!r}")
        if self.dual_cross_attention:
            raise ValueError("UNetConfig.dual_cross_attention: only False is supported")
        if self.num_class_embeds is not None:
            raise ValueError(f"UNetConfig.num_class_embeds: only None is supported, got {self.num_class_embeds!r}")
        if self.resnet_time_scale_shift != "default":
            raise ValueError(f"UNetConfig.resnet_time_scale_shift: only 'default' is supported, got "
                             f"{self.resnet_time_scale_shift!r}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig.addition_embed_type: only None or 'text_time' are supported, got "
                             f"{self.addition_embed_type!r}")
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(getattr(self, key), int):
                    raise ValueError(f"UNetConfig.{key}: required (an int) when addition_embed_type is 'text_time'")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"UNetConfig.norm_num_groups: an int is required, got {self.norm_num_groups!r}")
        for i, c in enumerate(self.block_out_channels):
            if c % self.norm_num_groups != 0:
                raise ValueError(f"UNetConfig.block_out_channels[{i}]={c} is not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, key) % 2 != 1:
                raise ValueError(f"UNetConfig.{key}: must be odd, got {getattr(self, key)}")
        heads = self.heads()
        for i, (c, h) in enumerate(zip(self.block_out_channels, heads)):
            if not isinstance(h, int) or h <= 0 or c % h != 0:
                raise ValueError(f"UNetConfig.attention_head_dim / num_attention_heads: block {i} has {c} channels, "
                                 f"not divisible into {h!r} heads")
        self.cross_attention_dims(), self.only_cross(), self.layers(), self.transformer_layers()

    # -- diffusers config.json ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "UNetConfig":
        """Build from a diffusers config.json dict; unknown or unsupported keys raise an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _FIXED_KEYS and key not in names:
                if value not in _FIXED_KEYS[key]:
                    raise ValueError(f"UNet config key {key!r}: unsupported value {value!r} "
                                     f"(supported: {_FIXED_KEYS[key]})")
                continue
            if key not in names:
                raise ValueError(f"UNet config key {key!r} is not supported by fusion_jax.models.unet.UNetConfig")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A dict that diffusers' `UNet2DConditionModel.from_config` accepts (lists for tuples).

        diffusers refuses `num_attention_heads`; since its blocks only use the head count, an explicit
        `num_attention_heads` is written as `attention_head_dim` (same model)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.num_attention_heads is not None:
            out["attention_head_dim"] = out["num_attention_heads"]
        out["num_attention_heads"] = None
        return out


class UNet2DConditionModel(nnx.Module):
    """Conditional UNet (SD 1.x / 2.x / SDXL), NHWC, with the identity seam threaded to every transformer block.

    `dtype` is the activation dtype (bfloat16 on accelerators), `param_dtype` the parameter dtype; softmax and
    norms always run in float32. `attention_kernel` / `query_chunk_size` pick the attention implementation (see
    `models.attention`); `remat` names the `jax.checkpoint` policy of every resnet and transformer block
    (`models.remat`: 'none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'; True = the last).
    Construction is shape-only friendly (works under `nnx.eval_shape`).
    """

    def __init__(
        self,
        config: UNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_kernel: attention_lib.AttentionKernel = "auto",
        query_chunk_size: int = attention_lib.DEFAULT_QUERY_BLOCK,
        remat: Remat = "none",
    ):
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet2DConditionModel: `config` must be a UNetConfig, got {type(config).__name__} "
                            "(use UNetConfig.from_dict for a config.json dict)")
        if attention_kernel not in attention_lib.ATTENTION_KERNELS:
            raise ValueError(f"UNet2DConditionModel: attention_kernel must be one of "
                             f"{attention_lib.ATTENTION_KERNELS}, got {attention_kernel!r}")
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        channels = config.block_out_channels
        time_dim = config.time_embed_dim()
        opts = BlockOptions(temb_channels=time_dim, resnet_eps=config.norm_eps, resnet_groups=config.norm_num_groups,
                            use_linear_projection=config.use_linear_projection,
                            upcast_attention=config.upcast_attention, dropout=config.dropout, kernel=attention_kernel,
                            query_chunk_size=query_chunk_size, remat=remat)
        heads, cross_dims, only_cross = config.heads(), config.cross_attention_dims(), config.only_cross()
        layers, t_layers = config.layers(), config.transformer_layers()

        self.conv_in = conv2d(config.in_channels, channels[0], config.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim, **kw)
        self.add_embedding = (
            TimestepEmbedding(config.projection_class_embeddings_input_dim, time_dim, **kw)
            if config.addition_embed_type == "text_time" else None)

        down = []
        out_ch = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            common = dict(num_layers=layers[i], add_downsample=i < len(channels) - 1,
                          downsample_padding=config.downsample_padding, **kw)
            if block_type == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(
                    opts, in_ch, out_ch, heads=heads[i], cross_attention_dim=cross_dims[i],
                    transformer_layers=t_layers[i], only_cross_attention=only_cross[i], name=f"down_blocks.{i}",
                    **common))
            else:
                down.append(DownBlock2D(opts, in_ch, out_ch, **common))
        self.down_blocks = nnx.List(down)

        self.mid_block = (
            UNetMidBlock2DCrossAttn(opts, channels[-1], heads=heads[-1], cross_attention_dim=cross_dims[-1],
                                    transformer_layers=t_layers[-1], output_scale_factor=config.mid_block_scale_factor,
                                    **kw)
            if config.mid_block_type == "UNetMidBlock2DCrossAttn" else None)

        up = []
        rev_ch = list(reversed(channels))
        rev = lambda xs: list(reversed(xs))  # noqa: E731
        r_heads, r_cross, r_only, r_layers, r_t = (rev(x) for x in (heads, cross_dims, only_cross, layers, t_layers))
        out_ch = rev_ch[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, len(channels) - 1)]
            common = dict(num_layers=r_layers[i] + 1, add_upsample=i < len(channels) - 1, **kw)
            if block_type == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(
                    opts, in_ch, out_ch, prev_ch, heads=r_heads[i], cross_attention_dim=r_cross[i],
                    transformer_layers=r_t[i], only_cross_attention=r_only[i], name=f"up_blocks.{i}", **common))
            else:
                up.append(UpBlock2D(opts, in_ch, out_ch, prev_ch, **common))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(channels[0], config.norm_num_groups, epsilon=config.norm_eps, rngs=rngs,
                                       param_dtype=param_dtype)
        self.conv_out = conv2d(channels[0], config.out_channels, config.conv_out_kernel, **kw)

    # -- helpers -----------------------------------------------------------------------------------------------
    def transformer_blocks(self) -> dict[str, attention_lib.BasicTransformerBlock]:
        """Every BasicTransformerBlock keyed by its `layer_name` (diffusers path), in forward order."""
        found = {}
        for _, node in nnx.iter_graph(self):
            if isinstance(node, attention_lib.BasicTransformerBlock):
                found[node.layer_name] = node
        return dict(sorted(found.items(), key=lambda kv: _forward_order(kv[0])))

    def _time_embedding(self, timesteps, batch: int, added_cond_kwargs) -> jax.Array:
        t = jnp.asarray(timesteps)
        if t.ndim == 0 or t.shape == (1,):
            t = jnp.broadcast_to(t.reshape(()), (batch,))
        elif t.shape != (batch,):
            raise ValueError(f"unet: `timesteps` must be a scalar or shape (B,)=({batch},), got shape {t.shape}")
        cfg = self.config
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if self.add_embedding is not None:
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("unet: `added_cond_kwargs` with keys 'text_embeds' and 'time_ids' is required "
                                 "(config addition_embed_type='text_time')")
            add_in = text_time_embedding_input(
                jnp.asarray(added_cond_kwargs["text_embeds"]), jnp.asarray(added_cond_kwargs["time_ids"]),
                time_embed_dim=cfg.addition_time_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                freq_shift=cfg.freq_shift)
            if add_in.shape != (batch, cfg.projection_class_embeddings_input_dim):
                raise ValueError(
                    f"unet: added_cond_kwargs give {add_in.shape[-1]} features per sample (text_embeds + time_ids x "
                    f"{cfg.addition_time_embed_dim}), config projection_class_embeddings_input_dim is "
                    f"{cfg.projection_class_embeddings_input_dim}")
            emb = emb + self.add_embedding(add_in.astype(self.dtype))
        return emb

    def _check_inputs(self, sample, encoder_hidden_states, identity):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"unet: `sample` must be (B, H, W, {cfg.in_channels}) NHWC, got shape {sample.shape}")
        dims = set(cfg.cross_attention_dims())
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]
                or encoder_hidden_states.shape[-1] not in dims or len(dims) != 1):
            raise ValueError(f"unet: `encoder_hidden_states` must be (B={sample.shape[0]}, L, {sorted(dims)}), "
                             f"got shape {encoder_hidden_states.shape}")
        if identity is not None and not isinstance(identity, (IdentityContext, ReferenceCapture)):
            raise TypeError(f"unet: `identity` must be an IdentityContext or None, got {type(identity).__name__}")

    # -- forward -----------------------------------------------------------------------------------------------
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        identity: IdentityContext | ReferenceCapture | None = None,
    ) -> jax.Array:
        """Predict noise (or v) for `sample` (B, H, W, C); returns (B, H, W, out_channels) in sample's dtype."""
        sample = jnp.asarray(sample)
        self._check_inputs(sample, encoder_hidden_states, identity)
        out_dtype = sample.dtype
        batch = sample.shape[0]
        emb = self._time_embedding(timesteps, batch, added_cond_kwargs)
        ehs = encoder_hidden_states.astype(self.dtype)
        h = sample.astype(self.dtype)
        if self.config.center_input_sample:
            h = 2 * h - 1.0
        h = self.conv_in(h)

        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, ehs, identity)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, ehs, identity)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, block_skips, emb, ehs, identity, upsample_size=upsample_size)

        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
        return h.astype(out_dtype)


def _forward_order(layer_name: str) -> tuple:
    part, *rest = layer_name.split(".")
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[part]
    return (rank,) + tuple(int(x) if x.isdigit() else 0 for x in rest)


def set_attention_kernel(model: nnx.Module, kernel: attention_lib.AttentionKernel,
                         query_chunk_size: int | None = None) -> None:
    """Switch every `Attention` in `model` to `kernel` (and `query_chunk_size`), e.g. after loading weights."""
    if kernel not in attention_lib.ATTENTION_KERNELS:
        raise ValueError(f"set_attention_kernel: kernel must be one of {attention_lib.ATTENTION_KERNELS}, "
                         f"got {kernel!r}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, attention_lib.Attention):
            node.kernel = kernel
            if query_chunk_size is not None:
                node.query_chunk_size = query_chunk_size


def set_remat(model: nnx.Module, remat: Remat) -> None:
    """Sets the remat policy of every resnet and transformer block: a `models.remat.REMAT_POLICIES` name
    ('none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable', i.e. `train.remat`) or a bool."""
    remat_lib.set_remat(model, remat)
