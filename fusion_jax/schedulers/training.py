"""Forward diffusion and training targets: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, for integer t.

Pure jittable functions of (schedule, arrays); the schedule is static (hashable). Samples have a leading
batch axis (NHWC latents: (B, H, W, C)) and `t` has shape (B,), one training timestep per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusion_jax.schedulers.noise_schedule import NoiseSchedule


def _per_sample(schedule: NoiseSchedule, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(a_t) and sqrt(1 - a_t) for each sample, shaped to broadcast against x."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must hold integer training timesteps, got dtype {t.dtype}")
    if t.ndim != 1 or x.ndim < 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) matching x's batch; got t {t.shape} for x {x.shape}")
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, dtype=jnp.float32)[t]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return jnp.sqrt(alphas_cumprod).reshape(shape), jnp.sqrt(1.0 - alphas_cumprod).reshape(shape)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The noisy sample x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    sqrt_alpha, sqrt_one_minus_alpha = _per_sample(schedule, x0, t)
    return (sqrt_alpha * x0 + sqrt_one_minus_alpha * noise).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target v_t = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
    sqrt_alpha, sqrt_one_minus_alpha = _per_sample(schedule, x0, t)
    return (sqrt_alpha * noise - sqrt_one_minus_alpha * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model should output for x_t: noise, velocity or x0, by schedule.prediction_type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio a_t / (1 - a_t) at integer timesteps t (any shape), float32 (e.g. Min-SNR weights)."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must hold integer training timesteps, got dtype {t.dtype}")
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, dtype=jnp.float32)[t]
    return alphas_cumprod / (1.0 - alphas_cumprod)
