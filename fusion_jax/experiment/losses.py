"""The loss of an experiment: model inputs from the frozen encoders (or the batch), then the objective.

`make_loss(...)` returns the trainer's `loss_fn(model, batch, rng) -> (loss, aux)`. Inputs: `model.latents`
`vae` encodes target and reference images with the frozen VAE inside the step, `preencoded` samples the batch's
pre-encoded VAE moments, `pixel` feeds [-1, 1] pixels to the UNet. The objective is `text_to_image` (the plain
denoising loss with text dropout) or the identity method's own `loss` on the generic batch of
`fusion_jax.identity.base` (plus the stream fields the method names in `batch_keys`). Encoder outputs are under
`stop_gradient`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.config import ExperimentConfig
from fusion_jax.experiment.models import TrainModel, identity_method
from fusion_jax.identity import base as identity_base
from fusion_jax.models.pixels import fold_pixels
from fusion_jax.schedulers import NoiseSchedule, add_noise, snr, training_target


def _latents_from_moments(mean, logvar, key, scale, shift):
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - shift) * scale


def _encode_images(vae, images: jax.Array, key: jax.Array) -> jax.Array:
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    z = vae.latents_from_images(flat, key)
    return z.reshape(lead + z.shape[1:])


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Per-sample Min-SNR-gamma weight of the loss on the schedule's prediction target (1 where gamma <= 0)."""
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    s = snr(schedule, t).astype(jnp.float32)
    clipped = jnp.minimum(s, gamma)
    kind = schedule.prediction_type
    if kind == "epsilon":
        return clipped / s
    if kind == "v_prediction":
        return clipped / (s + 1.0)
    if kind == "sample":
        return clipped
    raise ValueError(f"objective.min_snr_gamma: no Min-SNR weight for prediction_type {kind!r}")


def text_to_image_loss(unet, x0, text, empty, rng, schedule: NoiseSchedule, text_dropout: float,
                       min_snr_gamma: float = 0.0):
    """The plain denoising loss: caption replaced by the empty prompt with probability `text_dropout`; optionally
    Min-SNR-gamma weighted per sample."""
    k_t, k_noise, k_text = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
    drop = jax.random.bernoulli(k_text, text_dropout, (b,))
    ehs = jnp.where(drop[:, None, None], jnp.broadcast_to(empty, text.shape), text)
    pred = unet(add_noise(schedule, x0, noise, t), t, ehs).astype(jnp.float32)
    target = training_target(schedule, x0, noise, t).astype(jnp.float32)
    if min_snr_gamma > 0:
        per_sample = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
        loss = jnp.mean(per_sample * min_snr_weight(schedule, t, min_snr_gamma))
    else:  # the plain mean, computed as before the option existed (same numbers)
        loss = jnp.mean((pred - target) ** 2)
    return loss, {"text_dropped": jnp.mean(drop.astype(jnp.float32))}


def make_loss(config: ExperimentConfig, *, schedule: NoiseSchedule, empty_ids: Optional[np.ndarray],
              empty_text_emb: Optional[np.ndarray], latent_scale: tuple[float, float], pixel_fold: int = 1):
    """`loss_fn(model, batch, rng) -> (loss, aux)` for `config`'s latents mode and objective (`pixel_fold`: the
    f of a pixel-space UNet with 3 f^2 input channels, `models/pixels.py`)."""
    fold = pixel_fold
    mode, objective = config.model.latents, config.objective
    method = identity_method(config)
    method_cfg = identity_base.method_config(config, method) if method is not None else None
    scale, shift = latent_scale

    def inputs(model: TrainModel, batch, rng):
        k_x, k_ref = jax.random.split(rng)
        refs = None
        if mode == "preencoded":
            x0 = _latents_from_moments(batch["latent_mean"], batch["latent_logvar"], k_x, scale, shift)
            if method is not None:
                refs = _latents_from_moments(batch["reference_latent_mean"], batch["reference_latent_logvar"],
                                             k_ref, scale, shift)
            text = batch["text_embedding"]
            empty = jnp.asarray(empty_text_emb)[None]
        else:
            if mode == "vae":
                x0 = _encode_images(model.vae, batch["target"], k_x)
                refs = _encode_images(model.vae, batch["references"], k_ref) if method is not None else None
            else:  # pixel: folded f x f into channels when the UNet has 3 f^2 of them
                x0, refs = batch["target"], batch.get("references") if method is not None else None
                x0 = fold_pixels(x0, fold)
                refs = fold_pixels(refs, fold) if refs is not None else None
            text = model.text_encoder(batch["input_ids"]).last_hidden_state
            empty = model.text_encoder(jnp.asarray(empty_ids)[None]).last_hidden_state
        return jax.tree.map(jax.lax.stop_gradient, (x0, refs, text, empty))

    def loss_fn(model: TrainModel, batch, rng):
        k_in, k_obj = jax.random.split(rng)
        x0, refs, text, empty = inputs(model, batch, k_in)
        dtype = (method.base_unet(model.unet) if method is not None else model.unet).dtype
        x0, text, empty = (a.astype(dtype) for a in (x0, text, empty))
        if method is None:
            return text_to_image_loss(model.unet, x0, text, empty, k_obj, schedule, objective.text_dropout,
                                      objective.min_snr_gamma)
        generic = {"latents": x0, "text_emb": text, "empty_text_emb": empty, "reference_latents": refs.astype(dtype)}
        generic.update({key: batch[key] for key in method.batch_keys})
        return method.loss(model.unet, generic, k_obj, schedule, method_cfg)

    return loss_fn
