"""CLIP-T / CLIP-I metric (fusion_jax.reproduction.clip_metric) against transformers' PyTorch CLIPModel.

Reference: a tiny random `transformers.CLIPModel` saved with `save_pretrained` (the layout of
openai/clip-vit-large-patch14: config.json with text_config / vision_config, model.safetensors) plus the project's
tiny CLIP tokenizer and a preprocessor_config.json. Our metric loads that folder; its projected, normalised text and
image embeddings are compared with `get_text_features` / `get_image_features`, and its preprocessing with
transformers' (PIL-based) CLIPImageProcessor on a real photo.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
import transformers

from fusion_jax import tiny
from fusion_jax.reproduction import clip_metric


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_model")
    vocab = tiny.tiny_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tiny.CONTEXT_LENGTH, bos_token_id=vocab[tiny.BOS_TOKEN],
                eos_token_id=vocab[tiny.EOS_TOKEN], pad_token_id=vocab[tiny.EOS_TOKEN])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=48,
                  patch_size=16)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases away from their init values too
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    tiny.write_tiny_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 48},
        "do_center_crop": True, "crop_size": {"height": 48, "width": 48}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True, "resample": 3}))
    return folder, model


def test_preprocessing_matches_clip_image_processor(clip_folder):
    folder, _ = clip_folder
    ours = clip_metric.ClipPreprocess.from_folder(folder, 48)
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    for image in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.astronaut()[:100, :300]):
        expected = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = ours(image)
        assert got.shape == expected.shape
        # same PIL bicubic resize and crop; float32 normalisation order differs by an ulp or so
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_embeddings_match_transformers_clip_model(clip_folder):
    folder, model = clip_folder
    metric = clip_metric.ClipMetric(folder)
    prompts = ["a photo of a person", "the astronaut and the flag", "x"]
    with torch.no_grad():
        ids = torch.from_numpy(metric.tokenizer(prompts).astype(np.int64))
        text = model.get_text_features(input_ids=ids)
        text = getattr(text, "pooler_output", text)  # transformers 5 may return an output object
        text = torch.nn.functional.normalize(text, dim=-1).numpy()
    np.testing.assert_allclose(metric.text_embeds(prompts), text, atol=2e-5)  # float32 towers, 2 layers
    images = [skimage.data.astronaut(), skimage.data.coffee()]
    pixels = np.stack([metric.preprocess(im) for im in images]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        image = getattr(image, "pooler_output", image)
        image = torch.nn.functional.normalize(image, dim=-1).numpy()
    got = metric.image_embeds(images, batch_size=2)
    np.testing.assert_allclose(got, image, atol=2e-5)
    clip_t = clip_metric.clip_similarity(got, metric.text_embeds(prompts[:2]))
    np.testing.assert_allclose(clip_t, 100 * np.sum(image * text[:2], axis=1), atol=5e-3)


def test_clip_folder_errors(tmp_path, clip_folder):
    with pytest.raises(clip_metric.ClipError, match=r"--clip .*: no config.json"):
        clip_metric.ClipMetric(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(clip_metric.ClipError, match="not a full CLIPModel config"):
        clip_metric.ClipMetric(tmp_path)
