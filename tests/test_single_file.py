"""Single-file Stable Diffusion checkpoints (original LDM key layout, as WebUI tools save them).

The test writes such a file itself: a tiny diffusers UNet with random weights, its keys renamed to the LDM layout
by the mapping below (written from the layout of the original CompVis checkpoints). `load_unet_single_file` must
turn it back (through diffusers' converter) into a UNet that computes what the diffusers model computes.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusion_jax import weights

LAYERS = 1  # layers_per_block of the tiny config
CONFIG = dict(block_out_channels=[32, 64], layers_per_block=LAYERS, cross_attention_dim=32, attention_head_dim=8,
              norm_num_groups=8, sample_size=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET_NAMES[head]}.{tail}"


def to_ldm_key(key: str) -> str:
    """diffusers UNet key -> original LDM single-file key (for the tiny config's block structure)."""
    p = key.split(".")
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for src, dst in simple.items():
        if key.startswith(src + "."):
            return "model.diffusion_model." + dst + key[len(src):]
    if p[0] == "down_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "downsamplers":
            return f"model.diffusion_model.input_blocks.{(i + 1) * (LAYERS + 1)}.0.op.{'.'.join(p[5:])}"
        index = 1 + i * (LAYERS + 1) + j
        return f"model.diffusion_model.input_blocks.{index}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
        if kind == "attentions":
            return "model.diffusion_model.middle_block.1." + rest
        return f"model.diffusion_model.middle_block.{2 * j}." + _resnet(rest)
    if p[0] == "up_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "upsamplers":
            has_attention = CONFIG["up_block_types"][i].startswith("CrossAttn")
            index = i * (LAYERS + 1) + LAYERS
            return f"model.diffusion_model.output_blocks.{index}.{2 if has_attention else 1}.conv.{'.'.join(p[5:])}"
        index = i * (LAYERS + 1) + j
        return f"model.diffusion_model.output_blocks.{index}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    raise KeyError(key)


@pytest.fixture(scope="module")
def torch_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _write_single_file(torch_unet, path):
    from safetensors.torch import save_file

    ldm = {to_ldm_key(k): v.contiguous() for k, v in torch_unet.state_dict().items()}
    ldm["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)  # other components
    save_file(ldm, str(path))


def test_single_file_unet_matches_diffusers(torch_unet, tmp_path):
    file = tmp_path / "tiny-sd.safetensors"
    _write_single_file(torch_unet, file)
    config_dir = tmp_path / "config" / "unet"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps(dict(torch_unet.config)))
    ours = weights.load_unet_single_file(file, config=tmp_path / "config")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx))
    ref = ref.sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    # float32 on both sides, same weights: only summation order differs.
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


def test_single_file_refuses_pickles_and_needs_local_config(torch_unet, tmp_path):
    file = tmp_path / "tiny-sd.ckpt"
    torch.save({"state_dict": {to_ldm_key(k): v for k, v in torch_unet.state_dict().items()}}, file)
    config_dir = tmp_path / "config" / "unet"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps(dict(torch_unet.config)))
    with pytest.raises(weights.CheckpointError, match="refusing to unpickle"):
        weights.load_unet_single_file(file, config=tmp_path / "config")
    trusted = weights.load_unet_single_file(file, config=tmp_path / "config", allow_pickle=True)
    assert trusted.config.block_out_channels == tuple(CONFIG["block_out_channels"])
    empty = tmp_path / "no-config-here"
    empty.mkdir()
    with pytest.raises(weights.CheckpointError, match="no config.json"):
        weights.load_unet_single_file(tmp_path / "tiny-sd.safetensors", config=empty)
