"""Host-side choice of inference timesteps and sigmas (numpy, float64), shared by the samplers.

These follow diffusers' `set_timesteps` of each scheduler exactly (including its rounding), because the
model timesteps are part of the result: the UNet sees them.
"""

from __future__ import annotations

import numpy as np


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """Descending inference timesteps as DDIM / Euler space them; 'linspace' values are not rounded.

    'leading': multiples of T // n (plus steps_offset); 'trailing': rounded multiples of T / n ending at
    T - 1; 'linspace': n evenly spaced values from T - 1 down to 0.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return (np.arange(num_steps) * ratio)[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        return np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1.0
    raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")


def dpm_solver_timesteps(
    spacing: str, num_train_timesteps: int, last_timestep: int, num_steps: int, steps_offset: int
) -> np.ndarray:
    """Descending integer-valued inference timesteps as diffusers' DPMSolverMultistepScheduler spaces them.

    It spaces n + 1 points and drops the last (so 0 is never a model timestep), over [0, last_timestep).
    """
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        ratio = last_timestep // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio)[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        return np.round(np.arange(last_timestep, 0, -ratio)) - 1.0
    raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log(sigma) (train_sigmas ascending)."""
    log_train = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # Last training step whose log-sigma is <= log_sigma, kept inside [0, T-2] so a right neighbour exists.
    low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(log_train) - 2)
    high = low + 1
    weight = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[high]), 0.0, 1.0)
    return (1.0 - weight) * low + weight * high


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linearly interpolated in t over the training sigmas."""
    return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
