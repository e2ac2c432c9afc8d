"""Euler and Euler-ancestral (Karras et al. 2022, k-diffusion), as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler.

Both work in sigma space: the latent is x = x0 + sigma * eps (so x_T = noise * init_noise_sigma), and the
model is fed x / sqrt(sigma^2 + 1), the variance-preserving latent it was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.schedulers.base import SigmaTableSampler, SamplerState
from fusion_jax.schedulers.spacing import interpolate_sigmas, karras_sigmas, sigma_to_timestep, spaced_timesteps


@dataclasses.dataclass(frozen=True)
class _SigmaSampler(SigmaTableSampler):
    """Shared parts of the sigma-space samplers: sigma tables, input scaling, x0 prediction."""

    default_spacing: ClassVar[str] = "linspace"
    supports_karras: ClassVar[bool] = False

    @functools.cached_property
    def _sigmas_and_timesteps(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.schedule
        train_sigmas = s.train_sigmas
        timesteps = spaced_timesteps(self.spacing, s.num_train_timesteps, self.num_inference_steps, s.steps_offset)
        # diffusers keeps these timesteps in float32 and interpolates sigma at the float32 values.
        timesteps = timesteps.astype(np.float32).astype(np.float64)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        if self.supports_karras and s.use_karras_sigmas:
            sigma_min = s.sigma_min if s.sigma_min is not None else sigmas[-1]
            sigma_max = s.sigma_max if s.sigma_max is not None else sigmas[0]
            sigmas = karras_sigmas(sigma_min, sigma_max, self.num_inference_steps)
            timesteps = sigma_to_timestep(sigmas, train_sigmas)
        final_sigma = train_sigmas[0] if self.supports_karras and s.final_sigmas_type == "sigma_min" else 0.0
        return np.concatenate([sigmas, [final_sigma]]), timesteps

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = float(np.max(self._sigmas_and_timesteps[0].astype(np.float32)))
        if self.spacing in ("linspace", "trailing"):
            return sigma_max
        return float(np.sqrt(sigma_max**2 + 1.0))

    def scale_model_input(self, x: jax.Array, i: jax.Array | int) -> jax.Array:
        sigma = self.sigmas[i]
        return (x.astype(jnp.float32) / jnp.sqrt(sigma**2 + 1.0)).astype(x.dtype)

    def _predict_x0(self, model_output: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
        prediction_type = self.schedule.prediction_type
        if prediction_type == "epsilon":
            return x - sigma * model_output
        if prediction_type == "v_prediction":
            return model_output * (-sigma / jnp.sqrt(sigma**2 + 1.0)) + x / (sigma**2 + 1.0)
        return model_output


@dataclasses.dataclass(frozen=True)
class EulerSampler(_SigmaSampler):
    """Deterministic Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma."""

    name: ClassVar[str] = "euler"
    supports_karras: ClassVar[bool] = True

    def step(
        self,
        state: SamplerState,
        model_output: jax.Array,
        x: jax.Array,
        i: jax.Array | int,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, SamplerState]:
        del key, noise  # deterministic (diffusers' s_churn is not supported)
        sigmas = self.sigmas
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf = x.astype(jnp.float32)
        x0 = self._predict_x0(model_output.astype(jnp.float32), xf, sigma)
        x_next = xf + (xf - x0) / sigma * (sigma_next - sigma)
        return x_next.astype(x.dtype), state


@dataclasses.dataclass(frozen=True)
class EulerAncestralSampler(_SigmaSampler):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2)."""

    name: ClassVar[str] = "euler_ancestral"
    stochastic: ClassVar[bool] = True

    @functools.cached_property
    def _ancestral_sigmas(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-step (sigma_up, sigma_down), on the host in float64 so sigma_down^2 never rounds below 0."""
        sigmas = self._sigmas_and_timesteps[0]
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = np.sqrt(np.maximum(sigma_next**2 - sigma_up**2, 0.0))
        return sigma_up, sigma_down

    def step(
        self,
        state: SamplerState,
        model_output: jax.Array,
        x: jax.Array,
        i: jax.Array | int,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, SamplerState]:
        sigma = self.sigmas[i]
        sigma_up, sigma_down = self._table(self._ancestral_sigmas[0])[i], self._table(self._ancestral_sigmas[1])[i]
        xf = x.astype(jnp.float32)
        x0 = self._predict_x0(model_output.astype(jnp.float32), xf, sigma)
        x_next = xf + (xf - x0) / sigma * (sigma_down - sigma)
        x_next = x_next + sigma_up * self._step_noise(x, i, key, noise)
        return x_next.astype(x.dtype), state
