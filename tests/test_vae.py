"""AutoencoderKL parity against diffusers' PyTorch AutoencoderKL with the same random weights (float32).

Tolerance: relative L2 error < 1e-4 (the issue's bar); both sides run float32, so only summation order differs.
"""

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import weights
from fusion_jax.models import vae as vae_lib
from parity_helpers import rel_l2, nchw, nhwc

REL_TOL = 1e-4

CASES = {
    # two resolutions, mid-block attention, quant convs (the SD layout, shrunk)
    "sd_like": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                    scaling_factor=0.18215),
    # three resolutions, two resnets per block, no mid attention, no quant convs, a shift factor, 4-ch input
    "no_attention_no_quant": dict(block_out_channels=(8, 8, 16), layers_per_block=2, norm_num_groups=8,
                                  latent_channels=3, in_channels=4, out_channels=2, mid_block_add_attention=False,
                                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5,
                                  shift_factor=0.25),
}


def make_pair(case: str, seed: int):
    """A diffusers AutoencoderKL with every parameter randomised (norms and biases too) and ours, same weights."""
    kwargs = dict(CASES[case])
    n = len(kwargs["block_out_channels"])
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.add_(0.05 * noise)
    config = vae_lib.AutoencoderKLConfig.from_dict(dict(ref.config))
    ours = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(config, rngs=nnx.Rngs(0)))  # as weights.load_vae does
    weights.load_state_dict(ours, {k: v.numpy() for k, v in ref.state_dict().items()})
    return ref, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_decode_match_diffusers(case):
    ref, ours = make_pair(case, seed=1)
    cfg = ours.config
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, size=(2, 16, 16, cfg.in_channels)).astype(np.float32)
    latents = rng.normal(size=(2, 16 // cfg.downscale_factor, 16 // cfg.downscale_factor, cfg.latent_channels))
    latents = latents.astype(np.float32)

    with torch.no_grad():
        posterior = ref.encode(nchw(images)).latent_dist
        decoded = ref.decode(nchw(latents)).sample
    got_posterior = nnx.jit(lambda m, x: m.encode(x))(ours, images)
    got_decoded = nnx.jit(lambda m, z: m.decode(z))(ours, latents)

    assert got_posterior.mean.shape == nhwc(posterior.mean).shape
    assert rel_l2(got_posterior.mean, nhwc(posterior.mean)) < REL_TOL
    assert rel_l2(got_posterior.logvar, nhwc(posterior.logvar)) < REL_TOL
    assert rel_l2(got_posterior.std, nhwc(posterior.std)) < REL_TOL
    assert rel_l2(got_posterior.kl(), posterior.kl().numpy()) < REL_TOL  # the VAE training regulariser
    assert got_decoded.shape == (2, 16, 16, cfg.out_channels)
    assert rel_l2(got_decoded, nhwc(decoded)) < REL_TOL


def test_scaled_latent_helpers_follow_diffusers_pipeline_convention():
    ref, ours = make_pair("no_attention_no_quant", seed=3)
    cfg = ours.config  # scaling_factor 1.5, shift_factor 0.25
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, size=(1, 16, 16, cfg.in_channels)).astype(np.float32)
    with torch.no_grad():
        mean = ref.encode(nchw(images)).latent_dist.mean
        expected_latents = (mean - cfg.shift_factor) * cfg.scaling_factor  # what SD3/Flux pipelines feed the model
        expected_images = ref.decode(expected_latents / cfg.scaling_factor + cfg.shift_factor).sample
    latents = nnx.jit(lambda m, x: m.latents_from_images(x))(ours, images)
    assert rel_l2(latents, nhwc(expected_latents)) < REL_TOL
    assert rel_l2(nnx.jit(lambda m, z: m.images_from_latents(z))(ours, latents), nhwc(expected_images)) < REL_TOL

    # a posterior sample is mean + std * N(0, 1) with the given key: reproducible and different per key
    posterior = nnx.jit(lambda m, x: m.encode(x))(ours, images)
    draw = posterior.sample(jax.random.key(0))
    np.testing.assert_allclose(draw, posterior.sample(jax.random.key(0)))
    noise = jax.random.normal(jax.random.key(0), posterior.mean.shape)
    np.testing.assert_allclose(draw, posterior.mean + posterior.std * noise, rtol=1e-6, atol=1e-6)
    assert not np.allclose(draw, posterior.sample(jax.random.key(1)))
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)


def test_config_round_trips_through_diffusers():
    config = vae_lib.AutoencoderKLConfig(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=4, latent_channels=16,
        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=False,
        mid_block_add_attention=False, use_quant_conv=False,
    )
    theirs = diffusers.AutoencoderKL.from_config(config.to_dict())
    assert vae_lib.AutoencoderKLConfig.from_dict(dict(theirs.config)) == config


def test_legacy_attention_key_names_are_renamed():
    ref, ours = make_pair("sd_like", seed=5)
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v.numpy() for k, v in ref.state_dict().items()}
    assert any(".query." in k for k in legacy)
    fresh = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(ours.config, rngs=nnx.Rngs(1)))
    weights.load_state_dict(fresh, vae_lib.rename_legacy_vae_keys(legacy))
    assert weights.state_dict(fresh).keys() == {k for k in ref.state_dict()}


def test_bad_config_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="block_out_channels"):
        vae_lib.AutoencoderKLConfig.from_dict({"block_out_channels": [8, 12], "norm_num_groups": 8,
                                               "down_block_types": ["DownEncoderBlock2D"] * 2,
                                               "up_block_types": ["UpDecoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="down_block_types"):
        vae_lib.AutoencoderKLConfig.from_dict({"block_out_channels": [8, 16], "norm_num_groups": 8})
    with pytest.raises(ValueError, match="scaling_factor"):
        vae_lib.AutoencoderKLConfig.from_dict({"scaling_factor": "0.18"})
    with pytest.raises(ValueError, match="act_fn"):
        vae_lib.AutoencoderKLConfig.from_dict({"act_fn": "relu", "norm_num_groups": 8, "block_out_channels": [8]})
    config = vae_lib.AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    model = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="images must be NHWC"):
        model.encode(np.zeros((1, 3, 16, 16), np.float32))  # NCHW by mistake
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(np.zeros((1, 15, 16, 3), np.float32))
    with pytest.raises(ValueError, match="latents must be NHWC"):
        model.decode(np.zeros((1, 8, 8, 3), np.float32))
