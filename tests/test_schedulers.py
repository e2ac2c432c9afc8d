"""Schedulers against diffusers' PyTorch schedulers (the independent reference), step by step.

Each parity case builds the diffusers scheduler with `from_config(config)` and ours with
`NoiseSchedule.from_diffusers_config(config)` from the same config dict, starts both from the same
initial noise, feeds each the same deterministic "model" (a fixed nonlinear function of its own current
input and timestep), gives stochastic steps the same noise, and compares the latents after every step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from fusion_jax import schedulers
from fusion_jax.schedulers import NoiseSchedule, make_sampler

SHAPE_NHWC = (2, 8, 8, 4)

# Stable Diffusion 1.5's scheduler_config.json (a PNDMScheduler config, as published).
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD_BASE = {k: v for k, v in SD15_CONFIG.items() if not k.startswith("_") and k != "skip_prk_steps"}

DIFFUSERS_CLASSES = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
}


def fake_model(x, t, xp):
    """A smooth stand-in for the UNet, NHWC, written once for numpy and jax.numpy (xp).

    Mostly proportional to its (variance-preserving) input, like a real eps / v model at high noise, so
    latents stay O(1) over the whole trajectory; the tanh and timestep terms make it nonlinear and t-aware.
    """
    phase = xp.arange(x.shape[-1], dtype=xp.float32) * 0.7
    return 0.85 * x + 0.1 * xp.tanh(2.0 * x) + 0.1 * xp.sin(t * 0.004 + phase)


def to_torch(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def to_nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return np.transpose(x_nchw.numpy(), (0, 2, 3, 1))


def run_diffusers(name, config, num_steps, noise, step_noises, step_kwargs, monkeypatch):
    """Diffusers' own loop (as StableDiffusionPipeline runs it); returns timesteps, init sigma, all latents."""
    scheduler = DIFFUSERS_CLASSES[name].from_config(config)
    scheduler.set_timesteps(num_steps)
    if name == "euler_ancestral":  # its step draws noise with randn_tensor: hand it our noise, in order
        queue = [to_torch(n) for n in step_noises]
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: queue.pop(0))
    x = to_torch(noise) * scheduler.init_noise_sigma
    latents = []
    for i, t in enumerate(scheduler.timesteps):
        model_in = to_nhwc(scheduler.scale_model_input(x, t))
        out = to_torch(fake_model(model_in, np.float32(t.item()), np).astype(np.float32))
        kwargs = dict(step_kwargs)
        if name == "ddim" and kwargs.get("eta", 0) > 0:
            kwargs["variance_noise"] = to_torch(step_noises[i])
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        latents.append(to_nhwc(x))
    return scheduler.timesteps.numpy(), float(scheduler.init_noise_sigma), np.stack(latents)


def run_ours(sampler, noise, step_noises=None, key=None):
    """Our loop, jitted, with the step index traced (lax.scan so every step's latents come back)."""

    @jax.jit
    def run(x_init, noises):
        x = x_init * sampler.init_noise_sigma

        def body(carry, i):
            x, state = carry
            out = fake_model(sampler.scale_model_input(x, i), sampler.timesteps[i], jnp)
            step_noise = None if noises is None else noises[i]
            x, state = sampler.step(state, out, x, i, key, noise=step_noise)
            return (x, state), x

        _, xs = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(sampler.num_steps))
        return xs

    return np.asarray(run(jnp.asarray(noise), None if step_noises is None else jnp.asarray(step_noises)))


# (sampler, config changes over SD1.5, steps, diffusers step kwargs = our options)
PARITY_CASES = {
    "ddim-leading-eps": ("ddim", {}, 10, {}),
    "ddim-trailing-v": ("ddim", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 12, {}),
    "ddim-leading-eta0.6": ("ddim", {}, 10, {"eta": 0.6}),
    "ddim-linspace-eta1-clip-v": (
        "ddim",
        {"timestep_spacing": "linspace", "clip_sample": True, "set_alpha_to_one": True,
         "prediction_type": "v_prediction", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        8,
        {"eta": 1.0, "use_clipped_model_output": True},
    ),
    "ddim-zero-snr-trailing-v": (
        "ddim",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
        {},
    ),
    "dpmpp2m-eps": ("dpmpp_2m", {}, 10, {}),
    "dpmpp2m-karras-v": ("dpmpp_2m", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 20, {}),
    "dpmpp2m-karras-eps-leading": ("dpmpp_2m", {"use_karras_sigmas": True, "timestep_spacing": "leading"}, 12, {}),
    "dpmpp2m-sigmamin-heun-final2nd": (
        "dpmpp_2m", {"final_sigmas_type": "sigma_min", "solver_type": "heun", "timestep_spacing": "trailing"}, 16, {}
    ),
    "dpmpp2m-sigmamin-lower-final": ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 10, {}),
    "dpmpp2m-cosine-sample": (
        "dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "lower_order_final": False}, 8,
        {},
    ),
    "euler-eps": ("euler", {}, 10, {}),
    "euler-leading-v-sigmamin": (
        "euler", {"timestep_spacing": "leading", "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"},
        10, {},
    ),
    "euler-karras-eps": ("euler", {"use_karras_sigmas": True}, 12, {}),
    "euler-zero-snr-trailing-v": (
        "euler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
        {},
    ),
    "euler-a-eps": ("euler_ancestral", {}, 10, {}),
    "euler-a-trailing-v": ("euler_ancestral", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 12,
                           {}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_sampler_matches_diffusers_every_step(case, monkeypatch):
    name, changes, num_steps, step_kwargs = PARITY_CASES[case]
    config = {**SD_BASE, **changes}
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
    step_noises = rng.standard_normal((num_steps + 1, *SHAPE_NHWC)).astype(np.float32)

    sampler = make_sampler(name, NoiseSchedule.from_diffusers_config(config), num_steps, **step_kwargs)
    ref_timesteps, ref_sigma, ref = run_diffusers(name, config, num_steps, noise, step_noises, step_kwargs,
                                                  monkeypatch)
    stochastic = sampler.stochastic
    ours = run_ours(sampler, noise, step_noises[: sampler.num_steps] if stochastic else None)

    # Timesteps are what the UNet sees: integer ones must be identical. Euler's fractional ones (linspace,
    # Karras) come from interpolating diffusers' float32 sigma table (relative error up to ~1.3e-5 vs our
    # float64 one), so they agree to 5e-5 relative (1e-4 absolute near 0).
    ref_timesteps = ref_timesteps.astype(np.float32)
    if np.all(ref_timesteps == np.round(ref_timesteps)) and name != "euler":
        np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref_timesteps)
    else:
        np.testing.assert_allclose(np.asarray(sampler.timesteps), ref_timesteps, rtol=5e-5, atol=1e-4)
    # init_noise_sigma: both derive it from the same sigmas; ours from float64, diffusers' from float32 tables.
    assert math.isclose(sampler.init_noise_sigma, ref_sigma, rel_tol=2e-5)
    assert ours.shape == ref.shape
    # Tolerance, per step: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|). Diffusers builds its
    # schedule in float32 (its cumprod of 1000 factors and 1 - alpha_bar near t=0 carry relative errors up
    # to ~1.3e-5 in sigma against float64), ours in float64, and each step adds float32 rounding. Measured
    # worst case over these cases: 1.4e-5 (Euler from the zero-SNR sigma of 4096), most below 3e-6. The
    # smallest real discrepancies we tried are far above: DPM-Solver++ 'heun' instead of 'midpoint' 3.3e-3,
    # DDIM steps_offset 0 instead of 1 1.3e-2.
    for step, (got, want) in enumerate(zip(ours, ref)):
        scale = max(1.0, float(np.abs(want).max()))
        error = float(np.abs(got - want).max())
        assert error <= 1e-4 * scale, f"{case}: step {step}: max abs error {error:.3g} at latent scale {scale:.3g}"


def test_fori_loop_under_jit_equals_python_loop():
    """The whole loop jitted with lax.fori_loop (traced step index) equals an un-jitted Python loop."""
    noise = np.random.default_rng(1).standard_normal(SHAPE_NHWC).astype(np.float32)
    key = jax.random.key(7)
    for name, options in (("dpmpp_2m", {"use_karras_sigmas": True}), ("euler_ancestral", {}), ("ddim", {"eta": 0.3})):
        sampler = make_sampler(name, NoiseSchedule(), 6, **options)

        def body(i, carry, sampler=sampler):
            x, state = carry
            out = fake_model(sampler.scale_model_input(x, i), sampler.timesteps[i], jnp)
            return sampler.step(state, out, x, i, key)

        @jax.jit
        def jitted(x, sampler=sampler, body=body):
            x = x * sampler.init_noise_sigma
            return jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))[0]

        x = jnp.asarray(noise) * sampler.init_noise_sigma
        carry = (x, sampler.init_state(x))
        with jax.disable_jit():
            for i in range(sampler.num_steps):
                carry = body(i, carry)
        # Same operations in the same order; XLA may fuse and reorder float32 arithmetic, hence 1e-5.
        np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(noise))), np.asarray(carry[0]), rtol=1e-5,
                                   atol=1e-5, err_msg=name)


def test_sampler_is_a_static_jit_argument():
    sampler = make_sampler("euler", NoiseSchedule(), 5)
    same = make_sampler("euler", NoiseSchedule(), 5)
    assert sampler == same and hash(sampler) == hash(same)
    scale = jax.jit(lambda s, x: s.scale_model_input(x, 2), static_argnums=0)
    x = jnp.ones(SHAPE_NHWC)
    sigma = float(sampler.sigmas[2])
    np.testing.assert_allclose(np.asarray(scale(sampler, x)), 1.0 / math.sqrt(sigma**2 + 1.0), rtol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "rescale_betas_zero_snr": True,
         "prediction_type": "v_prediction"},
    ],
)
def test_training_noise_matches_diffusers(changes):
    config = {**SD_BASE, **changes}
    reference = DDIMScheduler.from_config(config)
    schedule = NoiseSchedule.from_diffusers_config(config)
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    noise = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    t = np.array([0, 1, 500, 999])

    # Our float64 schedule vs diffusers' float32 one: measured relative gap <= 1.3e-6 (float32 cumprod).
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double().numpy(), rtol=5e-6,
                               atol=1e-9)
    want_noisy = to_nhwc(reference.add_noise(to_torch(x0), to_torch(noise), torch.from_numpy(t)))
    want_velocity = to_nhwc(reference.get_velocity(to_torch(x0), to_torch(noise), torch.from_numpy(t)))
    got_noisy = schedulers.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    got_velocity = schedulers.velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    # One multiply-add of O(1) values with coefficients that agree to ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(got_noisy), want_noisy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_velocity), want_velocity, rtol=1e-5, atol=1e-5)

    target = np.asarray(schedulers.training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    want_target = {"epsilon": noise, "v_prediction": want_velocity, "sample": x0}[schedule.prediction_type]
    np.testing.assert_allclose(target, want_target, rtol=1e-5, atol=1e-5)

    alphas = reference.alphas_cumprod.double().numpy()[t]
    got_snr = np.asarray(schedulers.snr(schedule, jnp.asarray(t)))
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(got_snr, alphas / (1 - alphas), rtol=2e-5, atol=1e-6)

    # The noisy sample is the x_t our samplers denoise: reading it back with the training target recovers x0.
    if schedule.prediction_type == "v_prediction":
        a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        recovered = np.sqrt(a) * np.asarray(got_noisy) - np.sqrt(1 - a) * target
        np.testing.assert_allclose(recovered, x0, atol=1e-5)


def test_guidance_rescale_matches_diffusers():
    rng = np.random.default_rng(3)
    cfg = (rng.standard_normal(SHAPE_NHWC) * 3).astype(np.float32)
    text = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
    for phi in (0.0, 0.7):
        want = to_nhwc(rescale_noise_cfg(to_torch(cfg), to_torch(text), guidance_rescale=phi))
        got = schedulers.guidance_rescale(jnp.asarray(cfg), jnp.asarray(text), phi)
        # std over the same H, W, C elements (order-independent); float32 reductions of 256 values.
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sd15_config_reads_as_the_default_schedule():
    assert NoiseSchedule.from_diffusers_config(SD15_CONFIG) == NoiseSchedule()


def test_config_round_trip_through_diffusers():
    schedule = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", use_karras_sigmas=True,
                             rescale_betas_zero_snr=True, final_sigmas_type="sigma_min")
    config = schedule.to_diffusers_config()
    assert NoiseSchedule.from_diffusers_config(config) == schedule
    for name, cls in DIFFUSERS_CLASSES.items():  # diffusers reads the same settings from it
        reference = cls.from_config(config)
        for key in ("prediction_type", "timestep_spacing", "rescale_betas_zero_snr", "steps_offset"):
            assert reference.config[key] == config[key], (name, key)
        np.testing.assert_allclose(reference.alphas_cumprod.double().numpy(), schedule.sigma_alphas_cumprod
                                   if name != "ddim" else schedule.alphas_cumprod, rtol=5e-6, atol=1e-9)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"beta_schedule": "cubic"}, "beta_schedule"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"thresholding": True}, "thresholding"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"shift_terminal": 0.5}, "shift_terminal"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ],
)
def test_unsupported_config_values_are_refused_by_name(bad, field):
    with pytest.raises(ValueError, match=field):
        NoiseSchedule.from_diffusers_config({**SD15_CONFIG, **bad})


def test_bad_sampler_arguments_are_refused_by_name():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="sampler name"):
        make_sampler("plms", schedule, 10)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("euler", schedule, 10, eta=0.5)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_sampler("euler_ancestral", schedule, 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("ddim", schedule, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("ddim", schedule, 1001)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("ddim", schedule, 10, eta=-1.0)
    sampler = make_sampler("euler_ancestral", schedule, 4)
    x = jnp.zeros(SHAPE_NHWC)
    with pytest.raises(ValueError, match="key"):
        sampler.step((), x, x, 0)
    with pytest.raises(TypeError, match="integer"):
        schedulers.add_noise(schedule, x, x, jnp.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        schedulers.add_noise(schedule, x, x, jnp.array([1, 2, 3]))


@pytest.mark.parametrize("name", list(DIFFUSERS_CLASSES))
def test_timesteps_and_sigmas_match_diffusers_for_many_step_counts(name):
    """Host-side tables only (cheap): every spacing, odd step counts, Karras where the sampler has it."""
    variants = [{"timestep_spacing": s} for s in ("leading", "trailing", "linspace")]
    if name in ("euler", "dpmpp_2m"):
        variants += [{"use_karras_sigmas": True, "timestep_spacing": s} for s in ("leading", "linspace")]
    for changes in variants:
        config = {**SD_BASE, **changes}
        for num_steps in (1, 3, 7, 30, 333):
            reference = DIFFUSERS_CLASSES[name].from_config(config)
            reference.set_timesteps(num_steps)
            sampler = make_sampler(name, NoiseSchedule.from_diffusers_config(config), num_steps)
            label = f"{name} {changes} {num_steps} steps"
            want = reference.timesteps.numpy().astype(np.float32)
            assert sampler.num_steps == len(want), label
            # Same rule as in the trajectory test: integers exact, Euler's fractional ones to 5e-5 relative.
            np.testing.assert_allclose(np.asarray(sampler.timesteps), want, rtol=0 if name != "euler" else 5e-5,
                                       atol=0 if name != "euler" else 1e-4, err_msg=label)
            if name != "ddim":  # float32 tables from float32 (diffusers) vs float64 (ours) alphas_cumprod
                np.testing.assert_allclose(np.asarray(sampler.sigmas), reference.sigmas.numpy(), rtol=2e-5,
                                           err_msg=label)
