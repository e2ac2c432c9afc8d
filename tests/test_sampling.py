"""The jitted text-to-image sampler (fusion_jax.sampling) and the generate CLI.

References: diffusers' PyTorch StableDiffusionPipeline loading the very same tiny pipeline folder (independent
implementation of the whole text-encode / guidance / DDIM / decode path), an unjitted Python loop over steps,
and a single-device run for the sharded one.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType

from fusion_jax import sampling, weights
from fusion_jax.tiny import write_tiny_pipeline

PROMPTS = ["a photo of a smiling person", "a red face on a blue background"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_pipeline")
    write_tiny_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_dir):
    return weights.load_pipeline(tiny_dir)


def _cfg(pipeline, **kw):
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return sampling.SamplingConfig(**{"height": size, "width": size, "output": "float", **kw})


def _noise(pipeline, cfg, batch, seed=0):
    shape = sampling.latent_shape(pipeline, cfg, batch)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_matches_diffusers_stable_diffusion_pipeline(tiny_dir, pipeline):
    from diffusers import StableDiffusionPipeline

    cfg = _cfg(pipeline, num_steps=3, guidance_scale=5.0, scheduler="ddim")
    noise = _noise(pipeline, cfg, len(PROMPTS))
    ours = sampling.generate(pipeline, sampling.tokenize(pipeline, PROMPTS), key=jax.random.key(0), cfg=cfg,
                             noise=noise)
    reference = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    theirs = reference(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=cfg.height, width=cfg.width,
                       latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), output_type="np").images
    # diffusers returns images in [0, 1]; ours in [-1, 1]. Float32 through text encoder, 3 guided UNet steps and
    # the decoder: summation-order differences stay around 1e-6 relative; 1e-4 leaves margin, while any real
    # difference (a wrong timestep, guidance term or scaling) changes the images by > 1e-2.
    assert _rel_l2((np.asarray(ours) + 1) / 2, theirs) < 1e-4


def test_jitted_sampler_equals_python_loop(pipeline):
    cfg = _cfg(pipeline, num_steps=2, guidance_scale=4.0, scheduler="euler_ancestral", guidance_rescale=0.5)
    ids = sampling.tokenize(pipeline, PROMPTS)
    uncond = sampling.tokenize(pipeline, [""] * len(PROMPTS))
    noise = _noise(pipeline, cfg, len(PROMPTS), seed=1)
    key = jax.random.key(3)
    jitted = sampling.generate(pipeline, ids, key=key, cfg=cfg, noise=noise)

    # The same computation written as a plain Python loop of separate (unjitted) calls.
    sampler = sampling._make_sampler(cfg, pipeline.schedule)
    text_cond = pipeline.text_encoder(jnp.asarray(ids)).last_hidden_state
    text_uncond = pipeline.text_encoder(jnp.asarray(uncond)).last_hidden_state
    _, step_key = jax.random.split(key)
    x = jnp.asarray(noise) * sampler.init_noise_sigma
    state = sampler.init_state(x)
    for i in range(cfg.num_steps):
        x_in = sampler.scale_model_input(x, i)
        eps_u = pipeline.unet(x_in, sampler.timesteps[i], text_uncond)
        eps_t = pipeline.unet(x_in, sampler.timesteps[i], text_cond)
        eps = sampling.guided_prediction(eps_u, eps_t, cfg.guidance_scale, cfg.guidance_rescale)
        x, state = sampler.step(state, eps, x, i, step_key)
    looped = sampling.decode_latents(pipeline.vae, x, "float")
    # Same float32 math; jit may fuse and reorder reductions (and the loop runs uncond/text as separate calls).
    assert _rel_l2(jitted, looped) < 1e-5


def test_sharded_batch_equals_single_device(pipeline):
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    cfg = _cfg(pipeline, num_steps=2, guidance_scale=3.0, scheduler="dpmpp_2m", output="uint8")
    prompts = [f"a person number {i}" for i in range(8)]
    ids = sampling.tokenize(pipeline, prompts)
    single = sampling.generate(pipeline, ids, key=jax.random.key(7), cfg=cfg)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = sampling.generate(pipeline, ids, key=jax.random.key(7), cfg=cfg, mesh=mesh)
    assert len(sharded.sharding.device_set) == 8
    # Each device runs the same per-example computation; allow one uint8 level for rounding at a boundary.
    assert np.abs(np.asarray(sharded, np.int16) - np.asarray(single, np.int16)).max() <= 1


def test_bad_inputs_are_clear_errors(pipeline):
    cfg = _cfg(pipeline, num_steps=1)
    ids = sampling.tokenize(pipeline, PROMPTS)
    with pytest.raises(ValueError, match="noise must have shape"):
        sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=cfg, noise=np.zeros((1, 2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="multiples of"):
        sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=sampling.SamplingConfig(height=30, width=32))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match="not divisible"):
        sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=cfg, mesh=mesh)


def test_generate_cli_writes_pngs_with_settings_and_grid(tiny_dir, tmp_path):
    import importlib.util
    from pathlib import Path

    from fusion_jax import cli_utils

    script = Path(__file__).resolve().parents[1] / "infer" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "a blue face", "negative_prompt": "blurry"}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["--model", str(tiny_dir), "--prompt", "a smiling person", "--prompts", str(prompts_file),
                     "--steps", "1", "--batch-size", "2", "--num-images", "2", "--out", str(out)]) == 0
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4 and (out / "grid.png").is_file()
    settings = cli_utils.read_png_settings(pngs[2])
    assert settings["prompt"] == "a blue face" and settings["negative_prompt"] == "blurry"
    assert settings["sampling"]["num_steps"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        cli.main(["--model", str(tiny_dir), "--prompts", str(bad), "--out", str(out)])


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_img2img_matches_diffusers_img2img_pipeline(tiny_dir, pipeline, scheduler):
    """img2img against diffusers' StableDiffusionImg2ImgPipeline: same init latents (ours: the VAE posterior mean
    of the init images, handed to diffusers as latents, which it then uses as they are), same noise (drawn by
    torch and given to both), strength 0.5 of 4 steps -> both start at step 2 with the init latents noised to
    that step's level (VP for DDIM, x0 + sigma noise for Euler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    cfg = _cfg(pipeline, num_steps=4, guidance_scale=4.0, scheduler=scheduler, init_strength=0.5)
    assert cfg.start_step == 2
    rng = np.random.default_rng(3)
    init = rng.uniform(-1, 1, (len(PROMPTS), cfg.height, cfg.width, 3)).astype(np.float32)
    latents = np.asarray(sampling.encode_reference_images(pipeline.vae, jnp.asarray(init)))
    noise = torch.randn(latents.transpose(0, 3, 1, 2).shape, generator=torch.Generator().manual_seed(5))
    ours = sampling.generate(pipeline, sampling.tokenize(pipeline, PROMPTS), key=jax.random.key(0), cfg=cfg,
                             noise=noise.numpy().transpose(0, 2, 3, 1), init_images=init)
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_dir, safety_checker=None, feature_extractor=None,
                                                               requires_safety_checker=False)
    if scheduler == "euler":
        reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    theirs = reference(PROMPTS, image=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), strength=0.5,
                       num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(5),
                       output_type="np").images
    # same float32 path as the text-to-image parity above (1e-4 relative); a wrong start step or noise level
    # changes the images by > 1e-2 (checked: strength 0.75 vs 0.5 differ by ~0.3 relative)
    assert _rel_l2((np.asarray(ours) + 1) / 2, theirs) < 1e-4
    full = sampling.generate(pipeline, sampling.tokenize(pipeline, PROMPTS), key=jax.random.key(0),
                             cfg=_cfg(pipeline, num_steps=4, guidance_scale=4.0, scheduler=scheduler,
                                      init_strength=0.75), noise=noise.numpy().transpose(0, 2, 3, 1), init_images=init)
    assert _rel_l2(full, ours) > 1e-2


def test_img2img_bad_inputs(pipeline):
    ids = sampling.tokenize(pipeline, PROMPTS)
    cfg = _cfg(pipeline, num_steps=4, init_strength=0.5)
    with pytest.raises(ValueError, match="init_images must be"):
        sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=cfg, init_images=np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="cannot start part-way"):
        sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=_cfg(pipeline, num_steps=4, init_strength=0.5,
                                                                        scheduler="dpmpp_2m"),
                          init_images=np.zeros((2, cfg.height, cfg.width, 3), np.float32))
    with pytest.raises(ValueError, match="runs no step"):
        sampling.SamplingConfig(num_steps=4, init_strength=0.1)
