"""DDIM (Song et al. 2020), as diffusers' DDIMScheduler: deterministic for eta=0, DDPM-like for eta=1."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.schedulers.base import Sampler, SamplerState, x0_from_vp_output
from fusion_jax.schedulers.spacing import spaced_timesteps


@dataclasses.dataclass(frozen=True)
class DDIMSampler(Sampler):
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std * z, std = eta * sqrt(posterior var)."""

    eta: float = 0.0  # weight of the fresh noise: 0 deterministic DDIM, 1 the DDPM posterior variance
    use_clipped_model_output: bool = False  # recompute eps from the clipped x0 (only matters with clip_sample)

    name: ClassVar[str] = "ddim"
    default_spacing: ClassVar[str] = "leading"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    @functools.cached_property
    def _host_timesteps(self) -> np.ndarray:
        s = self.schedule
        timesteps = spaced_timesteps(self.spacing, s.num_train_timesteps, self.num_inference_steps, s.steps_offset)
        timesteps = np.round(timesteps)  # DDIM's timesteps are integers ('linspace' is rounded)
        if timesteps.max() > s.num_train_timesteps - 1:
            raise ValueError(
                f"steps_offset={s.steps_offset} with {self.num_inference_steps} 'leading' steps gives timestep "
                f"{int(timesteps.max())}, beyond the last training timestep {s.num_train_timesteps - 1}"
            )
        return timesteps

    @functools.cached_property
    def _coefficients(self) -> dict[str, np.ndarray]:
        """Per-step sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev-std^2) and std (float64)."""
        s = self.schedule
        alphas_cumprod = s.alphas_cumprod
        final_alpha = 1.0 if s.set_alpha_to_one else alphas_cumprod[0]
        t = self._host_timesteps.astype(np.int64)
        # diffusers steps back by T // n whatever the spacing (for 'trailing' this is the previous timestep).
        prev_t = t - s.num_train_timesteps // self.num_inference_steps
        alpha = alphas_cumprod[t]
        alpha_prev = np.where(prev_t >= 0, alphas_cumprod[np.maximum(prev_t, 0)], final_alpha)
        variance = (1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev)
        std = self.eta * np.sqrt(variance)
        return {
            "sqrt_alpha": np.sqrt(alpha),
            "sqrt_one_minus_alpha": np.sqrt(1.0 - alpha),
            "sqrt_alpha_prev": np.sqrt(alpha_prev),
            "direction": np.sqrt(np.maximum(1.0 - alpha_prev - std**2, 0.0)),
            "std": std,
        }

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
        c = {name: self._table(values)[i] for name, values in self._coefficients.items()}
        s = self.schedule
        xf, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
        x0 = x0_from_vp_output(s.prediction_type, out, xf, c["sqrt_alpha"], c["sqrt_one_minus_alpha"])
        if s.prediction_type == "epsilon":
            eps = out
        elif s.prediction_type == "v_prediction":
            eps = c["sqrt_alpha"] * out + c["sqrt_one_minus_alpha"] * xf
        else:
            eps = (xf - c["sqrt_alpha"] * x0) / c["sqrt_one_minus_alpha"]
        if s.clip_sample:
            x0 = jnp.clip(x0, -s.clip_sample_range, s.clip_sample_range)
            if self.use_clipped_model_output:
                eps = (xf - c["sqrt_alpha"] * x0) / c["sqrt_one_minus_alpha"]
        x_prev = c["sqrt_alpha_prev"] * x0 + c["direction"] * eps
        if self.eta > 0:
            x_prev = x_prev + c["std"] * self._step_noise(x, i, key, noise)
        return x_prev.astype(x.dtype), state
