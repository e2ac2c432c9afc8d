"""`make_sampler`: build any sampler by name, with per-call overrides of the schedule's settings."""

from __future__ import annotations

import dataclasses
from typing import Any

from fusion_jax.schedulers.base import Sampler
from fusion_jax.schedulers.ddim import DDIMSampler
from fusion_jax.schedulers.dpm_solver import DPMSolverPlusPlus2MSampler
from fusion_jax.schedulers.euler import EulerAncestralSampler, EulerSampler
from fusion_jax.schedulers.noise_schedule import NoiseSchedule

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIMSampler, DPMSolverPlusPlus2MSampler, EulerSampler, EulerAncestralSampler)
}

# Schedule fields each sampler reads (diffusers' constructor arguments of the matching scheduler class);
# only these may be overridden through make_sampler's options for that sampler.
_COMMON_FIELDS = ("prediction_type", "timestep_spacing", "steps_offset")
_SCHEDULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddim": _COMMON_FIELDS + ("set_alpha_to_one", "clip_sample", "clip_sample_range"),
    "dpmpp_2m": _COMMON_FIELDS
    + ("use_karras_sigmas", "final_sigmas_type", "lower_order_final", "euler_at_final", "solver_type",
       "lambda_min_clipped"),
    "euler": _COMMON_FIELDS + ("use_karras_sigmas", "sigma_min", "sigma_max", "final_sigmas_type"),
    "euler_ancestral": _COMMON_FIELDS,
}


def make_sampler(name: str, schedule: NoiseSchedule, num_inference_steps: int, **options: Any) -> Sampler:
    """A sampler 'ddim' | 'dpmpp_2m' | 'euler' | 'euler_ancestral' over `num_inference_steps` steps.

    `options` are the sampler's own settings (DDIM: `eta`, `use_clipped_model_output`) or overrides of
    the schedule fields that sampler reads (e.g. `timestep_spacing='trailing'`, `use_karras_sigmas=True`).
    Schedule fields a sampler does not read are ignored when they come from the schedule (as diffusers'
    `from_config` ignores them) but refused when passed here, since the caller evidently expects an effect.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler name must be one of {sorted(SAMPLERS)}, got {name!r}")
    cls = SAMPLERS[name]
    sampler_fields = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(Sampler)}
    schedule_fields = set(_SCHEDULE_OPTIONS[name])
    unknown = sorted(set(options) - sampler_fields - schedule_fields)
    if unknown:
        raise ValueError(
            f"unsupported option(s) {unknown} for sampler '{name}'; "
            f"it accepts {sorted(sampler_fields | schedule_fields)}"
        )
    overrides = {key: value for key, value in options.items() if key in schedule_fields}
    own = {key: value for key, value in options.items() if key in sampler_fields}
    if overrides:
        schedule = dataclasses.replace(schedule, **overrides)
    return cls(schedule=schedule, num_inference_steps=num_inference_steps, **own)
