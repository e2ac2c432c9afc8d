"""The diffusion noise schedule (betas, cumulative alphas) and its reading from diffusers configs.

Everything here is host-side numpy in float64: the schedule is a handful of constants that samplers and
training functions turn into small device tables, so computing them once in double precision costs
nothing and keeps our tables at least as accurate as diffusers' float32 ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_TYPES = ("midpoint", "heun")

# diffusers clamps the last cumulative alpha to this value in sigma-based schedulers (Euler, DPM-Solver)
# when the schedule is rescaled to zero terminal SNR, so that the largest sigma stays finite.
ZERO_SNR_ALPHA_CUMPROD_FLOOR = 2.0**-24


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A diffusion noise schedule plus the scheduler settings of a model that change sampling results.

    Defaults are Stable Diffusion 1.5's (`scaled_linear` 0.00085..0.012, 1000 steps, epsilon, steps_offset 1,
    no clipping, set_alpha_to_one False). Sampler-specific fields are used only by the samplers that have
    them in diffusers and ignored by the others, as diffusers' `from_config` does.
    """

    num_train_timesteps: int = 1000  # length of the training diffusion chain T
    beta_start: float = 0.00085  # beta at t=0 (for linear / scaled_linear)
    beta_end: float = 0.012  # beta at t=T-1 (for linear / scaled_linear)
    beta_schedule: str = "scaled_linear"  # 'linear' | 'scaled_linear' (linear in sqrt(beta)) | 'squaredcos_cap_v2'
    prediction_type: str = "epsilon"  # what the model predicts: 'epsilon' | 'v_prediction' | 'sample' (x0)
    rescale_betas_zero_snr: bool = False  # rescale betas so the last step has zero SNR (arXiv 2305.08891)
    timestep_spacing: str | None = None  # 'leading' | 'trailing' | 'linspace'; None: each sampler's diffusers default
    steps_offset: int = 1  # added to 'leading' inference timesteps (SD 1.x uses 1)
    set_alpha_to_one: bool = False  # DDIM: alpha_cumprod before t=0 is 1 (True) or alpha_cumprod[0] (False)
    clip_sample: bool = False  # DDIM: clip the predicted x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0  # DDIM: clipping bound used when clip_sample is True
    use_karras_sigmas: bool = False  # Euler, DPM-Solver++: Karras et al. (2022) rho=7 sigma spacing
    sigma_min: float | None = None  # Euler with Karras sigmas: lower sigma bound (None: from the schedule)
    sigma_max: float | None = None  # Euler with Karras sigmas: upper sigma bound (None: from the schedule)
    final_sigmas_type: str = "zero"  # Euler, DPM-Solver++: last sigma 0 ('zero') or sigma at t=0 ('sigma_min')
    lower_order_final: bool = True  # DPM-Solver++: first-order final step when fewer than 15 steps
    euler_at_final: bool = False  # DPM-Solver++: always take the final step with first order
    solver_type: str = "midpoint"  # DPM-Solver++: second-order correction 'midpoint' | 'heun'
    lambda_min_clipped: float = -math.inf  # DPM-Solver++: drop timesteps whose log-SNR/2 is below this

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
        if self.beta_schedule != "squaredcos_cap_v2" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
            )
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range!r}")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value!r}")

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """Per-step noise variances beta_t, shape (T,), float64."""
        betas = _base_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)
        if self.rescale_betas_zero_snr:
            betas = _rescale_to_zero_terminal_snr(betas)
        return betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s), shape (T,), float64: x_t = sqrt(a) x0 + sqrt(1-a) eps."""
        return np.cumprod(1.0 - self.betas)

    @functools.cached_property
    def sigma_alphas_cumprod(self) -> np.ndarray:
        """alphas_cumprod as sigma-based samplers (Euler, DPM-Solver) see it: zero terminal SNR floored."""
        alphas_cumprod = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD_FLOOR
        return alphas_cumprod

    @functools.cached_property
    def train_sigmas(self) -> np.ndarray:
        """Karras-style noise levels sigma_t = sqrt((1 - a) / a) for every training step, shape (T,), float64."""
        alphas_cumprod = self.sigma_alphas_cumprod
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers `scheduler_config.json` dict (any of the usual scheduler classes).

        Missing keys take diffusers' constructor defaults (as `from_config` would), not SD1.5's. Keys that
        cannot change results are ignored; settings we do not implement raise a ValueError naming the key.
        """
        return _from_diffusers_config(cls, config)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A diffusers scheduler config dict that `from_config` of DDIM / DPM-Solver / Euler schedulers reads
        back to this schedule (each class ignores the keys it does not have, as we do)."""
        config = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if config["timestep_spacing"] is None:
            del config["timestep_spacing"]  # let each class use its own default, as this schedule does
        config.update(trained_betas=None, thresholding=False, solver_order=2, algorithm_type="dpmsolver++")
        return config


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {choices}, got {value!r}")


def _base_betas(schedule: str, beta_start: float, beta_end: float, num_steps: int) -> np.ndarray:
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    # squaredcos_cap_v2: Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999.
    def alpha_bar(t: np.ndarray) -> np.ndarray:
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_steps, dtype=np.float64)
    ratio = alpha_bar((steps + 1) / num_steps) / alpha_bar(steps / num_steps)
    return np.minimum(1.0 - ratio, 0.999)


def _rescale_to_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so its last value is 0 and its first unchanged (2305.08891, Alg. 1)."""
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


# Keys of diffusers scheduler configs mapped one-to-one onto NoiseSchedule fields, with the value diffusers'
# constructors use when the key is missing. set_alpha_to_one and clip_sample default to DDIM's values.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "timestep_spacing": None,
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "use_karras_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "euler_at_final": False,
    "solver_type": "midpoint",
    "lambda_min_clipped": -math.inf,
}

# Keys accepted only with these values (anything else changes results in a way we do not implement).
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "solver_order": (2,),  # we implement DPM-Solver++ 2M
    "algorithm_type": ("dpmsolver++",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    # DDPM's own variance choices do not reach DDIM/DPM/Euler; only the learned ones would.
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
}

# Keys that cannot change the results of what we implement (metadata, or inert given the checks above).
_IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_use_default_values",
        "skip_prk_steps",  # PNDM only
        "dynamic_thresholding_ratio",  # only with thresholding=True
        "sample_max_value",  # only with thresholding=True
        "flow_shift",  # only with use_flow_sigmas=True
        "time_shift_type",  # only with use_dynamic_shifting=True
    }
)


def _from_diffusers_config(cls: type[NoiseSchedule], config: Mapping[str, Any]) -> NoiseSchedule:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict read from scheduler_config.json, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_DIFFUSERS_DEFAULTS) - set(_REQUIRED_VALUES) - _IGNORED_KEYS)
    if unknown:
        raise ValueError(
            f"scheduler config has keys fusion_jax does not know how to apply: {unknown}; "
            "they may change sampling results, so they are refused rather than ignored"
        )
    for key, allowed in _REQUIRED_VALUES.items():
        if key in config and config[key] not in allowed:
            raise ValueError(f"scheduler config {key}={config[key]!r} is not supported (supported: {allowed})")
    values = {key: config.get(key, default) for key, default in _DIFFUSERS_DEFAULTS.items()}
    if values["lambda_min_clipped"] is None:
        values["lambda_min_clipped"] = -math.inf
    if values["use_karras_sigmas"] is None:  # Euler's signature allows None, meaning False
        values["use_karras_sigmas"] = False
    return cls(**values)
