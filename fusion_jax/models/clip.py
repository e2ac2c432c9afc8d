"""CLIP text and vision transformers in Flax NNX, weight-compatible with transformers' PyTorch CLIP.

The module tree mirrors transformers' exactly, so `fusion_jax.weights.load_state_dict` maps checkpoint keys
one to one: `text_model.embeddings.token_embedding`, `text_model.encoder.layers[i].self_attn.q_proj`,
`text_model.final_layer_norm`, `text_projection`; `vision_model.embeddings.class_embedding` (a raw parameter),
`vision_model.pre_layrnorm` (sic), `vision_model.post_layernorm`, `visual_projection`.

Note on key prefixes: Stable Diffusion checkpoints (and transformers < 5) store `CLIPTextModel` weights under
`text_model.`; transformers 5 saves a bare `CLIPTextModel` without that prefix (and loads both). Our
`CLIPTextModel` keeps the `text_model.` level, which is what SD checkpoints use; `add_tower_prefix` maps
transformers-5 keys onto it.

Images are NHWC at the API. Softmax and LayerNorm run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD 1.x text encoder)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU (OpenCLIP: SD 2.x, SDXL)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"config key 'hidden_act' is {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _read(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    """One config value, type-checked; `default` when absent or null (null means 'default' in HF configs)."""
    value = data.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where} config key {key!r} is {value!r}; expected {names}")
    return float(value) if kind in (float, (int, float)) else value


def _sub_config(data: Mapping[str, Any], nested_key: str, model_types: tuple[str, ...], where: str) -> Mapping:
    """The relevant config dict: `data` itself, or its `text_config` / `vision_config` (full CLIPModel)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} config must be a dict (a parsed config.json), got {type(data).__name__}")
    if nested_key in data and isinstance(data[nested_key], Mapping):
        return data[nested_key]
    model_type = data.get("model_type")
    if model_type is not None and model_type not in model_types:
        raise ValueError(f"{where} config has model_type {model_type!r}; expected one of {model_types}")
    return data


def _check_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be positive, got {getattr(config, name)}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{type(config).__name__}: hidden_size ({config.hidden_size}) must be a multiple of "
            f"num_attention_heads ({config.num_attention_heads})"
        )
    _activation(config.hidden_act)


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (transformers' `CLIPTextConfig` fields that shape the model)."""

    vocab_size: int = 49408  # token embedding rows
    hidden_size: int = 512  # width of the residual stream
    intermediate_size: int = 2048  # MLP hidden width
    projection_dim: int = 512  # output width of `text_projection` (WithProjection models only)
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 8  # heads per self-attention (hidden_size must divide evenly)
    max_position_embeddings: int = 77  # longest token sequence (position embedding rows)
    hidden_act: str = "quick_gelu"  # MLP activation: quick_gelu (OpenAI CLIP) or gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    pad_token_id: int = 1  # padding token id (kept for round trips; padding is masked by the caller)
    bos_token_id: int = 49406  # start-of-text token id
    eos_token_id: int = 49407  # end-of-text id; 2 means the legacy rule "pool at the largest token id"

    def __post_init__(self):
        _check_positive(
            self,
            ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers `config.json` dict (a CLIPTextConfig, or a CLIPModel config's `text_config`).

        Keys that do not shape the model (dropout, initializer_range, architectures, ...) are ignored; a key we
        read with the wrong type is an error naming it.
        """
        d = _sub_config(data, "text_config", ("clip_text_model", "clip"), "CLIP text")
        eos = d.get("eos_token_id", cls.eos_token_id)
        if isinstance(eos, list) and len(eos) == 1:
            eos = eos[0]
        d = {**d, "eos_token_id": eos}
        values = {}
        for f in dataclasses.fields(cls):
            kind = {int: int, float: (int, float), str: str}[type(f.default)]
            values[f.name] = _read(d, f.name, kind, f.default, "CLIP text")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `CLIPTextModel(WithProjection).from_pretrained` reads."""
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision tower (transformers' `CLIPVisionConfig` fields that shape the model)."""

    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int = 3072  # MLP hidden width
    projection_dim: int = 512  # output width of `visual_projection` (WithProjection models only)
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # heads per self-attention (hidden_size must divide evenly)
    num_channels: int = 3  # input image channels
    image_size: int = 224  # input height = width in pixels (position embeddings are fixed to it)
    patch_size: int = 32  # side of the square non-overlapping patches (patch-embedding conv stride)
    hidden_act: str = "quick_gelu"  # MLP activation: quick_gelu (OpenAI CLIP) or gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self):
        _check_positive(
            self,
            ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
             "num_channels", "image_size", "patch_size"),
        )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a transformers `config.json` dict (a CLIPVisionConfig, or a CLIPModel's `vision_config`).

        Keys that do not shape the model are ignored; a key we read with the wrong type is an error naming it.
        """
        d = _sub_config(data, "vision_config", ("clip_vision_model", "clip"), "CLIP vision")
        values = {}
        for f in dataclasses.fields(cls):
            kind = {int: int, float: (int, float), str: str}[type(f.default)]
            values[f.name] = _read(d, f.name, kind, f.default, "CLIP vision")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `CLIPVisionModel(WithProjection).from_pretrained` reads."""
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}


def add_tower_prefix(tensors: Mapping[str, Any], tower: str) -> dict[str, Any]:
    """Checkpoint keys in our (= Stable Diffusion's) naming: transformers 5 saves a bare `CLIPTextModel` /
    `CLIPVisionModel` without the `text_model.` / `vision_model.` level; add it back when it is missing.

    `tower` is "text_model" or "vision_model". Keys already prefixed, and projection heads, are left alone.
    """
    if tower not in ("text_model", "vision_model"):
        raise ValueError(f"tower must be 'text_model' or 'vision_model', got {tower!r}")
    if any(key.startswith(tower + ".") for key in tensors):
        return dict(tensors)
    heads = ("text_projection.", "visual_projection.", "logit_scale")
    return {key if key.startswith(heads) else f"{tower}.{key}": value for key, value in tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# Outputs (pytrees, so they can leave jit)
# ----------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class CLIPTextOutput:
    """What the text models return (transformers' field names)."""

    last_hidden_state: jax.Array  # (B, L, hidden) after final_layer_norm
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at each sequence's EOS token
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer's output (no final norm)
    text_embeds: jax.Array | None = None  # (B, projection_dim): text_projection(pooler_output)


@flax.struct.dataclass
class CLIPVisionOutput:
    """What the vision models return (transformers' field names)."""

    last_hidden_state: jax.Array  # (B, 1 + patches, hidden): encoder output (no post_layernorm)
    pooler_output: jax.Array  # (B, hidden): post_layernorm of the class token
    hidden_states: tuple[jax.Array, ...] | None = None  # pre_layrnorm'd embeddings + each layer's output
    image_embeds: jax.Array | None = None  # (B, projection_dim): visual_projection(pooler_output)


# ----------------------------------------------------------------------------------------------------------
# Shared transformer blocks
# ----------------------------------------------------------------------------------------------------------


class LayerNorm32(nnx.LayerNorm):
    """LayerNorm computed in float32 (exact two-pass variance), output cast back to the input dtype."""

    def __init__(self, num_features: int, *, epsilon: float, param_dtype: Any, rngs: nnx.Rngs):
        super().__init__(
            num_features, epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
            use_fast_variance=False, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


def _linear(n_in: int, n_out: int, *, use_bias: bool = True, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    return nnx.Linear(
        n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.initializers.normal(n_in**-0.5),
    )


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with an optional additive bias (causal / padding mask)."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = _linear(hidden_size, hidden_size, **kw)
        self.v_proj = _linear(hidden_size, hidden_size, **kw)
        self.q_proj = _linear(hidden_size, hidden_size, **kw)
        self.out_proj = _linear(hidden_size, hidden_size, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.head_dim**-0.5
        if bias is not None:
            scores = scores + bias
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, self.num_heads * self.head_dim)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, *, dtype, param_dtype, rngs):
        self.activation = _activation(hidden_act)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = _linear(hidden_size, intermediate_size, **kw)
        self.fc2 = _linear(intermediate_size, hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(epsilon=config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads, **kw)
        self.layer_norm1 = LayerNorm32(config.hidden_size, **ln)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act, **kw)
        self.layer_norm2 = LayerNorm32(config.hidden_size, **ln)

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of encoder layers; optionally returns every intermediate hidden state."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, dtype, param_dtype, rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )

    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, *, output_hidden_states: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
        states = [x]
        for layer in self.layers:
            x = layer(x, bias)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


# ----------------------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding + learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, embedding_init=nnx.initializers.normal(0.02))
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


def _text_attention_bias(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Additive (B or 1, 1, L, L) bias: causal, plus padded keys masked when `attention_mask` is given."""
    n = input_ids.shape[-1]
    allowed = jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] != 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class CLIPTextTransformer(nnx.Module):
    """embeddings -> causal encoder -> final_layer_norm; pooled output at the EOS token."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = LayerNorm32(
            config.hidden_size, epsilon=config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
        )

    def _eos_positions(self, input_ids: jax.Array) -> jax.Array:
        # transformers' two rules: legacy configs (eos_token_id == 2) pool at the largest id, which is EOS in
        # the original CLIP vocabulary; otherwise at the first occurrence of eos_token_id (0 if absent).
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, output_hidden_states: bool = False
    ) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be an integer array of shape (batch, length), got {input_ids.dtype} {input_ids.shape}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]}, more than max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        x = self.embeddings(input_ids)
        x, states = self.encoder(
            x, _text_attention_bias(input_ids, attention_mask), output_hidden_states=output_hidden_states
        )
        last = self.final_layer_norm(x)
        pooled = last[jnp.arange(last.shape[0]), self._eos_positions(input_ids)]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


class CLIPTextModel(nnx.Module):
    """The CLIP text encoder of Stable Diffusion: `model(input_ids).last_hidden_state` conditions the UNet.

    `output_hidden_states=True` also returns every layer's output: `hidden_states[-2]` is the penultimate
    layer SDXL uses (and clip-skip: `hidden_states[-(skip + 1)]`, then `text_model.final_layer_norm`).
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)


class CLIPTextModelWithProjection(nnx.Module):
    """Text encoder plus `text_projection` of the pooled output (`text_embeds`): SDXL's second encoder."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = _linear(
            config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))


# ----------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nnx.Module):
    """Patch embedding (strided conv, no bias) with a prepended class token, plus position embedding."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs):
        self.config = config
        self.dtype = dtype
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(config.hidden_size**-0.5)(rngs.params(), (config.hidden_size,), param_dtype)
        )
        p = config.patch_size
        self.patch_embedding = nnx.Conv(
            config.num_channels, config.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            config.num_patches + 1, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixel_values)  # (B, h, w, hidden)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(patches.dtype), (b, 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    """embeddings -> pre_layrnorm -> encoder; pooled output is post_layernorm of the class token."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(epsilon=config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = LayerNorm32(config.hidden_size, **ln)  # (sic) transformers' name
        self.encoder = CLIPEncoder(config, **kw)
        self.post_layernorm = LayerNorm32(config.hidden_size, **ln)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        pixel_values = jnp.asarray(pixel_values)
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be NHWC of shape (batch, {c.image_size}, {c.image_size}, {c.num_channels}), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x, states = self.encoder(x, output_hidden_states=output_hidden_states)
        return CLIPVisionOutput(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]), hidden_states=states)


class CLIPVisionModel(nnx.Module):
    """CLIP image encoder without projection: `last_hidden_state` and the pooled class token."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        return self.vision_model(pixel_values, output_hidden_states=output_hidden_states)


class CLIPVisionModelWithProjection(nnx.Module):
    """CLIP image encoder plus `visual_projection` of the pooled output (`image_embeds`)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual_projection = _linear(
            config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        return out.replace(image_embeds=self.visual_projection(out.pooler_output))
