"""DPM-Solver++ 2M (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
algorithm_type='dpmsolver++', solver_order=2.

Written as x_next = A_i x + B_i D0 + C_i (D0 - D_prev), where D0 / D_prev are the current / previous x0
predictions. A, B, C are per-step constants computed on the host; C_i = 0 on first-order steps (the first
one, and the last one when diffusers lowers the order there), which also keeps the infinite log-SNR of a
zero final sigma out of the device arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.schedulers.base import SigmaTableSampler, SamplerState, x0_from_vp_output
from fusion_jax.schedulers.spacing import dpm_solver_timesteps, interpolate_sigmas, karras_sigmas, sigma_to_timestep

_LOWER_ORDER_FINAL_MAX_STEPS = 15  # diffusers lowers the final order only below this many steps


@dataclasses.dataclass(frozen=True)
class DPMSolverPlusPlus2MSampler(SigmaTableSampler):
    """Second-order multistep DPM-Solver++ on the data (x0) prediction; state = the previous x0 prediction."""

    name: ClassVar[str] = "dpmpp_2m"
    default_spacing: ClassVar[str] = "linspace"

    @functools.cached_property
    def _sigmas_and_timesteps(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.schedule
        train_sigmas = s.train_sigmas
        log_snr_half = -np.log(train_sigmas)  # lambda_t = log(alpha_t / sigma_t)
        clipped = int(np.searchsorted(log_snr_half[::-1], s.lambda_min_clipped))
        last_timestep = s.num_train_timesteps - clipped
        timesteps = dpm_solver_timesteps(
            self.spacing, s.num_train_timesteps, last_timestep, self.num_inference_steps, s.steps_offset
        )
        if s.use_karras_sigmas:
            sigmas = karras_sigmas(train_sigmas[0], train_sigmas[-1], self.num_inference_steps)
            timesteps = sigma_to_timestep(sigmas, train_sigmas)
            if s.beta_schedule != "squaredcos_cap_v2":
                timesteps = np.round(timesteps)
        else:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        # diffusers truncates model timesteps to integers (after rounding where it rounds).
        timesteps = np.trunc(timesteps)
        final_sigma = train_sigmas[0] if s.final_sigmas_type == "sigma_min" else 0.0
        return np.concatenate([sigmas, [final_sigma]]), timesteps

    @functools.cached_property
    def _coefficients(self) -> dict[str, np.ndarray]:
        s = self.schedule
        sigmas = self._sigmas_and_timesteps[0]
        n = len(sigmas) - 1
        alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)  # VP signal scale at each sigma
        sigma_vp = sigmas * alpha  # VP noise scale
        with np.errstate(divide="ignore"):
            lam = -np.log(sigmas)  # log(alpha / sigma_vp); +inf at a zero final sigma
        a_next, s_cur, s_next = alpha[1:], sigma_vp[:-1], sigma_vp[1:]
        h = lam[1:] - lam[:-1]
        exp_neg_h = np.exp(-h)  # 0 when the next sigma is 0
        first_order_x = s_next / s_cur
        first_order_d0 = -a_next * (exp_neg_h - 1.0)
        # Second-order correction D1 = (D0 - D_prev) / r0 with r0 = h_prev / h.
        h_prev = np.concatenate([[np.nan], lam[1:-1] - lam[:-2]])
        if s.solver_type == "midpoint":
            d1_coef = -0.5 * a_next * (exp_neg_h - 1.0)
        else:  # heun
            with np.errstate(divide="ignore", invalid="ignore"):
                d1_coef = a_next * ((exp_neg_h - 1.0) / h + 1.0)
        steps = np.arange(n)
        lower_final = s.euler_at_final or s.final_sigmas_type == "zero"
        lower_final = lower_final or (s.lower_order_final and n < _LOWER_ORDER_FINAL_MAX_STEPS)
        second_order = (steps >= 1) & ~((steps == n - 1) & lower_final)
        with np.errstate(divide="ignore", invalid="ignore"):
            correction = np.where(second_order, d1_coef * h / h_prev, 0.0)
        return {
            "alpha": alpha[:-1],
            "sigma": s_cur,
            "x_coef": first_order_x,
            "d0_coef": first_order_d0,
            "diff_coef": correction,
        }

    # its first/second-order choice is a per-step table built for a loop that starts at step 0
    supports_partial: ClassVar[bool] = False

    def noise_to_step(self, x0, noise, i):
        raise ValueError("dpmpp_2m cannot start part-way (img2img): use ddim, euler or euler_ancestral")

    def init_state(self, x: jax.Array) -> SamplerState:
        """The previous x0 prediction (unused on the first step, which is first order)."""
        return jnp.zeros(x.shape, jnp.float32)

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
        del key, noise  # deterministic
        c = {name: self._table(values)[i] for name, values in self._coefficients.items()}
        xf = x.astype(jnp.float32)
        x0 = x0_from_vp_output(
            self.schedule.prediction_type, model_output.astype(jnp.float32), xf, c["alpha"], c["sigma"]
        )
        x_next = c["x_coef"] * xf + c["d0_coef"] * x0 + c["diff_coef"] * (x0 - state)
        return x_next.astype(x.dtype), x0
