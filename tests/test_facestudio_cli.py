"""FaceStudio through `infer/generate.py`: the style encoder loaded from a transformers folder
(`--style-encoder`), img2img from the style image (`--img2img-strength`), the paper's sampler as the method's
default (Euler-ancestral; `--steps` still wins), checked pixel for pixel against `sampling.generate` called
directly with the same modules, crops, embeddings and key. Plus the padding-aware beta blend against NumPy and
the encoder / img2img errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from fusion_jax import cli_utils, references, sampling, weights
from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig, align_face
from fusion_jax.identity import base, facestudio as fs
from tests.test_references_cli import _load_cli, photos, tiny_dir  # noqa: F401  (fixtures)


def _style_encoder_folder(path, projection_dim):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=projection_dim, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return path


def test_blend_leaves_padding_references_out():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 1, 3, 5)).astype(np.float32)
    valid = np.array([[[True, False, True]], [[False, False, False]]])
    betas = (0.5, 0.3, 0.2)
    ours = np.asarray(fs.blend_faces(emb, betas, valid))
    w = np.array([0.5, 0.0, 0.2]) / 0.7  # the real photos' betas rescaled to the same total (1.0)
    np.testing.assert_allclose(ours[0, 0], np.einsum("ne,n->e", emb[0, 0], w), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours[1, 0], 0.0)  # no real photo: no face
    np.testing.assert_allclose(np.asarray(fs.blend_faces(emb, betas, np.ones((2, 1, 3), bool))),
                               np.asarray(fs.blend_faces(emb, betas)), rtol=1e-6)


def test_encoder_folders_and_img2img_errors(tmp_path):
    method = base.get("facestudio")
    cfg = fs.FaceStudioConfig(num_tokens=2, style_dim=8, face_dim=6)
    unet = weights.load_pipeline(_tiny(tmp_path)).unet
    model = method.attach(unet, cfg)
    folder = _style_encoder_folder(tmp_path / "clip12", 12)
    with pytest.raises(ValueError, match=r"facestudio.style_encoder .*clip12: the towers give 12 = 12-wide "
                                         r"image_embeds, facestudio.style_dim is 8"):
        method.prepare_model(model, dataclasses.replace(cfg, style_encoder=str(folder)))
    with pytest.raises(ValueError, match=r"facestudio.style_encoder .*nowhere: cannot load"):
        method.prepare_model(model, dataclasses.replace(cfg, style_encoder=str(tmp_path / "nowhere")))
    request = base.ReferenceRequest(references=np.zeros((1, 1, 1, 8, 8, 3), np.float32),
                                    face_embeddings=np.zeros((1, 1, 1, 6), np.float32))
    with pytest.raises(ValueError, match="img2img starts from the style image"):
        method.sampling_inputs(model, dataclasses.replace(cfg, img2img=True), request, batch=1, image_size=(32, 32),
                               latent_size=(4, 4))
    assert method.sampling_defaults(cfg) == {"scheduler": "euler_ancestral", "num_steps": 25}


def _tiny(tmp_path):
    from fusion_jax.tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "pipe", seed=0)
    return tmp_path / "pipe"


def test_cli_style_encoder_img2img_and_default_sampler(tiny_dir, photos, tmp_path):  # noqa: F811
    from fusion_jax.identity import export

    # an exported FaceStudio model whose style width is the tiny text encoder's (the 'direct' text branch reads
    # the pooled prompt state in place of Prior(CLIP_T(text)), so the widths must agree)
    cfg = fs.FaceStudioConfig(style_dim=32, alpha=0.3)
    method = base.get("facestudio")
    exported = tmp_path / "export"
    export.export_identity(method.attach(weights.load_pipeline(tiny_dir).unet, cfg), method, cfg, exported)
    encoder = _style_encoder_folder(tmp_path / "clip", 32)
    style = tmp_path / "style.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40, 3), np.uint8)).save(style)
    faces = tmp_path / "faces.npy"
    np.save(faces, np.random.default_rng(2).standard_normal((1, 512)).astype(np.float32))
    astro = photos / "astronaut.png"
    out = tmp_path / "out"
    assert _load_cli().main([
        "--model", str(tiny_dir), "--method", "facestudio", "--prompt", "a person", "--steps", "2",
        "--batch-size", "1", "--seed", "4", "--reference", str(astro), "--face-embeddings", str(faces),
        "--identity-weights", str(exported), "--style-image", str(style), "--style-encoder", str(encoder),
        "--img2img-strength", "0.5", "--alpha", "0.7", "--guidance-form", "cfg", "--out", str(out)]) == 0
    settings = cli_utils.read_png_settings(out / "00000.png")
    assert settings["sampling"]["scheduler"] == "euler_ancestral"  # the method's default sampler
    assert settings["sampling"]["num_steps"] == 2 and settings["sampling"]["init_strength"] == 0.5  # flags win
    assert settings["facestudio"]["img2img"] and settings["facestudio"]["style_encoder"] == [str(encoder)]

    # the same generation called directly
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
    image = np.asarray(Image.open(astro).convert("RGB"))
    crop = align_face(image, analyzer.largest_face(image).landmarks, 32, references.DEFAULT_MARGIN)
    refs = crop.astype(np.float32)[None, None] / 127.5 - 1.0
    pipeline = weights.load_pipeline(tiny_dir)
    model, _, loaded = export.load_identity_model(exported)
    assert loaded == cfg
    cfg = dataclasses.replace(cfg, alpha=0.7, face_embeddings=str(faces), style_image=str(style),
                              style_encoder=str(encoder), img2img=True)
    model = method.prepare_model(model, cfg)
    pipeline = dataclasses.replace(pipeline, unet=model)
    scfg = sampling.SamplingConfig(height=32, width=32, num_steps=2, scheduler="euler_ancestral", init_strength=0.5,
                                   reference_guidance="cfg")
    direct = sampling.generate(pipeline, sampling.tokenize(pipeline, ["a person"]),
                               uncond_ids=sampling.tokenize(pipeline, [""]),
                               key=jax.random.fold_in(jax.random.key(4), 0), cfg=scfg, references=refs,
                               identity_cfg=cfg)
    cli_image = np.asarray(Image.open(out / "00000.png")).astype(int)
    assert np.abs(cli_image - np.asarray(direct)[0].astype(int)).max() <= 1  # PNG round trip of uint8: exact
    # img2img really starts from the style image: the full schedule from pure noise gives another image
    full = sampling.generate(pipeline, sampling.tokenize(pipeline, ["a person"]),
                             uncond_ids=sampling.tokenize(pipeline, [""]),
                             key=jax.random.fold_in(jax.random.key(4), 0),
                             cfg=dataclasses.replace(scfg, init_strength=1.0), references=refs,
                             identity_cfg=dataclasses.replace(cfg, img2img=False))
    assert np.abs(np.asarray(full).astype(int) - np.asarray(direct).astype(int)).max() > 5


def test_identity_mask_flags(photos, tmp_path):  # noqa: F811
    cli = _load_cli()
    white = np.zeros((20, 40), np.uint8)
    white[:, :10] = 255  # the left quarter
    Image.fromarray(white).save(tmp_path / "left.png")
    masks = cli.read_identity_masks([tmp_path / "left.png"], 8, 16)
    expected = np.zeros((1, 8, 16), bool)
    expected[0, :, :4] = True  # nearest resize of the left quarter
    np.testing.assert_array_equal(masks, expected)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(SystemExit, match="empty.png: the mask is empty"):
        cli.read_identity_masks([tmp_path / "empty.png"], 8, 8)
    astro = str(photos / "astronaut.png")
    common = ["--prompt", "p", "--out", str(tmp_path / "o"), "--reference", astro, "--reference", f"1:{astro}"]
    with pytest.raises(SystemExit, match="--identity-mask: 1 masks for 2 people"):
        cli.check_reference_args(cli.parse_args(common + ["--identity-mask", str(tmp_path / "left.png")]))
    with pytest.raises(SystemExit, match="not both"):
        cli.check_reference_args(cli.parse_args(common + ["--identity-mask", str(tmp_path / "left.png")] * 2
                                                + ["--identity-box", "0,0,4,4"] * 2))


def test_several_style_towers_are_concatenated(tmp_path):
    """facestudio.style_encoder as a list (the paper concatenates ViT-L/14, RN101 and ViT-B/32): a ViT folder and an
    RN safetensors file, each fed at its own input size, their embeddings concatenated in order; checked against
    transformers' CLIPVisionModelWithProjection and the PyTorch ModifiedResNet reference of test_clip_resnet."""
    from safetensors.numpy import save_file

    from fusion_jax.models.clip_resnet import CLIPResNetConfig
    from tests.test_clip_resnet import openai_layout, reference
    from transformers import CLIPVisionModelWithProjection

    vit = _style_encoder_folder(tmp_path / "vit", 8)  # 32 px input
    rn_ref = reference(CLIPResNetConfig(layers=(1, 1, 1, 1), width=8, output_dim=16, head_width=64, image_size=64), 0)
    save_file(openai_layout(rn_ref), str(tmp_path / "rn.safetensors"))
    cfg = fs.FaceStudioConfig(num_tokens=2, style_dim=8 + 16, face_dim=6,
                              style_encoder=(str(vit), str(tmp_path / "rn.safetensors")))
    method = base.get("facestudio")
    model = method.prepare_model(method.attach(weights.load_pipeline(_tiny(tmp_path)).unet, cfg), cfg)
    assert fs.style_input_size(model.facestudio, cfg) == 32
    pixels = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(fs.style_embedding(model, jnp.asarray(pixels), 2))
    up = np.asarray(jax.image.resize(pixels, (2, 64, 64, 3), "bicubic", antialias=True))
    with torch.no_grad():
        vit_theirs = CLIPVisionModelWithProjection.from_pretrained(vit)(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
        rn_theirs = rn_ref(torch.from_numpy(up.transpose(0, 3, 1, 2).copy()))[0].numpy()
    # float32 through two small towers: ~1e-6 relative; the order and the per-tower resize are what is checked
    np.testing.assert_allclose(ours, np.concatenate([vit_theirs, rn_theirs], axis=-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"the towers give 8\+16 = 24-wide image_embeds, facestudio.style_dim is 8"):
        method.prepare_model(method.attach(weights.load_pipeline(_tiny(tmp_path)).unet, dataclasses.replace(
            cfg, style_dim=8)), dataclasses.replace(cfg, style_dim=8))
