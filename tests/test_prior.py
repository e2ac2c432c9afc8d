"""The DALL-E 2 style prior: our PriorTransformer and UnCLIPSampler against diffusers' `PriorTransformer` and
`UnCLIPScheduler` on tiny random weights (float32).

The sampling reference is the prior loop of diffusers' UnCLIPPipeline written out here (the pipeline itself
needs a decoder and super-resolution UNets): classifier-free guidance on the batch [uncond, cond],
`scheduler.step(..., prev_timestep=next t, generator=g)`, then `post_process_latents`. Our side gets the same
initial latents and per-step noise, drawn from a copy of the same torch generator in the same order.

Tolerance: relative L2 < 1e-4 (the project's parity bar); both sides compute the model in float32. The sampling
reference runs diffusers' scheduler on float64 schedule tables (see `float64_unclip_scheduler` for why).
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PriorTransformer as TorchPrior
from diffusers import UnCLIPScheduler
from flax import nnx

from fusion_jax import encoders, weights
from fusion_jax.models.prior import PriorConfig, PriorTransformer, sample_prior
from fusion_jax.schedulers.unclip import UnCLIPSampler
from parity_helpers import rel_l2

REL_TOL = 1e-4

BASE = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=5,
            additional_embeddings=4)
CASES = {
    "karlo": {},  # Karlo's layout: linear text-state projection, prd token, no extra norms
    "norms_and_widths": dict(norm_in_type="layer", embedding_proj_norm_type="layer", embedding_proj_dim=10,
                             clip_embed_dim=14, time_embed_dim=20, time_embed_act_fn="gelu"),
}


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: the zero-initialised position / prd embeddings and clip_mean / clip_std included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight") or name == "clip_std":
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or name == "clip_mean":
                p.copy_(0.1 * noise)
            elif name in ("positional_embedding", "prd_embedding"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model.eval()


def make_prior(tmp_path, case: str, seed: int = 0):
    """(diffusers prior, ours loaded from the folder diffusers saved)."""
    ref = randomise(TorchPrior(**BASE, **CASES[case]), seed)
    ref.save_pretrained(tmp_path / "pipe" / "prior")  # config.json + diffusion_pytorch_model.safetensors
    return ref, encoders.load_prior(tmp_path / "pipe")


def text_inputs(config: dict, batch: int, seed: int):
    """CLIP-text-like conditioning: embeddings, hidden states and masks with different lengths per row."""
    rng = np.random.default_rng(seed)
    embeds = rng.normal(size=(batch, config.get("embedding_proj_dim") or config["embedding_dim"])).astype(np.float32)
    hidden = rng.normal(size=(batch, config["num_embeddings"], config["embedding_dim"])).astype(np.float32)
    mask = np.zeros((batch, config["num_embeddings"]), bool)
    for row in range(batch):
        mask[row, : 2 + row % config["num_embeddings"]] = True
    return embeds, hidden, mask


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_mask", [True, False])
def test_prior_transformer_matches_diffusers(tmp_path, case, with_mask):
    ref, ours = make_prior(tmp_path, case)
    config = {**BASE, **CASES[case]}
    embeds, hidden, mask = text_inputs(config, batch=3, seed=1)
    x = np.random.default_rng(2).normal(size=(3, config["embedding_dim"])).astype(np.float32)
    t = np.array([999, 500, 3])
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(embeds), torch.from_numpy(hidden),
                       attention_mask=torch.from_numpy(mask) if with_mask else None).predicted_image_embedding
    run = nnx.jit(lambda m, *a: m(*a))
    got = run(ours, x, t, embeds, hidden, mask if with_mask else None)
    assert got.shape == tuple(expected.shape) == (3, config.get("clip_embed_dim") or 12)
    assert rel_l2(got, expected) < REL_TOL
    # a scalar timestep broadcasts over the batch, as in diffusers
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), 7, torch.from_numpy(embeds), torch.from_numpy(hidden),
                       attention_mask=torch.from_numpy(mask)).predicted_image_embedding
    assert rel_l2(run(ours, x, 7, embeds, hidden, mask), expected) < REL_TOL
    np.testing.assert_allclose(ours.post_process_latents(jnp.ones((1, got.shape[1]))),
                               (ref.clip_std + ref.clip_mean).detach().numpy(), rtol=1e-6)


def test_prior_without_prd_token_matches_diffusers(tmp_path):
    """added_emb_type None: the output is read at the image-embedding token (diffusers returns it as (B, 1, D))."""
    config = {**BASE, "additional_embeddings": 3, "added_emb_type": None}
    ref = randomise(TorchPrior(**config), seed=3)
    ref.save_pretrained(tmp_path / "prior")
    ours = encoders.load_prior(tmp_path / "prior")
    embeds, hidden, mask = text_inputs(config, batch=2, seed=4)
    x = np.random.default_rng(5).normal(size=(2, 12)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.tensor([10, 20]), torch.from_numpy(embeds),
                       torch.from_numpy(hidden), attention_mask=torch.from_numpy(mask)).predicted_image_embedding
    assert expected.shape == (2, 1, 12)
    got = nnx.jit(lambda m, *a: m(*a))(ours, x, np.array([10, 20]), embeds, hidden, mask)
    assert rel_l2(got, expected[:, 0]) < REL_TOL


def reference_prior_loop(prior, scheduler, steps, embeds, hidden, mask, negative, guidance_scale, generator):
    """diffusers' UnCLIPPipeline prior loop (pipeline_unclip.py), on precomputed text encoder outputs."""
    batch, dim = embeds.shape[0], prior.config.embedding_dim
    guided = guidance_scale > 1.0
    if guided:
        embeds, hidden, mask = (torch.cat([n.expand(batch, *n.shape[1:]), c]) for n, c in zip(negative,
                                                                                            (embeds, hidden, mask)))
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    latents = torch.randn((batch, dim), generator=generator) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if guided else latents
        pred = prior(model_in, timestep=t, proj_embedding=embeds, encoder_hidden_states=hidden,
                     attention_mask=mask).predicted_image_embedding
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=generator, prev_timestep=prev).prev_sample
    return prior.post_process_latents(latents)


def float64_unclip_scheduler(**config) -> UnCLIPScheduler:
    """diffusers' UnCLIPScheduler with its schedule tables in float64 (the betas restated from the cosine formula).

    Stock, it keeps betas and their cumulative product in float32, and its step computes 1 - alpha_bar_0
    (~4e-5) and 1 - a_t / a_prev (a_t ~ 2e-9 at t = 999) from them: float32 cancellation that moves its step
    coefficients by up to ~1e-3 relative (measured: 5e-4 relative L2 on the sampled embedding against either
    implementation in float64). Our tables are float64-derived; with float64 tables diffusers' own step code is
    the reference, and the only differences left are float32 rounding of the samples."""
    scheduler = UnCLIPScheduler(**config)
    n = scheduler.config.num_train_timesteps
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                         dtype=torch.float64)
    np.testing.assert_allclose(betas.numpy(), scheduler.betas.numpy(), rtol=1e-6)  # the same schedule
    scheduler.betas, scheduler.alphas = betas, 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


SAMPLING_CASES = {
    # Karlo's prior scheduler: predicts the sample, clip range 5, guidance 4
    "karlo_sample_guided": dict(config=dict(prediction_type="sample", clip_sample_range=5.0), steps=5, guidance=4.0),
    "epsilon_unguided": dict(config=dict(prediction_type="epsilon", clip_sample=True), steps=4, guidance=1.0),
}


@pytest.mark.parametrize("case", sorted(SAMPLING_CASES))
def test_prior_sampling_matches_diffusers_loop(tmp_path, case):
    spec = SAMPLING_CASES[case]
    ref, ours = make_prior(tmp_path, "karlo", seed=6)
    scheduler = float64_unclip_scheduler(variance_type="fixed_small_log", **spec["config"])
    scheduler.save_config(tmp_path / "pipe" / "prior_scheduler")
    sampler = encoders.load_prior_sampler(tmp_path / "pipe", spec["steps"])
    assert isinstance(sampler, UnCLIPSampler) and sampler.num_steps == spec["steps"]
    scheduler.set_timesteps(spec["steps"])
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), scheduler.timesteps.numpy())

    embeds, hidden, mask = text_inputs(BASE, batch=2, seed=7)
    neg = [a[:1] for a in text_inputs(BASE, batch=1, seed=8)]
    neg[2] = np.zeros_like(neg[2])
    neg[2][:, :2] = True  # the empty prompt: [bos, eos]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        expected = reference_prior_loop(ref, scheduler, spec["steps"], t(embeds), t(hidden), t(mask),
                                        [t(n) for n in neg], spec["guidance"], torch.Generator().manual_seed(9))
    # the same draws: initial latents, then one (B, D) noise per step with t > 0 (the last step, t = 0, has none)
    gen = torch.Generator().manual_seed(9)
    latents = torch.randn((2, 12), generator=gen).numpy()
    noise = np.stack([torch.randn((2, 12), generator=gen).numpy() for _ in range(spec["steps"] - 1)]
                     + [np.zeros((2, 12), np.float32)])
    got = sample_prior(ours, sampler, embeds, hidden, mask, negative=tuple(neg), guidance_scale=spec["guidance"],
                       latents=latents, step_noise=noise)
    assert got.shape == (2, 12)
    assert rel_l2(got, expected) < REL_TOL


def test_sampler_tables_and_key_driven_sampling(tmp_path):
    """Timesteps for Karlo's 25 steps end at 0; with a key, sampling runs and is reproducible."""
    sampler = UnCLIPSampler.from_diffusers_config({"_class_name": "UnCLIPScheduler", "prediction_type": "sample",
                                                   "clip_sample_range": 5.0}, 25)
    scheduler = UnCLIPScheduler(prediction_type="sample", clip_sample_range=5.0)
    scheduler.set_timesteps(25)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), scheduler.timesteps.numpy())
    _, ours = make_prior(tmp_path, "karlo", seed=10)
    embeds, hidden, mask = text_inputs(BASE, batch=2, seed=11)
    import jax

    key = jax.random.key(0)
    small = UnCLIPSampler(sampler.schedule, 3)
    a = sample_prior(ours, small, embeds, hidden, mask, guidance_scale=1.0, key=key)
    b = sample_prior(ours, small, embeds, hidden, mask, guidance_scale=1.0, key=key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.isfinite(np.asarray(a)))


def test_bad_inputs_name_the_problem(tmp_path):
    ref, ours = make_prior(tmp_path, "karlo", seed=12)
    with pytest.raises(weights.CheckpointError, match=r"prior.*width.*768 was expected"):
        encoders.load_prior(tmp_path / "pipe", expected_embedding_dim=768)
    assert encoders.load_prior(tmp_path / "pipe", expected_embedding_dim=12).config.embedding_dim == 12
    bad = tmp_path / "bad" / "prior"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(weights.CheckpointError, match="PriorTransformer"):
        encoders.load_prior(bad)
    # a checkpoint missing a key is reported with the key and the folder
    tensors = weights.read_tensors(tmp_path / "pipe" / "prior" / "diffusion_pytorch_model.safetensors")
    tensors.pop("prd_embedding")
    with pytest.raises(weights.CheckpointMismatchError, match="prd_embedding"):
        weights.load_state_dict(nnx.eval_shape(lambda: PriorTransformer(ours.config, rngs=nnx.Rngs(0))), tensors,
                                source="prior")
    with pytest.raises(ValueError, match="added_emb_type"):
        PriorConfig(added_emb_type="clip")
    with pytest.raises(ValueError, match="variance_type"):
        UnCLIPSampler.from_diffusers_config({"variance_type": "learned_range"}, 10)
    with pytest.raises(ValueError, match="num_inference_steps >= 2"):
        UnCLIPSampler.from_diffusers_config({}, 1)
    with pytest.raises(ValueError, match="thresholding"):
        UnCLIPSampler.from_diffusers_config({"thresholding": True}, 10)
    with pytest.raises(weights.CheckpointError, match="no scheduler_config.json"):
        encoders.load_prior_sampler(tmp_path / "bad")
    embeds, hidden, mask = text_inputs(BASE, batch=2, seed=13)
    with pytest.raises(ValueError, match="proj_embedding"):
        ours(np.zeros((2, 12), np.float32), 1, embeds[:, :5], hidden, mask)
    with pytest.raises(ValueError, match=r"9 positions .*\(3 text tokens\)"):
        ours(np.zeros((2, 12), np.float32), 1, embeds, hidden[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        ours(np.zeros((2, 12), np.float32), 1, embeds, hidden, mask[:, :3])
    with pytest.raises(ValueError, match="negative"):
        sample_prior(ours, UnCLIPSampler.from_diffusers_config({}, 2), embeds, hidden, mask, guidance_scale=4.0,
                     key=np.zeros(2, np.uint32))


def test_karlo_config_has_diffusers_keys_and_shapes():
    """The real Karlo prior config (diffusers' defaults: 20 layers, 32 heads x 64, ViT-L/14 width 768), shape-only
    on both sides: the same checkpoint keys and torch-layout shapes, and a (B, 768) prediction."""
    import jax

    config = PriorConfig.from_dict({"_class_name": "PriorTransformer", "dropout": 0.0})
    model = nnx.eval_shape(lambda: PriorTransformer(config, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = TorchPrior()
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaf = str(path[-1])
        shape = tuple(var.get_value().shape)
        ours[".".join(map(str, path[:-1] + ({"kernel": "weight", "scale": "weight"}.get(leaf, leaf),)))] = (
            shape[::-1] if leaf == "kernel" else shape)
    assert ours == theirs
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    out = nnx.eval_shape(lambda m, *a: m(*a), model, f32(2, 768), f32(2), f32(2, 768), f32(2, 77, 768),
                         jax.ShapeDtypeStruct((2, 77), jnp.bool_))
    assert out.shape == (2, 768)
