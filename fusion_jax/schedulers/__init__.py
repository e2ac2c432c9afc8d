"""Noise schedules, training targets and samplers (DDIM, DPM-Solver++ 2M, Euler, Euler-ancestral).

Pure, jittable functions matching diffusers' PyTorch schedulers step for step; see `base.py` for the
sampler interface used inside `jax.lax.fori_loop`.
"""

from fusion_jax.schedulers.base import Sampler, SamplerState
from fusion_jax.schedulers.ddim import DDIMSampler
from fusion_jax.schedulers.dpm_solver import DPMSolverPlusPlus2MSampler
from fusion_jax.schedulers.euler import EulerAncestralSampler, EulerSampler
from fusion_jax.schedulers.factory import SAMPLERS, make_sampler
from fusion_jax.schedulers.guidance import guidance_rescale
from fusion_jax.schedulers.noise_schedule import NoiseSchedule
from fusion_jax.schedulers.training import add_noise, snr, training_target, velocity

__all__ = [
    "DDIMSampler",
    "DPMSolverPlusPlus2MSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "NoiseSchedule",
    "SAMPLERS",
    "Sampler",
    "SamplerState",
    "add_noise",
    "guidance_rescale",
    "make_sampler",
    "snr",
    "training_target",
    "velocity",
]
