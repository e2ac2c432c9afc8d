"""SDXL end to end: a whole tiny SDXL pipeline (two CLIP text encoders, penultimate hidden states, the pooled
projection, size `time_ids`, the text_time added embedding) through `sampling.generate` against diffusers'
PyTorch `StableDiffusionXLPipeline` loading the very same folder, on the same latents; also through the CLI."""

import json

import jax
import numpy as np
import pytest
import torch

from fusion_jax import cli_utils, sampling, weights
from fusion_jax.tiny import CONTEXT_LENGTH, EOS_TOKEN, tiny_text_encoder_config, tiny_vocab, write_tiny_tokenizer

PROMPTS = ["a photo of a smiling person", "a red face"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A random tiny SDXL pipeline written by diffusers / transformers themselves (save_pretrained)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    torch.manual_seed(0)
    ours = tiny_text_encoder_config()
    vocab = tiny_vocab()
    text_cfg = dict(vocab_size=len(vocab), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu", bos_token_id=ours.bos_token_id,
                    eos_token_id=ours.eos_token_id, pad_token_id=vocab[EOS_TOKEN])
    enc1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **text_cfg))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=24, **text_cfg))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32 + 16, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=32, scaling_factor=0.13025)
    for module in (unet, vae):  # diffusers zero-initialises some layers: make every weight count
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    write_tiny_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tok"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def _rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_matches_diffusers_sdxl_pipeline(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipeline = weights.load_pipeline(sdxl_dir)
    assert pipeline.two_text_encoders and pipeline.force_zeros_for_empty_prompt
    ids = sampling.tokenize(pipeline, PROMPTS)
    assert ids.shape == (2, 2, CONTEXT_LENGTH)
    cfg = sampling.SamplingConfig(height=32, width=32, num_steps=3, guidance_scale=5.0, scheduler="euler",
                                  output="float")
    noise = np.random.default_rng(0).standard_normal(sampling.latent_shape(pipeline, cfg, 2)).astype(np.float32)
    ours = sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=cfg, noise=noise)
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    theirs = reference(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                       latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), output_type="np").images
    # float32 through two text encoders, 3 guided Euler steps (pooled text + time ids in every step) and the
    # decoder, as the SD 1.x pipeline parity (1e-4 relative); zero negatives, a wrong hidden layer or missing
    # time ids each change the images by > 1e-2
    err = _rel_l2((np.asarray(ours) + 1) / 2, theirs)
    print(f"SDXL pipeline vs diffusers rel_l2 {err:.1e}")
    assert err < 1e-4
    # with an explicit negative prompt diffusers encodes it (no zeros): the same rows as ours with uncond_ids
    theirs_neg = reference(PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=3, guidance_scale=5.0,
                           height=32, width=32, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                           output_type="np").images
    ours_neg = sampling.generate(pipeline, ids, uncond_ids=sampling.tokenize(pipeline, ["blurry"] * 2),
                                 key=jax.random.key(0), cfg=cfg, noise=noise)
    assert _rel_l2((np.asarray(ours_neg) + 1) / 2, theirs_neg) < 1e-4
    assert _rel_l2(theirs_neg, theirs) > 1e-3


def test_sdxl_cli_and_errors(sdxl_dir, tmp_path):
    from tests.test_references_cli import _load_cli

    pipeline = weights.load_pipeline(sdxl_dir)
    with pytest.raises(ValueError, match=r"\(batch, 2, length\)"):
        sampling.generate(pipeline, np.zeros((1, CONTEXT_LENGTH), np.int32), key=jax.random.key(0))
    with pytest.raises(ValueError, match="not supported yet"):
        sampling.generate(pipeline, sampling.tokenize(pipeline, ["p"]), key=jax.random.key(0),
                          cfg=sampling.SamplingConfig(height=32, width=32, num_steps=1),
                          references=np.zeros((1, 1, 32, 32, 3), np.float32))
    out = tmp_path / "out"
    assert _load_cli().main(["--model", str(sdxl_dir), "--prompt", "a person", "--steps", "2", "--batch-size", "1",
                             "--scheduler", "euler", "--out", str(out)]) == 0
    settings = cli_utils.read_png_settings(out / "00000.png")
    assert settings["sampling"]["num_steps"] == 2 and json.dumps(settings)
