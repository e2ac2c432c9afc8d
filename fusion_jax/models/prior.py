"""The DALL-E 2 style prior (CLIP text embedding -> CLIP image embedding) in Flax NNX: diffusers' `PriorTransformer`
(Karlo's and Kandinsky's prior), weight-compatible with its diffusers checkpoints.

The model is a causal transformer over the token sequence

    [projected text hidden states (L), projected text embedding, time embedding, noisy image embedding, prd]

(+ a learned position embedding); the output at the last (`prd`) token, after `norm_out`, goes through
`proj_to_clip_embeddings` and is the prediction for the image embedding (Karlo predicts the clean sample). The
sampler is `fusion_jax.schedulers.unclip.UnCLIPSampler`; `sample_prior` runs the whole loop under one jit, with
classifier-free guidance, and un-normalises the result with `clip_mean` / `clip_std` (`post_process_latents`).

The module tree mirrors diffusers', so `fusion_jax.weights.load_state_dict` maps `time_embedding.linear_1`,
`proj_in`, `embedding_proj`, `encoder_hidden_states_proj`, `positional_embedding`, `prd_embedding`,
`transformer_blocks.{i}.norm1 / attn1.to_q / attn1.to_out.0 / norm3 / ff.net.0.proj / ff.net.2`, `norm_out`,
`proj_to_clip_embeddings`, `clip_mean`, `clip_std` one to one (`fusion_jax.encoders.load_prior` reads a folder).

Two behaviours of diffusers kept on purpose (the checkpoints were trained with them): the causal mask is applied
only when a text `attention_mask` is given (without one every token sees every token), and the mask's masked
value is -10000 (added to the scaled scores), not -inf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.models.attention import LayerNorm
from fusion_jax.models.embeddings import timestep_embedding

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
_MASKED = -10000.0  # diffusers' additive value for masked text tokens and for the causal mask


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """diffusers' `PriorTransformer` config fields (`prior/config.json`); defaults are diffusers' (= Karlo's)."""

    num_attention_heads: int = 32  # heads per self-attention
    attention_head_dim: int = 64  # channels per head; inner width = heads * head_dim
    num_layers: int = 20  # transformer blocks
    embedding_dim: int = 768  # width of the CLIP image embedding and of the text hidden states
    num_embeddings: int = 77  # text hidden-state tokens (the text encoder's max length)
    additional_embeddings: int = 4  # tokens after the text: text embedding, time, noisy image embedding, prd
    time_embed_act_fn: str = "silu"  # activation inside the time-embedding MLP
    norm_in_type: str | None = None  # None | 'layer': LayerNorm on the token sequence before the blocks
    embedding_proj_norm_type: str | None = None  # None | 'layer': LayerNorm on the text embedding first
    encoder_hid_proj_type: str | None = "linear"  # None | 'linear': projection of the text hidden states
    added_emb_type: str | None = "prd"  # None | 'prd': the learned output token appended last
    time_embed_dim: int | None = None  # hidden width of the time MLP (None: inner width)
    embedding_proj_dim: int | None = None  # width of the text embedding (None: embedding_dim)
    clip_embed_dim: int | None = None  # width of the output embedding (None: embedding_dim)

    def __post_init__(self):
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PriorConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.additional_embeddings, int) or self.additional_embeddings < 0:
            raise ValueError(f"PriorConfig.additional_embeddings must be an int >= 0, got {self.additional_embeddings!r}")
        for name in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"PriorConfig.{name} must be None or a positive int, got {value!r}")
        choices = {"time_embed_act_fn": tuple(_ACTIVATIONS), "norm_in_type": (None, "layer"),
                   "embedding_proj_norm_type": (None, "layer"), "encoder_hid_proj_type": (None, "linear"),
                   "added_emb_type": (None, "prd")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PriorConfig.{name} is {getattr(self, name)!r}; expected one of {allowed}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_dim(self) -> int:
        """Width of the predicted CLIP image embedding."""
        return self.clip_embed_dim or self.embedding_dim

    @property
    def text_embed_dim(self) -> int:
        """Width of the CLIP text embedding (`proj_embedding`) the prior is conditioned on."""
        return self.embedding_proj_dim or self.embedding_dim

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PriorConfig":
        """From a diffusers `config.json` dict; keys that do not shape the model (dropout, _class_name, ...) are
        ignored, a `_class_name` other than PriorTransformer is an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"prior config must be a dict (a parsed config.json), got {type(data).__name__}")
        class_name = data.get("_class_name")
        if class_name is not None and class_name != "PriorTransformer":
            raise ValueError(f"prior config has _class_name {class_name!r}; expected 'PriorTransformer'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _TimeEmbedding(nnx.Module):
    """diffusers' `TimestepEmbedding(inner, time_embed_dim, out_dim=inner)`: linear_2(act(linear_1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs):
        self.act = _ACTIVATIONS[act]
        self.linear_1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class PriorAttention(nnx.Module):
    """Self-attention with biased q/k/v projections and an additive (B, 1, T, T) float32 bias."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nnx.Linear(dim, inner, **kw)
        self.to_k = nnx.Linear(dim, inner, **kw)
        self.to_v = nnx.Linear(dim, inner, **kw)
        self.to_out = nnx.List([nnx.Linear(inner, dim, **kw)])

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.heads * self.head_dim)
        return self.to_out[0](out)


class _GELUProj(nnx.Module):
    """diffusers' `GELU` activation module: exact GELU of a linear projection (`proj`)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype, param_dtype, rngs):
        self.proj = nnx.Linear(dim_in, dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=False)


class PriorFeedForward(nnx.Module):
    """`net = [GELU(dim, 4 dim), Dropout, Linear(4 dim, dim)]`: diffusers' FeedForward with activation 'gelu'."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List([_GELUProj(dim, 4 * dim, **kw), nnx.Dropout(0.0), nnx.Linear(4 * dim, dim, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class PriorTransformerBlock(nnx.Module):
    """diffusers' BasicTransformerBlock without cross-attention: x + attn1(norm1(x)), then x + ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)
        self.attn1 = PriorAttention(dim, heads, head_dim, **kw)
        self.norm3 = LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)
        self.ff = PriorFeedForward(dim, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


class PriorTransformer(nnx.Module):
    """diffusers' PriorTransformer: predicts the CLIP image embedding from a noisy one, the timestep, the CLIP text
    embedding and the text encoder's last hidden states."""

    def __init__(self, config: PriorConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        c = config
        inner = c.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(epsilon=1e-5, rngs=rngs, param_dtype=param_dtype)
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))  # noqa: E731
        self.time_embedding = _TimeEmbedding(inner, c.time_embed_dim or inner, c.time_embed_act_fn, **kw)
        self.proj_in = nnx.Linear(c.embedding_dim, inner, **kw)
        self.embedding_proj_norm = (LayerNorm(c.text_embed_dim, **ln) if c.embedding_proj_norm_type == "layer"
                                    else nnx.data(None))
        self.embedding_proj = nnx.Linear(c.text_embed_dim, inner, **kw)
        self.encoder_hidden_states_proj = (nnx.Linear(c.embedding_dim, inner, **kw)
                                           if c.encoder_hid_proj_type == "linear" else nnx.data(None))
        self.positional_embedding = zeros(1, c.num_embeddings + c.additional_embeddings, inner)
        self.prd_embedding = zeros(1, 1, inner) if c.added_emb_type == "prd" else nnx.data(None)
        self.transformer_blocks = nnx.List(
            [PriorTransformerBlock(inner, c.num_attention_heads, c.attention_head_dim, **kw)
             for _ in range(c.num_layers)]
        )
        self.norm_in = LayerNorm(inner, **ln) if c.norm_in_type == "layer" else nnx.data(None)
        self.norm_out = LayerNorm(inner, **ln)
        self.proj_to_clip_embeddings = nnx.Linear(inner, c.output_dim, **kw)
        self.clip_mean = zeros(1, c.output_dim)
        self.clip_std = zeros(1, c.output_dim)

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array | int | float,
        proj_embedding: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """The predicted image embedding (B, output_dim): the prd token's output (without a prd token, the noisy
        embedding token's; diffusers returns that one as (B, 1, output_dim)).

        Args:
          hidden_states: the current (noisy) image embedding (B, embedding_dim).
          timestep: scalar or (B,) diffusion timestep.
          proj_embedding: the CLIP text embedding (B, text_embed_dim).
          encoder_hidden_states: the text encoder's last hidden states (B, num_embeddings, embedding_dim).
          attention_mask: (B, num_embeddings) text token mask (1/True = real token); also turns on the causal mask.
        """
        c = self.config
        b = hidden_states.shape[0]
        if hidden_states.ndim != 2 or hidden_states.shape[1] != c.embedding_dim:
            raise ValueError(f"hidden_states must be (batch, embedding_dim={c.embedding_dim}), "
                             f"got {tuple(hidden_states.shape)}")
        if proj_embedding.shape != (b, c.text_embed_dim):
            raise ValueError(f"proj_embedding must be (batch={b}, {c.text_embed_dim}) (the CLIP text embedding), "
                             f"got {tuple(proj_embedding.shape)}")
        if self.encoder_hidden_states_proj is not None and encoder_hidden_states is None:
            raise ValueError("this prior projects text hidden states (encoder_hid_proj_type 'linear'): "
                             "encoder_hidden_states is required")
        dtype = self.proj_in.dtype or jnp.float32
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        time = self.time_embedding(timestep_embedding(t, c.inner_dim, flip_sin_to_cos=True, freq_shift=0)
                                   .astype(dtype))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens = []
        if encoder_hidden_states is not None:
            if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
                raise ValueError(f"encoder_hidden_states must be (batch={b}, tokens, {c.embedding_dim}), "
                                 f"got {tuple(encoder_hidden_states.shape)}")
            if self.encoder_hidden_states_proj is not None:
                encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)
            tokens.append(encoder_hidden_states)
        tokens += [self.embedding_proj(proj_embedding)[:, None], time[:, None], self.proj_in(hidden_states)[:, None]]
        text_len = tokens[0].shape[1] if encoder_hidden_states is not None else 0
        head_len = text_len + 2  # tokens before the noisy image embedding
        if self.prd_embedding is not None:
            tokens.append(jnp.broadcast_to(self.prd_embedding.get_value().astype(dtype), (b, 1, c.inner_dim)))
        x = jnp.concatenate([tok.astype(dtype) for tok in tokens], axis=1)
        positions = self.positional_embedding.get_value().astype(dtype)
        if positions.shape[1] < x.shape[1]:  # diffusers pads the position embedding with zeros around the image
            tail = 1 if self.prd_embedding is not None else 0
            positions = jnp.pad(positions, ((0, 0), (head_len, tail), (0, 0)))
        if positions.shape[1] != x.shape[1]:
            raise ValueError(f"the prior has {positions.shape[1]} positions (num_embeddings + additional_embeddings) "
                             f"but got {x.shape[1]} tokens ({text_len} text tokens)")
        x = x + positions
        bias = None
        if attention_mask is not None:
            if attention_mask.shape != (b, c.num_embeddings) or text_len != c.num_embeddings:
                raise ValueError(f"attention_mask must be (batch={b}, num_embeddings={c.num_embeddings}) with as many "
                                 f"text tokens; got mask {tuple(attention_mask.shape)} and {text_len} tokens")
            keys = (1.0 - attention_mask.astype(jnp.float32)) * _MASKED
            keys = jnp.pad(keys, ((0, 0), (0, c.additional_embeddings)))
            n = x.shape[1]
            causal = jnp.where(jnp.arange(n)[None, :] > jnp.arange(n)[:, None], _MASKED, 0.0)
            bias = (keys[:, None, :] + causal[None])[:, None]  # (B, 1, T, T)
        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, bias)
        x = self.norm_out(x)
        x = x[:, -1] if self.prd_embedding is not None else x[:, head_len]
        return self.proj_to_clip_embeddings(x)

    def post_process_latents(self, latents: jax.Array) -> jax.Array:
        """Un-normalise a sampled embedding: latents * clip_std + clip_mean (the CLIP image embedding space)."""
        std = self.clip_std.get_value().astype(latents.dtype)
        mean = self.clip_mean.get_value().astype(latents.dtype)
        return latents * std + mean


def sample_prior(
    prior: PriorTransformer,
    sampler: Any,
    text_embeds: jax.Array,
    text_hidden_states: jax.Array,
    text_mask: jax.Array,
    *,
    negative: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    guidance_scale: float = 4.0,
    key: jax.Array | None = None,
    latents: jax.Array | None = None,
    step_noise: jax.Array | None = None,
) -> jax.Array:
    """CLIP text embedding -> CLIP image embedding (B, output_dim): the unCLIP prior loop in one jit.

    Args:
      prior: the PriorTransformer.
      sampler: a `fusion_jax.schedulers.unclip.UnCLIPSampler` (or any Sampler of the same interface).
      text_embeds, text_hidden_states, text_mask: the CLIP text encoder's `text_embeds` (B, text_embed_dim),
        `last_hidden_state` (B, num_embeddings, embedding_dim) and the token mask (B, num_embeddings).
      negative: the same three for the unconditional prompt (the empty string), batch B or 1; needed when
        guidance_scale > 1 (as in diffusers, guidance is off at guidance_scale <= 1).
      key: PRNG key for the initial latents and the step noise (unless both are given).
      latents: initial embedding x_T (B, embedding_dim), scaled by sampler.init_noise_sigma.
      step_noise: (num_steps, B, embedding_dim) noise for each step (to reproduce another implementation's draws).
    """
    b = text_embeds.shape[0]
    shape = (b, prior.config.embedding_dim)
    if (latents is None or step_noise is None) and key is None:
        raise ValueError("sample_prior needs a PRNG `key` unless both `latents` and `step_noise` are given")
    key_latents, key_steps = jax.random.split(key) if key is not None else (None, None)
    if latents is None:
        latents = jax.random.normal(key_latents, shape, jnp.float32)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must be (batch, embedding_dim) = {shape}, got {tuple(latents.shape)}")
    if step_noise is not None and tuple(step_noise.shape) != (sampler.num_steps, *shape):
        raise ValueError(f"step_noise must be (num_steps, batch, embedding_dim) = {(sampler.num_steps, *shape)}, "
                         f"got {tuple(step_noise.shape)}")
    guided = guidance_scale > 1.0
    if guided:
        if negative is None:
            raise ValueError("guidance_scale > 1 needs `negative` (text_embeds, hidden states, mask of the empty "
                             "prompt)")
        neg = [jnp.broadcast_to(n, (b, *n.shape[1:])) for n in negative]
        text_embeds = jnp.concatenate([neg[0], text_embeds])
        text_hidden_states = jnp.concatenate([neg[1], text_hidden_states])
        text_mask = jnp.concatenate([neg[2], text_mask])
    return _sample_prior_jit(prior, sampler, float(guidance_scale), text_embeds, text_hidden_states, text_mask,
                             latents * sampler.init_noise_sigma, key_steps, step_noise)


@nnx.jit(static_argnums=(1, 2))
def _sample_prior_jit(prior, sampler, guidance_scale, text_embeds, text_hidden_states, text_mask, latents, key,
                      step_noise):
    guided = guidance_scale > 1.0
    timesteps = sampler.timesteps

    def body(i, carry):
        x, state = carry
        model_in = jnp.concatenate([x, x]) if guided else x
        pred = prior(sampler.scale_model_input(model_in, i), timesteps[i], text_embeds, text_hidden_states,
                     text_mask)
        if guided:
            uncond, cond = jnp.split(pred, 2)
            pred = uncond + guidance_scale * (cond - uncond)
        noise = None if step_noise is None else step_noise[i]
        return sampler.step(state, pred, x, i, key, noise=noise)

    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (latents, sampler.init_state(latents)))
    return prior.post_process_latents(x)
