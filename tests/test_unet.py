"""UNet parity against diffusers' PyTorch UNet2DConditionModel (same random weights, float32), plus options.

Each tiny config is built in PyTorch from `UNetConfig.to_dict()` (so the dict is also proven acceptable to
`from_config`), every parameter is perturbed with noise (default init leaves norms at 1/0 and zero-init paths
that would hide bugs), converted with `fusion_jax.weights.load_state_dict`, and both forwards are compared with a
relative L2 error bound of 1e-4. The three configs together cover every config option we read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import weights
from fusion_jax.models import attention as attention_lib
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig, set_attention_kernel
from fusion_jax.models.resnet import GroupNorm
from parity_helpers import rel_l2

TOL = 1e-4

# SD 1.x style: conv projections, one head count for all blocks, int timesteps, no mid block.
SD1_TINY = UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None)

# SD 2.x style plus every other SD option: per-block heads, linear projections, upcast attention,
# only_cross_attention per block, flip_sin_to_cos False / freq_shift 1, centred input, norm_eps,
# padding-0 downsampling, mid-block scale, per-block layers and cross_attention_dim; odd latent size.
SD2_TINY = UNetConfig(
    sample_size=15, block_out_channels=(32, 64), layers_per_block=(1, 2), norm_num_groups=8,
    cross_attention_dim=(32, 32), attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    only_cross_attention=(True, False), flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
    norm_eps=1e-6, downsample_padding=0, mid_block_scale_factor=2.0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

# SDXL style: text_time added embedding, transformer_layers_per_block > 1 in one block, explicit heads.
SDXL_TINY = UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    num_attention_heads=(2, 4), attention_head_dim=(99, 99), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, only_cross_attention=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def torch_unet(config: UNetConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    model = TorchUNet.from_config(config.to_dict()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def to_jax(torch_model, config: UNetConfig, **kwargs) -> UNet2DConditionModel:
    tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), **kwargs))
    return weights.load_state_dict(model, tensors, source="diffusers test model")


def jit_forward(model: UNet2DConditionModel):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, sample, t, ehs, added):
        return nnx.merge(graphdef, state)(sample, t, ehs, added_cond_kwargs=added)

    return lambda *args: forward(state, *args)


def make_inputs(config: UNetConfig, batch: int, height: int, width: int, seq: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, config.in_channels)).astype(np.float32)
    ehs = rng.standard_normal((batch, seq, config.cross_attention_dims()[0])).astype(np.float32)
    added = None
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((batch, text_dim)).astype(np.float32),
                 "time_ids": rng.uniform(0, 1024, (batch, 6)).astype(np.float32)}
    return sample, ehs, added


def torch_forward(model, sample, t, ehs, added):
    with torch.no_grad():
        out = model(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.as_tensor(t),
                    torch.from_numpy(ehs),
                    added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()})
    return out.sample.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "config, size, timesteps",
    [
        (SD1_TINY, (16, 16), 981),  # scalar int timestep
        (SD2_TINY, (15, 13), np.array([3.5, 640.0], np.float32)),  # per-sample fractional timesteps, odd sizes
        (SDXL_TINY, (16, 16), np.array([10, 999], np.int32)),
    ],
    ids=["sd1", "sd2", "sdxl"],
)
def test_unet_matches_diffusers(config, size, timesteps):
    reference = torch_unet(config)
    model = to_jax(reference, config)
    sample, ehs, added = make_inputs(config, 2, *size)
    expected = torch_forward(reference, sample, timesteps, ehs, added)
    ours = jit_forward(model)(sample, timesteps, ehs, added)
    assert ours.shape == expected.shape
    assert rel_l2(ours, expected) < TOL


# SD 1.x layout with four levels and padding-1 downsampling at FlashFace's reference size: 28x28 latents go
# 28 -> 14 -> 7 -> 4 and back, so the 4 -> 7 upsampler must resize to its skip connection's size (torch nearest,
# diffusers' Upsample2D with output_size), not double.
SD1_ODD = UNetConfig(
    block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def test_odd_latent_size_upsamples_to_the_skip_size():
    reference = torch_unet(SD1_ODD, seed=5)
    model = to_jax(reference, SD1_ODD)
    sample, ehs, added = make_inputs(SD1_ODD, 1, 28, 28, seed=6)
    expected = torch_forward(reference, sample, 321, ehs, added)
    ours = jit_forward(model)(sample, 321, ehs, added)
    assert ours.shape == expected.shape == (1, 28, 28, 4)
    assert rel_l2(ours, expected) < TOL


def test_chunked_attention_kernel_matches_diffusers():
    """The query-chunked CPU kernel (chunk 24 < 16*16 tokens, with a ragged last chunk) gives the same UNet."""
    reference = torch_unet(SD1_TINY, seed=3)
    model = to_jax(reference, SD1_TINY)
    set_attention_kernel(model, "chunked", query_chunk_size=24)
    sample, ehs, added = make_inputs(SD1_TINY, 1, 16, 16, seed=4)
    expected = torch_forward(reference, sample, 500, ehs, added)
    ours = jit_forward(model)(sample, 500, ehs, added)
    assert rel_l2(ours, expected) < TOL


def test_attention_kernels_agree_and_upcast():
    """'chunked' equals 'xla' (same math, blocked over queries); bf16 with upcast stays close to float32."""
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, (2, 50, 2, 8)) for kk in jax.random.split(key, 3))
    xla = attention_lib.dot_product_attention(q, k, v, kernel="xla")
    chunked = attention_lib.dot_product_attention(q, k, v, kernel="chunked", query_chunk_size=16)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(xla), rtol=1e-5, atol=1e-6)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(xla), np.einsum("bhqk,bkhd->bqhd", probs, v), rtol=1e-5, atol=1e-6)
    half = attention_lib.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kernel="xla",
                                               upcast=True)
    assert half.dtype == jnp.bfloat16
    assert rel_l2(half.astype(jnp.float32), xla) < 2e-2
    # the blocked kernel's gradients (through lax.map and the max it stops) equal XLA's
    def loss(kernel):
        return lambda q, k, v: jnp.sum(jnp.sin(attention_lib.dot_product_attention(
            q, k, v, kernel=kernel, query_chunk_size=16)))
    grads_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    grads_chunked = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for ours, theirs in zip(grads_chunked, grads_xla):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 6, 5, 64), (3, 40, 32), (1, 4, 4, 3, 16)])
def test_group_norm_matches_torch(shape):
    """Our GroupNorm (per-channel then per-group reductions) equals torch.nn.GroupNorm on NHWC-like inputs of any
    rank, with affine parameters; a bfloat16 input comes back bfloat16 (statistics in float32)."""
    channels = shape[-1]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    reference = torch.nn.GroupNorm(8, channels, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(rng.standard_normal(channels).astype(np.float32)))
        reference.bias.copy_(torch.from_numpy(rng.standard_normal(channels).astype(np.float32)))
        channels_first = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
        expected = np.moveaxis(reference(channels_first).numpy(), 1, -1)
    norm = GroupNorm(channels, 8, epsilon=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(reference.weight.detach().numpy())
    norm.bias[...] = jnp.asarray(reference.bias.detach().numpy())
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=2e-5)
    assert norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_remat_gives_the_same_gradients():
    """remat only changes what is stored for the backward pass, not the gradients."""
    def block(remat):
        return attention_lib.Transformer2DModel(
            16, heads=2, dim_head=8, cross_attention_dim=8, layer_prefix="t", num_layers=2, norm_num_groups=4,
            remat=remat, rngs=nnx.Rngs(0))

    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 16))
    ehs = jax.random.normal(jax.random.key(2), (1, 3, 8))

    def grads(module):
        graphdef, params = nnx.split(module, nnx.Param)

        @jax.jit
        def g(params):
            return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, ehs) ** 2))(params)

        return jax.tree.leaves(g(params))

    plain, remat = grads(block(False)), grads(block(True))
    assert len(plain) == len(remat) > 0
    for a, b in zip(plain, remat):  # same math, possibly reordered by XLA: float32 round-off only
        assert rel_l2(b, a) < 1e-5


def test_layer_names_are_diffusers_paths():
    model = nnx.eval_shape(lambda: UNet2DConditionModel(SDXL_TINY, rngs=nnx.Rngs(0)))
    names = list(model.transformer_blocks())
    assert names == [
        "down_blocks.1.attentions.0.transformer_blocks.0", "down_blocks.1.attentions.0.transformer_blocks.1",
        "mid_block.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.1",
        "up_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.0.attentions.0.transformer_blocks.1",
        "up_blocks.0.attentions.1.transformer_blocks.0", "up_blocks.0.attentions.1.transformer_blocks.1",
    ]
    keys = set(weights.torch_keys(model))
    for name in names:
        assert f"{name}.attn2.to_out.0.weight" in keys and f"{name}.ff.net.0.proj.weight" in keys


@pytest.mark.parametrize(
    "key, value",
    [
        ("dual_cross_attention", True),
        ("num_class_embeds", 10),
        ("resnet_time_scale_shift", "scale_shift"),
        ("addition_embed_type", "text"),
        ("act_fn", "gelu"),
        ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
        ("attention_head_dim", [2, 4, 8]),
        ("transformer_layers_per_block", [[1], [2]]),
        ("time_embedding_type", "fourier"),
        ("some_future_key", 1),
    ],
)
def test_unsupported_config_values_name_the_key(key, value):
    config = SD1_TINY.to_dict()
    config[key] = value
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(config)


def test_config_round_trip_and_bad_inputs():
    assert UNetConfig.from_dict(SD2_TINY.to_dict()) == SD2_TINY
    text_time = SDXL_TINY.to_dict()
    del text_time["addition_time_embed_dim"]
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        UNetConfig.from_dict(text_time)
    model = nnx.jit(lambda: UNet2DConditionModel(SDXL_TINY, rngs=nnx.Rngs(0)))()
    sample, ehs, added = make_inputs(SDXL_TINY, 2, 8, 8)
    assert jax.eval_shape(lambda: model(sample, 1, ehs, added)).shape == sample.shape
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        jax.eval_shape(lambda: model(sample, 1, ehs))
    with pytest.raises(ValueError, match="sample"):
        jax.eval_shape(lambda: model(sample[..., :3], 1, ehs, added))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        jax.eval_shape(lambda: model(sample, 1, ehs[..., :5], added))
    with pytest.raises(ValueError, match="timesteps"):
        jax.eval_shape(lambda: model(sample, np.zeros(3), ehs, added))
