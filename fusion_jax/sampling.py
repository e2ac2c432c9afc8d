"""Batch text-to-image as one jitted function: text encode, denoise with guidance, VAE decode.

`generate` takes token ids and returns images. Everything after tokenization happens in one `jax.jit`-compiled
function (text encoder, a `lax.fori_loop` over the sampler's steps with classifier-free guidance, the VAE
decoder), compiled once per (models, settings, shapes) and reused; with a mesh, the batch is sharded over the
`data` axis and the weights are replicated.

`compile_generate` compiles that same function ahead of time (`jax.jit(...).lower(...).compile()`) for given
shapes and returns a `CompiledGenerator` called like `generate`: a server compiles at start-up, and with the
persistent compilation cache (`fusion_jax.runtime`) a second process finds the executable on disk instead of
compiling it (`CompiledGenerator.from_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
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
    # With references (Face Fusion): how the reference branch enters guidance.
    #   disentangled: eps = eps_none + s_text (eps_text - eps_none) + s_ref (eps_text+ref - eps_text)  (FlashFace;
    #                 three predictions per step)
    #   cfg:          eps = eps_none + s_text (eps_text+ref - eps_none)  (two predictions, like IP-Adapter pipelines)
    reference_guidance: str = "disentangled"
    reference_guidance_scale: float = 2.0  # s_ref of the disentangled form
    reference_guidance_max_timestep: int | None = None  # apply s_ref only while t <= this (FlashFace's code: 750)
    # img2img (with an init image): the fraction of the schedule run from the init image's latents noised to
    # that level (diffusers' `strength`: the loop starts at step num_steps - int(num_steps * init_strength))
    init_strength: float = 1.0

    def __post_init__(self):
        if self.reference_guidance not in ("disentangled", "cfg"):
            raise ValueError(f"reference_guidance must be 'disentangled' or 'cfg', got {self.reference_guidance!r}")
        if self.output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {self.output!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0.0 < self.init_strength <= 1.0:
            raise ValueError(f"init_strength must be in (0, 1], got {self.init_strength}")
        if int(self.num_steps * self.init_strength) < 1:
            raise ValueError(f"init_strength={self.init_strength} of {self.num_steps} steps runs no step; raise "
                             "one of them")

    @property
    def start_step(self) -> int:
        """The first step the loop runs: 0 for text-to-image, later for img2img (as diffusers' img2img)."""
        return self.num_steps - min(int(self.num_steps * self.init_strength), self.num_steps)


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
    # out_channels: the latent's channels even when a method widens the UNet's input (FlashFace's mask channel)
    return (batch, cfg.height // f, cfg.width // f, pipeline.unet.config.out_channels)


def decode_latents(vae, latents, output: str):
    """Latents (scaled as the UNet sees them) -> images, uint8 [0, 255] or float [-1, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents / vae.config.scaling_factor + shift)
    images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
    if output == "uint8":
        return jnp.round((images + 1.0) * 127.5).astype(jnp.uint8)
    return images


def denoise_step_fn(unet, sampler, text_uncond, text_cond, key, cfg: SamplingConfig, added_cond=None):
    """The body of `denoise`'s loop, `(i, (x, state)) -> (x, state)`: one guided step (also used to count the
    FLOPs of one step, as XLA's cost analysis counts a loop body once). `added_cond`: SDXL's
    {'text_embeds', 'time_ids'} for the [uncond; cond] rows."""
    context = jnp.concatenate([text_uncond, text_cond], axis=0)

    def step(i, carry):
        x, state = carry
        x_in = sampler.scale_model_input(x, i)
        out = unet(jnp.concatenate([x_in, x_in], axis=0), sampler.timesteps[i], context, added_cond)
        eps_uncond, eps_text = jnp.split(out.astype(jnp.float32), 2, axis=0)
        eps = guided_prediction(eps_uncond, eps_text, cfg.guidance_scale, cfg.guidance_rescale)
        return sampler.step(state, eps, x, i, key)  # the sampler folds i into the key itself

    return step


def denoise(unet, sampler, latents, text_uncond, text_cond, key, cfg: SamplingConfig, start: int = 0,
            added_cond=None):
    """The sampler loop with classifier-free guidance: one batched UNet call (uncond + text) per step, from step
    `start` (img2img) to the end."""
    step = denoise_step_fn(unet, sampler, text_uncond, text_cond, key, cfg, added_cond)
    latents, _ = jax.lax.fori_loop(start, cfg.num_steps, step, (latents, sampler.init_state(latents)))
    return latents


def identity_guided_prediction(unet, x_in, t, text_uncond, text_cond, context, cfg: SamplingConfig):
    """The guided prediction of one step with references.

    Rows that ignore the references (uncond, and text-only for the disentangled form) run as one batched base
    call with `identity=None`, which skips the identity path; the text+reference rows run as a second call. (One
    call with strength 0 on those rows would give the same numbers but pay the reference-token attention for
    every row.)
    """
    if cfg.reference_guidance == "cfg":
        eps_none = unet(x_in, t, text_uncond).astype(jnp.float32)
        eps_ref = unet(x_in, t, text_cond, identity=context).astype(jnp.float32)
        eps = eps_none + cfg.guidance_scale * (eps_ref - eps_none)
    else:
        base = unet(jnp.concatenate([x_in, x_in], axis=0), t, jnp.concatenate([text_uncond, text_cond], axis=0))
        eps_none, eps_text = jnp.split(base.astype(jnp.float32), 2, axis=0)
        eps_ref = unet(x_in, t, text_cond, identity=context).astype(jnp.float32)
        s_ref = jnp.float32(cfg.reference_guidance_scale)
        if cfg.reference_guidance_max_timestep is not None:
            s_ref = jnp.where(t <= cfg.reference_guidance_max_timestep, s_ref, 0.0)
        eps = eps_none + cfg.guidance_scale * (eps_text - eps_none) + s_ref * (eps_ref - eps_text)
    if cfg.guidance_rescale > 0:
        eps = schedulers.guidance_rescale(eps, eps_ref, cfg.guidance_rescale)
    return eps


def reference_parts(text_uncond, text_cond, empty_text, ref_latents, inputs, schedule) -> "SamplingParts":
    """The traced values an identity method's `encode_references` / `guided_prediction` read."""
    from fusion_jax.identity.base import SamplingParts

    return SamplingParts(text_uncond=text_uncond, text_cond=text_cond, empty_text=empty_text, ref_latents=ref_latents,
                         inputs=inputs, schedule=schedule, batch=text_cond.shape[0])


def reference_step_fn(model, sampler, method, method_cfg, parts, cache, key, cfg: SamplingConfig):
    """The body of `denoise_with_references`' loop, `(i, (x, state)) -> (x, state)`: one step with the identity
    method's guided prediction (`cache` from its `encode_references`, computed once before the loop)."""
    ref_key, step_key = jax.random.split(key)

    def step(i, carry):
        x, state = carry
        x_in = sampler.scale_model_input(x, i)
        eps = method.guided_prediction(model, method_cfg, cfg, cache, parts, x_in, sampler.timesteps[i], i, ref_key)
        return sampler.step(state, eps, x, i, step_key)

    return step


def denoise_with_references(model, sampler, latents, parts, key, cfg: SamplingConfig, method, method_cfg,
                            start: int = 0):
    """The sampler loop with an identity method: its once-per-image part (e.g. Face Fusion's `fixed` reference
    tokens) before the loop, its guided prediction at every step from `start` (img2img) on."""
    cache = method.encode_references(model, method_cfg, parts, key)
    step = reference_step_fn(model, sampler, method, method_cfg, parts, cache, key, cfg)
    latents, _ = jax.lax.fori_loop(start, cfg.num_steps, step, (latents, sampler.init_state(latents)))
    return latents


def encode_reference_images(vae, images):
    """Reference crops (B, [K,] N, H, W, 3) in [-1, 1] -> scaled VAE latents (B, [K,] N, h, w, C) (posterior mean,
    as the references are conditioning, not samples)."""
    lead, (h, w, c) = images.shape[:-3], images.shape[-3:]
    flat = images.reshape((-1, h, w, c))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (vae.encode(flat).mean - shift) * vae.config.scaling_factor
    return latents.reshape(lead + latents.shape[1:])


def encode_prompts(text_encoders, ids):
    """Prompt ids -> (hidden states (B, L, D), pooled embedding or None).

    One encoder (SD 1.x / 2.x): its last hidden state. Two (SDXL; ids (B, 2, L), one row per tokenizer): both
    encoders' penultimate hidden states concatenated on the feature axis, and the second encoder's projected
    pooled output (`text_embeds`), as diffusers' StableDiffusionXLPipeline.encode_prompt."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids).last_hidden_state, None
    first = text_encoders[0](ids[:, 0], output_hidden_states=True)
    second = text_encoders[1](ids[:, 1], output_hidden_states=True)
    hidden = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
    return hidden, second.text_embeds


def _text_to_image(models, inputs, noise, key, *, cfg: SamplingConfig, schedule, identity_cfg):
    unet, vae, text_encoders = models[0], models[1], models[2:]
    sampler = _make_sampler(cfg, schedule)
    text_cond, pooled_cond = encode_prompts(text_encoders, inputs["input_ids"])
    text_uncond, pooled_uncond = encode_prompts(text_encoders, inputs["uncond_ids"])
    added_cond = None
    if pooled_cond is not None:  # SDXL: zero negatives where asked, pooled text + size conditioning
        zero = inputs["zero_uncond"]
        text_uncond = jnp.where(zero[:, None, None], 0.0, text_uncond)
        pooled_uncond = jnp.where(zero[:, None], 0.0, pooled_uncond)
        time_ids = jnp.concatenate([inputs["time_ids"]] * 2, axis=0)
        added_cond = {"text_embeds": jnp.concatenate([pooled_uncond, pooled_cond], axis=0), "time_ids": time_ids}
    start = 0
    if "init_images" in inputs:  # img2img: the init image's latents noised to the first step run
        start = cfg.start_step
        x0 = encode_reference_images(vae, inputs["init_images"].astype(jnp.float32))
        latents = sampler.noise_to_step(x0, noise, start)
    else:
        latents = noise.astype(jnp.float32) * sampler.init_noise_sigma
    if "references" not in inputs:
        latents = denoise(unet, sampler, latents, text_uncond, text_cond, key, cfg, start, added_cond)
    else:
        from fusion_jax.identity import base as identity_base

        empty_text, _ = encode_prompts(text_encoders, inputs["empty_ids"])
        ref_latents = encode_reference_images(vae, inputs["references"].astype(jnp.float32))
        parts = reference_parts(text_uncond, text_cond, empty_text, ref_latents, inputs, schedule)
        latents = denoise_with_references(unet, sampler, latents, parts, key, cfg,
                                          identity_base.for_config(identity_cfg), identity_cfg, start)
    return decode_latents(vae, latents, cfg.output)


@functools.lru_cache(maxsize=32)
def _compiled(graphdefs, cfg: SamplingConfig, schedule, identity_cfg, mesh: Mesh | None):
    """One jitted function per (model structure, settings, identity method config, mesh); jax.jit then caches per
    input shape."""

    def run(states, inputs, noise, key):
        models = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, states))
        return _text_to_image(models, inputs, noise, key, cfg=cfg, schedule=schedule, identity_cfg=identity_cfg)

    if mesh is None:
        return jax.jit(run)
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    # every per-example input (ids, references, masks, strengths, noise) is split over `data`
    return jax.jit(run, in_shardings=(replicated, batch, batch, replicated), out_shardings=batch)


def generate(
    pipeline: Pipeline,
    input_ids,
    *,
    key: jax.Array,
    cfg: SamplingConfig = SamplingConfig(),
    uncond_ids=None,
    noise=None,
    mesh: Mesh | None = None,
    references=None,
    reference_valid=None,
    strength=None,
    boxes=None,
    identity_cfg=None,
    fusion_cfg=None,
    face_embeddings=None,
    init_images=None,
    identity_masks=None,
    style_images=None,
) -> jax.Array:
    """Generate one image per row of `input_ids` (B, L) int32; `uncond_ids` defaults to the empty prompt.

    `noise` (B, h, w, C) is the initial latent noise (before the sampler's `init_noise_sigma`); by default it is
    drawn from `key` for the whole batch at once, so a batch gives the same images however it is sharded.
    With `mesh`, B must be divisible by the mesh's `data` axis.

    Identity (any registered identity method; `pipeline.unet` must be that method's identity model, e.g. the UNet
    with Face Fusion's projections attached):
      references: aligned reference crops in [-1, 1], (B, N, H, W, 3) for one person or (B, K, N, H, W, 3) for K
        people.
      reference_valid: (B, K, N) bool, False for padding references.
      strength: identity strength, scalar / (K,) / (B, K) (default: the method config's).
      boxes: (B, K, 4) pixel boxes (x0, y0, x1, y1) of each person's region / face in the generated image (what
        the method does with them is its own: Face Fusion's region masks, FlashFace's face-position mask).
      identity_cfg: the method's config (its type selects the method: a FusionConfig -> Face Fusion); default
        Face Fusion's defaults. `fusion_cfg` is the older name of the same argument.
      face_embeddings: (B, K, N, D) ArcFace embeddings of the references, for the methods that read them
        (IP-Adapter-FaceID, FaceStudio).
      identity_masks: (B, K, height, width) bool instance masks of each person's region (instead of boxes), for
        the methods with region masks (`accepts_identity_masks`: Face Fusion, FaceStudio, IP-Adapter-FaceID).
      style_images: (B, H, W, 3) style images in [-1, 1], one per row, for the methods with a style input
        (`accepts_style_images`: FaceStudio; it resizes them to its style tower's input).

    img2img: `init_images` (B, height, width, 3) in [-1, 1]: the loop starts at `cfg.start_step` from their VAE
    latents (posterior mean; diffusers samples the posterior) noised to that step with `noise`. An identity method
    may supply them instead (FaceStudio's style image, `facestudio.img2img`).
    """
    compile_key, args = _prepare(
        pipeline, input_ids, key=key, cfg=cfg, uncond_ids=uncond_ids, noise=noise, mesh=mesh, references=references,
        reference_valid=reference_valid, strength=strength, boxes=boxes, identity_cfg=identity_cfg,
        fusion_cfg=fusion_cfg, face_embeddings=face_embeddings, init_images=init_images, identity_masks=identity_masks,
        style_images=style_images)
    return _compiled(*compile_key)(*args)


def _prepare(
    pipeline: Pipeline,
    input_ids,
    *,
    key: jax.Array,
    cfg: SamplingConfig = SamplingConfig(),
    uncond_ids=None,
    noise=None,
    mesh: Mesh | None = None,
    references=None,
    reference_valid=None,
    strength=None,
    boxes=None,
    identity_cfg=None,
    fusion_cfg=None,
    face_embeddings=None,
    init_images=None,
    identity_masks=None,
    style_images=None,
) -> tuple[tuple, tuple]:
    """`generate`'s host side: checks the request and returns (the compile key of `_compiled`, its arguments)."""
    runtime.enable_compilation_cache()
    input_ids = jnp.asarray(input_ids, jnp.int32)
    dual = getattr(pipeline, "two_text_encoders", False)
    if dual and (input_ids.ndim != 3 or input_ids.shape[1] != 2):
        raise ValueError(f"input_ids must be (batch, 2, length) for a two-encoder (SDXL) pipeline, one row per "
                         f"tokenizer (sampling.tokenize makes them); got shape {input_ids.shape}")
    if not dual and input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length); got shape {input_ids.shape}")
    batch = input_ids.shape[0]
    empty = tokenize(pipeline, [""] * batch)
    zero_uncond = np.full((batch,), uncond_ids is None and getattr(pipeline, "force_zeros_for_empty_prompt", False))
    if uncond_ids is None:
        uncond_ids = empty
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
    inputs = {"input_ids": input_ids, "uncond_ids": uncond_ids}
    if dual:  # SDXL: which negatives are zeros (no negative prompt, diffusers' force_zeros_for_empty_prompt) and
        # the size conditioning (original size, crop top-left, target size) = the generated size, no crop
        inputs["zero_uncond"] = jnp.asarray(zero_uncond)
        inputs["time_ids"] = jnp.asarray(np.tile([[cfg.height, cfg.width, 0, 0, cfg.height, cfg.width]], (batch, 1)),
                                         jnp.float32)
        if references is not None:
            raise ValueError("identity methods on two-encoder (SDXL) pipelines are not supported yet: their "
                             "predictions do not pass SDXL's pooled-text / size conditioning")
    if identity_cfg is not None and fusion_cfg is not None:
        raise ValueError("give identity_cfg or its older name fusion_cfg, not both")
    identity_cfg = identity_cfg if identity_cfg is not None else fusion_cfg
    if references is not None:
        from fusion_jax.identity.base import ReferenceRequest

        request = ReferenceRequest(references, reference_valid, strength, boxes, face_embeddings, identity_masks,
                                   style_images)
        identity_cfg = _identity_inputs(pipeline, cfg, inputs, request, identity_cfg, batch)
    elif boxes is not None or reference_valid is not None or face_embeddings is not None \
            or identity_masks is not None or style_images is not None:
        raise ValueError("boxes / reference_valid / face_embeddings / identity_masks / style_images given without "
                         "references")
    else:
        identity_cfg = None  # text only: the identity method takes no part (and is not part of the compile key)
    if init_images is not None:
        if "init_images" in inputs:
            raise ValueError("init_images given while the identity method supplies its own (e.g. facestudio.img2img"
                             "); give one of them")
        inputs["init_images"] = check_init_images(init_images, batch, cfg)
    if "init_images" in inputs and not _make_sampler(cfg, pipeline.schedule).supports_partial:
        raise ValueError(f"img2img: the {cfg.scheduler} sampler cannot start part-way; use ddim, euler or "
                         "euler_ancestral")
    models = (pipeline.unet, pipeline.vae, pipeline.text_encoder) + ((pipeline.text_encoder_2,) if dual else ())
    graphdefs, states = zip(*(nnx.split(m) for m in models))
    return (tuple(graphdefs), cfg, pipeline.schedule, identity_cfg, mesh), (tuple(states), inputs, jnp.asarray(noise),
                                                                          step_key)


_cache_hits = [0]  # persistent compilation cache hits seen by this process (jax.monitoring event)


def _count_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits[0] += 1


@functools.lru_cache(maxsize=1)
def _listen_for_cache_hits() -> None:
    jax.monitoring.register_event_listener(_count_cache_hit)


@dataclasses.dataclass
class CompiledGenerator:
    """`generate` compiled ahead of time for one pipeline structure, settings and input shapes
    (`compile_generate`). Call it like `generate` (same keyword arguments, except `cfg` and `mesh`, which are
    fixed): the first image pays no compile. New weights of the same structure are fine (they are arguments)."""

    pipeline: Pipeline
    cfg: SamplingConfig
    mesh: Mesh | None
    compiled: Any  # jax.stages.Compiled
    compile_key: tuple  # what `_compiled` was called with: (graphdefs, cfg, schedule, identity_cfg, mesh)
    compile_seconds: float
    from_cache: bool  # the executable came from the persistent compilation cache (runtime.py's folder)

    def __call__(self, input_ids, *, key: jax.Array, pipeline: Pipeline | None = None, **options) -> jax.Array:
        compile_key, args = _prepare(pipeline or self.pipeline, input_ids, key=key, cfg=self.cfg, mesh=self.mesh,
                                     **options)
        if compile_key != self.compile_key:
            raise ValueError("compiled generator: this call has another model structure, identity method or "
                             "settings than the one compiled; call compile_generate for it (or use generate)")
        try:
            return self.compiled(*args)
        except (TypeError, ValueError) as e:  # jax names the argument whose shape / dtype differs
            raise ValueError(f"compiled generator: the inputs differ from the compiled shapes ({e}); call "
                             "compile_generate with these shapes (or use generate)") from None


def compile_generate(pipeline: Pipeline, input_ids=None, *, batch: int = 1, cfg: SamplingConfig = SamplingConfig(),
                     mesh: Mesh | None = None, key: jax.Array | None = None, **options) -> CompiledGenerator:
    """Ahead-of-time compile of `generate` (`jax.jit(...).lower(...).compile()`) for the shapes of the example
    request: `input_ids` (B, L) (default: `batch` empty prompts) and `generate`'s keyword `options` (references,
    boxes, ... of the shapes to serve; their values do not matter). With the persistent compilation cache on
    (`runtime.enable_compilation_cache`, done here as `generate` does) a later process with the same shapes
    loads the executable from disk instead of compiling (`from_cache`), so its first image costs no compile.
    The executable is the very one `generate` runs: same program, same images."""
    runtime.enable_compilation_cache()
    _listen_for_cache_hits()
    if input_ids is None:
        input_ids = tokenize(pipeline, [""] * batch)
    compile_key, args = _prepare(pipeline, input_ids, key=jax.random.key(0) if key is None else key, cfg=cfg,
                                 mesh=mesh, **options)
    hits, start = _cache_hits[0], time.perf_counter()
    compiled = _compiled(*compile_key).lower(*args).compile()
    return CompiledGenerator(pipeline, cfg, mesh, compiled, compile_key, time.perf_counter() - start,
                             _cache_hits[0] > hits)


def check_init_images(images, batch: int, cfg: SamplingConfig) -> jax.Array:
    """img2img init images -> (B, H, W, 3) float32; the error names the expected shape."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
        images = jnp.broadcast_to(images[None], (batch,) + images.shape)
    if images.shape != (batch, cfg.height, cfg.width, 3):
        raise ValueError(f"init_images must be (B={batch}, {cfg.height}, {cfg.width}, 3) images in [-1, 1] (the "
                         f"generated size), got shape {tuple(images.shape)}")
    return images


def _identity_inputs(pipeline, cfg, inputs, request, identity_cfg, batch):
    """Validate the reference arguments on the host (the generic ones here, the rest by the method) and add them
    to the jitted function's inputs; returns the method config in force."""
    from fusion_jax.identity import base as identity_base

    if identity_cfg is None:
        identity_cfg = identity_base.default_method().config_class()
    method = identity_base.for_config(identity_cfg)
    if request.masks is not None and not method.accepts_identity_masks:
        raise ValueError(f"identity_masks: {method.display_name or method.name} takes no instance masks (boxes "
                         "only)")
    if request.style_images is not None:
        if not method.accepts_style_images:
            raise ValueError(f"style_images: {method.display_name or method.name} takes no style image")
        styles = np.asarray(request.style_images, np.float32)
        if styles.ndim != 4 or styles.shape[0] != batch or styles.shape[-1] != 3:
            raise ValueError(f"style_images must be (B={batch}, H, W, 3) images in [-1, 1], one per row; got shape "
                             f"{np.shape(request.style_images)}")
        request = dataclasses.replace(request, style_images=styles)
    refs = jnp.asarray(request.references, jnp.float32)
    if refs.ndim == 5:
        refs = refs[:, None]
    if refs.ndim != 6 or refs.shape[-1] != 3 or refs.shape[0] != batch:
        raise ValueError(f"references must be (B={batch}, N, H, W, 3) or (B, K, N, H, W, 3) images in [-1, 1]; "
                         f"got shape {tuple(np.shape(request.references))}")
    f = pipeline.vae_scale_factor
    if refs.shape[3] % f or refs.shape[4] % f:
        raise ValueError(f"references: crop size {refs.shape[3]}x{refs.shape[4]} must be a multiple of {f}")
    k, n = refs.shape[1], refs.shape[2]
    reference_valid = request.reference_valid
    if reference_valid is None:
        reference_valid = np.ones((batch, k, n), bool)
    reference_valid = jnp.asarray(reference_valid, bool)
    if reference_valid.shape != (batch, k, n):
        raise ValueError(f"reference_valid must be (B, K, N)={(batch, k, n)}, got {reference_valid.shape}")
    embeddings = request.face_embeddings
    if embeddings is not None:
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim == 3:
            embeddings = embeddings[:, None]
        if embeddings.ndim != 4 or embeddings.shape[:3] != (batch, k, n):
            raise ValueError(f"face_embeddings must be (B, K, N, D)=({batch}, {k}, {n}, D) like the references, got "
                             f"shape {np.shape(request.face_embeddings)}")
    request = dataclasses.replace(request, references=refs, reference_valid=reference_valid,
                                  face_embeddings=embeddings)
    inputs.update(references=refs, reference_valid=reference_valid,
                  empty_ids=jnp.asarray(pipeline.tokenizer([""] * batch), jnp.int32))
    inputs.update(method.sampling_inputs(pipeline.unet, identity_cfg, request, batch=batch,
                                         image_size=(cfg.height, cfg.width),
                                         latent_size=(cfg.height // f, cfg.width // f)))
    return identity_cfg


def tokenize(pipeline: Pipeline, prompts: list[str]) -> np.ndarray:
    """Prompt ids: (B, L) int32, or (B, 2, L) for a two-encoder (SDXL) pipeline (one row per tokenizer)."""
    ids = np.asarray(pipeline.tokenizer(list(prompts)), np.int32)
    if getattr(pipeline, "tokenizer_2", None) is None:
        return ids
    return np.stack([ids, np.asarray(pipeline.tokenizer_2(list(prompts)), np.int32)], axis=1)
