"""The unCLIP (Karlo) prior's sampler, as diffusers' `UnCLIPScheduler` steps it in the UnCLIP / Kandinsky prior loop.

A DDPM posterior step between the sampler's own timesteps: with a_t the cumulative alpha at t and a_p at the next
(smaller) timestep p (a_p = 1 past the end), beta = 1 - a_t / a_p (the training beta_t when p = t - 1),

    x0   = model output ('sample') or (x - sqrt(1 - a_t) eps) / sqrt(a_t) ('epsilon'), clipped to +-clip_sample_range
    x_p  = sqrt(a_p) beta / (1 - a_t) * x0 + sqrt(1 - beta) (1 - a_p) / (1 - a_t) * x + std * z,
    std  = sqrt(max((1 - a_p) / (1 - a_t) * beta, 1e-20))   ('fixed_small_log'; no noise at t = 0).

Timesteps are UnCLIPScheduler's: round(i * (T - 1) / (n - 1)) for i = n - 1 .. 0, so the last step is t = 0 and
sampling needs n >= 2. Only `variance_type='fixed_small_log'` is implemented (the prior's; 'learned_range' is the
Karlo decoder's and needs a model that also predicts its variance).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.schedulers.base import Sampler, SamplerState
from fusion_jax.schedulers.noise_schedule import NoiseSchedule

_UNCLIP_CONFIG_KEYS = {"num_train_timesteps", "variance_type", "clip_sample", "clip_sample_range", "prediction_type",
                       "beta_schedule", "_class_name", "_diffusers_version", "_use_default_values"}


@dataclasses.dataclass(frozen=True)
class UnCLIPSampler(Sampler):
    """DDPM steps over the unCLIP timestep grid with fixed_small_log variance (see the module docstring)."""

    variance_type: str = "fixed_small_log"

    name: ClassVar[str] = "unclip"
    stochastic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance_type != "fixed_small_log":
            raise ValueError(f"UnCLIPSampler: variance_type {self.variance_type!r} is not supported; only "
                             "'fixed_small_log' (the prior's) is implemented")
        if self.schedule.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"UnCLIPSampler: prediction_type must be 'epsilon' or 'sample', got "
                             f"{self.schedule.prediction_type!r}")
        if self.num_inference_steps < 2:
            raise ValueError(f"UnCLIPSampler needs num_inference_steps >= 2 (its grid ends at t=0), "
                             f"got {self.num_inference_steps}")

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], num_inference_steps: int) -> "UnCLIPSampler":
        """From an `UnCLIPScheduler` scheduler_config.json dict (Karlo: prediction 'sample', clip range 5).

        Missing keys take UnCLIPScheduler's defaults; unknown keys are refused (they may change results)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict read from scheduler_config.json, got {type(config).__name__}")
        unknown = sorted(set(config) - _UNCLIP_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"UnCLIPScheduler config has keys fusion_jax does not know how to apply: {unknown}")
        class_name = config.get("_class_name", "UnCLIPScheduler")
        if class_name not in ("UnCLIPScheduler", "DDPMScheduler"):
            raise ValueError(f"scheduler config _class_name is {class_name!r}; expected 'UnCLIPScheduler'")
        if config.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
            raise ValueError(f"UnCLIPScheduler supports only beta_schedule 'squaredcos_cap_v2', got "
                             f"{config['beta_schedule']!r}")
        schedule = NoiseSchedule(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule="squaredcos_cap_v2",
            prediction_type=config.get("prediction_type", "epsilon"),
            clip_sample=bool(config.get("clip_sample", True)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
        )
        return cls(schedule, num_inference_steps, variance_type=config.get("variance_type", "fixed_small_log"))

    @functools.cached_property
    def _host_timesteps(self) -> np.ndarray:
        n = self.num_inference_steps
        ratio = (self.schedule.num_train_timesteps - 1) / (n - 1)
        return np.round(np.arange(n) * ratio)[::-1].astype(np.int64)

    @functools.cached_property
    def _coefficients(self) -> dict[str, np.ndarray]:
        """Per-step x0 coefficient, x coefficient, noise std, and the epsilon -> x0 constants (float64)."""
        s = self.schedule
        t = self._host_timesteps
        prev = np.append(t[1:], t[-1] - 1)
        a_t = s.alphas_cumprod[t]
        a_p = np.where(prev >= 0, s.alphas_cumprod[np.maximum(prev, 0)], 1.0)
        beta = np.where(prev == t - 1, s.betas[t], 1.0 - a_t / a_p)
        std = np.sqrt(np.maximum((1.0 - a_p) / (1.0 - a_t) * beta, 1e-20))
        return {
            "x0_coeff": np.sqrt(a_p) * beta / (1.0 - a_t),
            "x_coeff": np.sqrt(1.0 - beta) * (1.0 - a_p) / (1.0 - a_t),
            "std": np.where(t > 0, std, 0.0),
            "sqrt_alpha": np.sqrt(a_t),
            "sqrt_one_minus_alpha": np.sqrt(1.0 - a_t),
        }

    def predict_x0(self, model_output: jax.Array, x: jax.Array, i: jax.Array | int) -> jax.Array:
        """The (clipped) clean-sample prediction at step i."""
        s = self.schedule
        if s.prediction_type == "sample":
            x0 = model_output.astype(jnp.float32)
        else:
            c = self._coefficients
            x0 = (x.astype(jnp.float32) - self._table(c["sqrt_one_minus_alpha"])[i] * model_output) \
                / self._table(c["sqrt_alpha"])[i]
        if s.clip_sample:
            x0 = jnp.clip(x0, -s.clip_sample_range, s.clip_sample_range)
        return x0

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
        x0 = self.predict_x0(model_output, x, i)
        mean = c["x0_coeff"] * x0 + c["x_coeff"] * x.astype(jnp.float32)
        z = self._step_noise(x, i, key, noise)
        return (mean + c["std"] * z).astype(x.dtype), state
