"""Batch text-to-image as one jitted function: text encode, denoise with guidance, VAE decode.

`generate` takes token ids and returns images. Everything after tokenization happens in one `jax.jit`-compiled
function (text encoder, a `lax.fori_loop` over the sampler's steps with classifier-free guidance, the VAE
decoder), compiled once per (models, settings, shapes) and reused; with a mesh, the batch is sharded over the
`data` axis and the weights are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fusion_jax import runtime, schedulers
from fusion_jax.weights import Pipeline


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Settings of one generation call (hashable: part of the compilation key)."""

    num_steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance scale s_text (1 = no guidance)
    guidance_rescale: float = 0.0  # phi of "Common Diffusion Noise Schedules are Flawed" (0 = off)
    scheduler: str = "ddim"  # ddim | dpmpp_2m | euler | euler_ancestral
    scheduler_options: tuple[tuple[str, Any], ...] = ()  # extra sampler options, e.g. (("eta", 0.0),)
    height: int = 512  # image height in pixels (multiple of the VAE's downsampling factor)
    width: int = 512  # image width in pixels
    output: str = "uint8"  # "uint8" images in [0, 255] or "float" images in [-1, 1]


def _make_sampler(cfg: SamplingConfig, schedule: schedulers.NoiseSchedule):
    return schedulers.make_sampler(cfg.scheduler, schedule, cfg.num_steps, **dict(cfg.scheduler_options))


def guided_prediction(eps_uncond, eps_text, guidance_scale: float, guidance_rescale: float):
    """Classifier-free guidance, optionally rescaled towards the text prediction's standard deviation."""
    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
    if guidance_rescale > 0:
        eps = schedulers.guidance_rescale(eps, eps_text, guidance_rescale)
    return eps


def latent_shape(pipeline: Pipeline, cfg: SamplingConfig, batch: int) -> tuple[int, int, int, int]:
    f = pipeline.vae_scale_factor
    unet_factor = 2 ** (len(pipeline.unet.config.block_out_channels) - 1)  # the UNet halves the latent per level
    if cfg.height % (f * unet_factor) or cfg.width % (f * unet_factor):
        raise ValueError(f"height and width must be multiples of {f * unet_factor} (VAE factor {f} x UNet factor "
                         f"{unet_factor}); got {cfg.height}x{cfg.width}")
    return (batch, cfg.height // f, cfg.width // f, pipeline.unet.config.in_channels)


def decode_latents(vae, latents, output: str):
    """Latents (scaled as the UNet sees them) -> images, uint8 [0, 255] or float [-1, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents / vae.config.scaling_factor + shift)
    images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
    if output == "uint8":
        return jnp.round((images + 1.0) * 127.5).astype(jnp.uint8)
    return images


def denoise(unet, sampler, latents, text_uncond, text_cond, key, cfg: SamplingConfig):
    """The sampler loop with classifier-free guidance: one batched UNet call (uncond + text) per step."""
    context = jnp.concatenate([text_uncond, text_cond], axis=0)

    def step(i, carry):
        x, state = carry
        x_in = sampler.scale_model_input(x, i)
        out = unet(jnp.concatenate([x_in, x_in], axis=0), sampler.timesteps[i], context)
        eps_uncond, eps_text = jnp.split(out.astype(jnp.float32), 2, axis=0)
        eps = guided_prediction(eps_uncond, eps_text, cfg.guidance_scale, cfg.guidance_rescale)
        return sampler.step(state, eps, x, i, key)  # the sampler folds i into the key itself

    latents, _ = jax.lax.fori_loop(0, cfg.num_steps, step, (latents, sampler.init_state(latents)))
    return latents


def _text_to_image(models, input_ids, uncond_ids, noise, key, *, cfg: SamplingConfig, schedule):
    unet, vae, text_encoder = models
    sampler = _make_sampler(cfg, schedule)
    text_cond = text_encoder(input_ids).last_hidden_state
    text_uncond = text_encoder(uncond_ids).last_hidden_state
    latents = noise.astype(jnp.float32) * sampler.init_noise_sigma
    latents = denoise(unet, sampler, latents, text_uncond, text_cond, key, cfg)
    return decode_latents(vae, latents, cfg.output)


@functools.lru_cache(maxsize=32)
def _compiled(graphdefs, cfg: SamplingConfig, schedule, mesh: Mesh | None):
    """One jitted function per (model structure, settings, mesh); jax.jit then caches per input shape."""

    def run(states, input_ids, uncond_ids, noise, key):
        models = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, states))
        return _text_to_image(models, input_ids, uncond_ids, noise, key, cfg=cfg, schedule=schedule)

    if mesh is None:
        return jax.jit(run)
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    return jax.jit(run, in_shardings=(replicated, batch, batch, batch, replicated), out_shardings=batch)


def generate(
    pipeline: Pipeline,
    input_ids,
    *,
    key: jax.Array,
    cfg: SamplingConfig = SamplingConfig(),
    uncond_ids=None,
    noise=None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Generate one image per row of `input_ids` (B, L) int32; `uncond_ids` defaults to the empty prompt.

    `noise` (B, h, w, C) is the initial latent noise (before the sampler's `init_noise_sigma`); by default it is
    drawn from `key` for the whole batch at once, so a batch gives the same images however it is sharded.
    With `mesh`, B must be divisible by the mesh's `data` axis.
    """
    runtime.enable_compilation_cache()
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length); got shape {input_ids.shape}")
    batch = input_ids.shape[0]
    if uncond_ids is None:
        uncond_ids = np.asarray(pipeline.tokenizer([""] * batch), np.int32)
    uncond_ids = jnp.asarray(uncond_ids, jnp.int32)
    if uncond_ids.shape != input_ids.shape:
        raise ValueError(f"uncond_ids shape {uncond_ids.shape} must equal input_ids shape {input_ids.shape}")
    if mesh is not None and batch % mesh.shape["data"]:
        raise ValueError(f"batch {batch} is not divisible by the mesh's data axis ({mesh.shape['data']})")
    noise_key, step_key = jax.random.split(key)
    shape = latent_shape(pipeline, cfg, batch)
    if noise is None:
        noise = jax.random.normal(noise_key, shape, jnp.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} (batch, h, w, channels); got {tuple(noise.shape)}")
    models = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
    graphdefs, states = zip(*(nnx.split(m) for m in models))
    fn = _compiled(tuple(graphdefs), cfg, pipeline.schedule, mesh)
    return fn(tuple(states), input_ids, uncond_ids, jnp.asarray(noise), step_key)


def tokenize(pipeline: Pipeline, prompts: list[str]) -> np.ndarray:
    return np.asarray(pipeline.tokenizer(list(prompts)), np.int32)
