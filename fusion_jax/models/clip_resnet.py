"""CLIP's modified ResNet image tower (RN50 / RN101 / RN50x4 ...) in Flax NNX, NHWC.

FaceStudio concatenates the image embeddings of several CLIP towers, one of them RN101; this is that tower.
The architecture is OpenAI CLIP's `ModifiedResNet` (also open_clip's):

- a 3-convolution stem (3x3 stride 2, 3x3, 3x3; BatchNorm + ReLU each) followed by a 2x2 average pool;
- four stages of Bottleneck blocks (1x1, 3x3, 1x1 convolutions, expansion 4) whose stride-2 blocks are
  anti-aliased: a 2x2 average pool after the 3x3 convolution, and one before the 1x1 convolution of the
  shortcut ("downsample"); every convolution itself has stride 1;
- an attention-pool head: the (h*w) feature tokens plus their mean as a leading query token, a learned position
  embedding, one multi-head attention in which only the mean token's output is kept, and `c_proj` to the
  embedding width.

The module tree mirrors the PyTorch one, so `fusion_jax.weights.load_state_dict` maps the (prefix-stripped)
checkpoint keys `conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, `layer1.0.downsample.0.weight`
(the shortcut conv; `downsample.1` its BatchNorm), `attnpool.positional_embedding`, `attnpool.q_proj.weight`,
`attnpool.c_proj.bias` ... one to one. `fusion_jax.encoders.load_clip_resnet` reads whole open_clip / OpenAI CLIP
checkpoints (keys under `visual.`).

BatchNorm is always in inference mode (the tower is a frozen encoder). Its running statistics are `BatchNormStat`
variables, a subclass of `nnx.Param`, so that the one generic converter maps `running_mean` / `running_var` and
`weights.state_dict` exports them; exclude `BatchNormStat` from any optimiser if this tower is ever fine-tuned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# OpenAI CLIP's image normalisation (RGB, images scaled to [0, 1] first)
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

BOTTLENECK_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class CLIPResNetConfig:
    """Architecture of a CLIP ModifiedResNet (open_clip's `vision_cfg` of the RN models, plus `embed_dim`)."""

    layers: tuple[int, int, int, int] = (3, 4, 23, 3)  # Bottleneck blocks per stage (RN101; RN50 is 3, 4, 6, 3)
    width: int = 64  # stem output channels; stage s has width * 2**s planes and 4x that many output channels
    output_dim: int = 512  # width of the image embedding (`attnpool.c_proj` output; open_clip's embed_dim)
    head_width: int = 64  # attention-pool head width: heads = width * 32 // head_width (OpenAI: 32 for RN101)
    image_size: int = 224  # input height = width; the position embedding is fixed to (image_size // 32)**2 + 1
    batch_norm_eps: float = 1e-5  # PyTorch BatchNorm2d default

    def __post_init__(self):
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if len(layers) != 4 or any(not isinstance(n, (int, np.integer)) or n < 1 for n in layers):
            raise ValueError(f"CLIPResNetConfig.layers must be 4 positive ints (blocks per stage), got {self.layers!r}")
        for name in ("width", "output_dim", "head_width", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"CLIPResNetConfig.{name} must be a positive int, got {value!r}")
        if self.width % 2:
            raise ValueError(f"CLIPResNetConfig.width must be even (the stem's first convs have width // 2), "
                             f"got {self.width}")
        if (self.width * 32) % self.head_width:
            raise ValueError(f"CLIPResNetConfig: the feature width width * 32 = {self.width * 32} must be a multiple "
                             f"of head_width ({self.head_width})")
        if self.image_size % 32:
            raise ValueError(f"CLIPResNetConfig.image_size must be a multiple of 32 (the tower's total stride), "
                             f"got {self.image_size}")

    @property
    def embed_dim(self) -> int:
        """Channels of the last stage = width of the attention pool's tokens."""
        return self.width * 32

    @property
    def heads(self) -> int:
        return self.embed_dim // self.head_width

    @property
    def grid_size(self) -> int:
        """Side of the final feature map (and of the position-embedding grid)."""
        return self.image_size // 32

    @classmethod
    def rn50(cls) -> "CLIPResNetConfig":
        return cls(layers=(3, 4, 6, 3), width=64, output_dim=1024)

    @classmethod
    def rn101(cls) -> "CLIPResNetConfig":
        return cls(layers=(3, 4, 23, 3), width=64, output_dim=512)

    @classmethod
    def from_open_clip(cls, data: Mapping[str, Any]) -> "CLIPResNetConfig":
        """From an open_clip model config dict (`RN101.json`: `embed_dim` and `vision_cfg`)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("vision_cfg"), Mapping):
            raise ValueError("open_clip config must be a dict with a 'vision_cfg' dict (as in RN101.json)")
        vision = data["vision_cfg"]
        layers = vision.get("layers")
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"open_clip vision_cfg 'layers' is {layers!r}: a ViT config (int layers) is not a "
                             "ModifiedResNet; expected a list of 4 block counts")
        if "embed_dim" not in data:
            raise ValueError("open_clip config has no 'embed_dim' (the image embedding width)")
        return cls(layers=tuple(layers), width=vision.get("width", 64), output_dim=data["embed_dim"],
                   head_width=vision.get("head_width", 64), image_size=vision.get("image_size", 224))

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Any], *, prefix: str = "visual.",
                        head_width: int = 64) -> "CLIPResNetConfig":
        """Infer the architecture from checkpoint shapes, as OpenAI CLIP's `build_model` does (the head count is
        not stored: it is width * 32 // head_width)."""
        def shape(key):
            if prefix + key not in tensors:
                raise ValueError(f"checkpoint has no {prefix + key!r}: not a CLIP ModifiedResNet state dict "
                                 f"(keys under {prefix!r})")
            return tuple(np.shape(tensors[prefix + key]))

        width = shape("layer1.0.conv1.weight")[0]
        layers = []
        for stage in range(1, 5):
            blocks = {k[len(prefix):].split(".")[1] for k in tensors if k.startswith(f"{prefix}layer{stage}.")}
            layers.append(len(blocks))
        tokens = shape("attnpool.positional_embedding")[0]
        grid = round(math.sqrt(tokens - 1))
        return cls(layers=tuple(layers), width=width, output_dim=shape("attnpool.c_proj.weight")[0],
                   head_width=head_width, image_size=grid * 32)


@flax.struct.dataclass
class CLIPResNetOutput:
    """What the tower returns."""

    image_embeds: jax.Array  # (B, output_dim): the attention-pooled, projected image embedding
    feature_map: jax.Array  # (B, image_size // 32, image_size // 32, width * 32): the last stage, before pooling


class BatchNormStat(nnx.Param):
    """A BatchNorm running statistic: read from checkpoints like a parameter, never trained (see module doc)."""


class BatchNorm2d(nnx.Module):
    """Inference-mode BatchNorm over the channel (last) axis: (x - running_mean) / sqrt(running_var + eps) *
    scale + bias, computed in float32."""

    def __init__(self, num_features: int, *, epsilon: float, param_dtype: Any):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.running_mean = BatchNormStat(jnp.zeros((num_features,), param_dtype))
        self.running_var = BatchNormStat(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        f32 = lambda v: v.get_value().astype(jnp.float32)  # noqa: E731
        mul = f32(self.scale) * jax.lax.rsqrt(f32(self.running_var) + self.epsilon)
        add = f32(self.bias) - f32(self.running_mean) * mul
        return (x.astype(jnp.float32) * mul + add).astype(x.dtype)


def _avg_pool2(x: jax.Array) -> jax.Array:
    """PyTorch `AvgPool2d(2)`: 2x2 windows, stride 2, no padding (an odd last row / column is dropped)."""
    return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _conv(n_in: int, n_out: int, kernel: int, *, stride: int = 1, dtype, param_dtype, rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(n_in, n_out, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 -> (2x2 avg pool when strided) -> 1x1 (4x planes), with an avg-pool + 1x1 conv + BN shortcut
    when the stride or the width changes; ReLU after each BN and after the residual sum."""

    def __init__(self, inplanes: int, planes: int, stride: int, *, epsilon: float, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(epsilon=epsilon, param_dtype=param_dtype)
        out = planes * BOTTLENECK_EXPANSION
        self.stride = stride
        self.conv1 = _conv(inplanes, planes, 1, **kw)
        self.bn1 = BatchNorm2d(planes, **bn)
        self.conv2 = _conv(planes, planes, 3, **kw)
        self.bn2 = BatchNorm2d(planes, **bn)
        self.conv3 = _conv(planes, out, 1, **kw)
        self.bn3 = BatchNorm2d(out, **bn)
        # torch: Sequential('-1': AvgPool2d(stride), '0': Conv2d 1x1, '1': BatchNorm2d); the pool has no weights
        self.downsample = (
            nnx.List([_conv(inplanes, out, 1, **kw), BatchNorm2d(out, **bn)])
            if stride > 1 or inplanes != out else nnx.data(None)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        if self.stride > 1:
            out = _avg_pool2(out)
        out = self.bn3(self.conv3(out))
        identity = x
        if self.downsample is not None:
            shortcut = _avg_pool2(x) if self.stride > 1 else x
            identity = self.downsample[1](self.downsample[0](shortcut))
        return jax.nn.relu(out + identity)


class AttentionPool2d(nnx.Module):
    """QKV attention pooling: the mean token (prepended) attends to all tokens; its output goes through c_proj."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, output_dim: int, *, dtype, param_dtype,
                 rngs):
        self.num_heads = num_heads
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (grid_size**2 + 1, embed_dim), param_dtype) * embed_dim**-0.5
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  kernel_init=nnx.initializers.normal(embed_dim**-0.5))
        self.k_proj = nnx.Linear(embed_dim, embed_dim, **kw)
        self.q_proj = nnx.Linear(embed_dim, embed_dim, **kw)
        self.v_proj = nnx.Linear(embed_dim, embed_dim, **kw)
        self.c_proj = nnx.Linear(embed_dim, output_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + self.positional_embedding.get_value().astype(tokens.dtype)[None]
        head_dim = c // self.num_heads
        q = self.q_proj(tokens[:, :1]).reshape(b, 1, self.num_heads, head_dim)
        k = self.k_proj(tokens).reshape(b, h * w + 1, self.num_heads, head_dim)
        v = self.v_proj(tokens).reshape(b, h * w + 1, self.num_heads, head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        pooled = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, c)
        return self.c_proj(pooled)


class ModifiedResNet(nnx.Module):
    """CLIP's ResNet image encoder: NHWC pixels (normalised with CLIP_IMAGE_MEAN / STD) -> image embedding."""

    def __init__(self, config: CLIPResNetConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(epsilon=config.batch_norm_eps, param_dtype=param_dtype)
        w = config.width
        self.conv1 = _conv(3, w // 2, 3, stride=2, **kw)
        self.bn1 = BatchNorm2d(w // 2, **bn)
        self.conv2 = _conv(w // 2, w // 2, 3, **kw)
        self.bn2 = BatchNorm2d(w // 2, **bn)
        self.conv3 = _conv(w // 2, w, 3, **kw)
        self.bn3 = BatchNorm2d(w, **bn)
        inplanes = w
        stages = []
        for index, blocks in enumerate(config.layers):
            planes = w * 2**index
            stage = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(Bottleneck(inplanes, planes, stride, epsilon=config.batch_norm_eps, **kw))
                inplanes = planes * BOTTLENECK_EXPANSION
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(config.grid_size, config.embed_dim, config.heads, config.output_dim, **kw)

    def stem(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        return _avg_pool2(x)

    def __call__(self, pixel_values: jax.Array) -> CLIPResNetOutput:
        pixel_values = jnp.asarray(pixel_values)
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (size, size, 3):
            raise ValueError(f"pixel_values must be NHWC of shape (batch, {size}, {size}, 3) (the position "
                             f"embedding is fixed to image_size {size}), got {tuple(pixel_values.shape)}")
        x = self.stem(pixel_values.astype(self.conv1.dtype or jnp.float32))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return CLIPResNetOutput(image_embeds=self.attnpool(x), feature_map=x)


def normalize_images(images: jax.Array) -> jax.Array:
    """NHWC RGB images in [0, 1] -> CLIP's normalised pixel values (resize / crop to image_size first)."""
    mean = jnp.asarray(CLIP_IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_IMAGE_STD, jnp.float32)
    return (jnp.asarray(images, jnp.float32) - mean) / std

