"""The interface every sampler implements, built so a whole sampling loop fits in one `lax.fori_loop`.

A sampler is a frozen, hashable dataclass (usable as a static argument of `jax.jit` or closed over). All
per-step constants are computed once on the host (numpy, float64) and become small float32 tables; at
step `i` (a traced int) the step gathers its constants from those tables, so there are no Python loops
over steps and no host syncs in jitted code.

    sampler = make_sampler('ddim', schedule, 50)
    x = noise * sampler.init_noise_sigma
    state = sampler.init_state(x)
    def body(i, carry):
        x, state = carry
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], ...)
        return sampler.step(state, eps, x, i, key)
    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, state))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.schedulers.noise_schedule import NoiseSchedule

SamplerState = Any  # a pytree carried between steps (for example DPM-Solver++'s previous x0 prediction)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class: one denoising step `x_{t_i} -> x_{t_{i+1}}` for i = 0 .. num_steps - 1."""

    schedule: NoiseSchedule  # noise schedule and model settings (prediction_type, spacing, ...)
    num_inference_steps: int  # requested number of denoising steps

    name: ClassVar[str] = ""  # the name make_sampler knows this sampler by
    default_spacing: ClassVar[str] = "linspace"  # diffusers' default timestep_spacing for this sampler
    stochastic: ClassVar[bool] = False  # whether step draws noise (then it needs `key` or `noise`)

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(self.schedule).__name__}")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        if steps > self.schedule.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps ({steps}) cannot exceed the schedule's num_train_timesteps "
                f"({self.schedule.num_train_timesteps})"
            )

    # ---- host-side tables (subclasses fill `_host_timesteps` and, where they need them, more) ----

    @property
    def spacing(self) -> str:
        """The timestep spacing in effect: the schedule's, or this sampler's diffusers default."""
        return self.schedule.timestep_spacing or self.default_spacing

    @functools.cached_property
    def _host_timesteps(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        """Number of steps actually taken (len(timesteps)); equals num_inference_steps for sane settings."""
        return int(len(self._host_timesteps))

    @property
    def timesteps(self) -> jax.Array:
        """Model timesteps, shape (num_steps,), float32 (integer-valued except for Euler's fractional ones)."""
        return jnp.asarray(self._host_timesteps, dtype=jnp.float32)

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial latents: x_T = noise * init_noise_sigma."""
        return 1.0

    # ---- device-side interface ----

    def init_state(self, x: jax.Array) -> SamplerState:
        """The carry for the first step (empty unless the sampler has memory)."""
        del x
        return ()

    def scale_model_input(self, x: jax.Array, i: jax.Array | int) -> jax.Array:
        """What the model is fed at step i (identity unless the sampler works in sigma space)."""
        del i
        return x

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
        """One step from x at timesteps[i] to the next noise level; returns (next x, next state).

        `model_output` is the model's prediction (per schedule.prediction_type) for `scale_model_input(x, i)`
        at `timesteps[i]`. Stochastic samplers draw their noise from `fold_in(key, i)` (the same key may be
        passed at every step), or use `noise` (shape of x) when given: a hook for tests and for methods that
        must control the noise (e.g. matching another implementation's draws).
        """
        raise NotImplementedError

    supports_partial: ClassVar[bool] = True  # whether a loop may start at a step > 0 (img2img)

    def noise_to_step(self, x0: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """The latent at step i for clean latents x0 and unit noise (img2img's start, diffusers' `add_noise` at
        timesteps[i]): sqrt(a_t) x0 + sqrt(1 - a_t) noise for the variance-preserving samplers."""
        t = int(self._host_timesteps[i])
        a = float(self.schedule.alphas_cumprod[t])
        return (np.float32(np.sqrt(a)) * x0.astype(jnp.float32)
                + np.float32(np.sqrt(1.0 - a)) * noise.astype(jnp.float32))

    # ---- helpers for subclasses ----

    def _table(self, values: np.ndarray) -> jax.Array:
        return jnp.asarray(values, dtype=jnp.float32)

    def _step_noise(self, x: jax.Array, i: jax.Array | int, key: jax.Array | None, noise: jax.Array | None):
        if noise is not None:
            if noise.shape != x.shape:
                raise ValueError(f"noise must have the shape of x {x.shape}, got {noise.shape}")
            return noise.astype(jnp.float32)
        if key is None:
            raise ValueError(f"sampler '{self.name}' is stochastic: step needs a PRNG `key` (or explicit `noise`)")
        return jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype=jnp.float32)


def x0_from_vp_output(prediction_type: str, model_output, x, sqrt_alpha, sqrt_one_minus_alpha):
    """x0 prediction from a model output on a variance-preserving latent x = a x0 + s eps."""
    if prediction_type == "epsilon":
        return (x - sqrt_one_minus_alpha * model_output) / sqrt_alpha
    if prediction_type == "v_prediction":
        return sqrt_alpha * x - sqrt_one_minus_alpha * model_output
    return model_output


@dataclasses.dataclass(frozen=True)
class SigmaTableSampler(Sampler):
    """A sampler whose steps are defined by a table of noise levels sigma (Euler family, DPM-Solver++).

    Subclasses compute `_sigmas_and_timesteps` (host, float64): sigmas of shape (num_steps + 1,), the last one
    the level after the final step, and the model timesteps of shape (num_steps,).
    """

    @functools.cached_property
    def _sigmas_and_timesteps(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @functools.cached_property
    def _host_timesteps(self) -> np.ndarray:
        return self._sigmas_and_timesteps[1]

    def noise_to_step(self, x0: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """Sigma-space latent at step i: x0 + sigma_i noise (diffusers' Euler `add_noise`)."""
        sigma = np.float32(self._sigmas_and_timesteps[0][i])
        return x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)

    @property
    def sigmas(self) -> jax.Array:
        """Noise levels sigma = sqrt((1-a)/a), shape (num_steps + 1,), float32; the last follows the final step."""
        return self._table(self._sigmas_and_timesteps[0])
