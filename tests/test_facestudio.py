"""FaceStudio: the paper's equations against a NumPy re-statement, the properties they imply at the UNet and
attention level (exact where the math makes a branch drop out), the trainable presets, and bad input."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import weights
from fusion_jax.identity import base, facestudio as fs
from fusion_jax.identity.base import ReferenceRequest
from fusion_jax.identity.context import IdentityContext
from fusion_jax.models import attention as attention_lib
from fusion_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from parity_helpers import rel_l2

CONFIG = UNetConfig(
    sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None)
CFG = fs.FaceStudioConfig(num_tokens=3, style_dim=8, face_dim=6, style_dropout=0.0, face_dropout=0.0)


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    ref = TorchUNet.from_config(CONFIG.to_dict()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = nnx.eval_shape(lambda: UNet2DConditionModel(CONFIG, rngs=nnx.Rngs(0)))
    return weights.load_state_dict(model, {k: v.numpy() for k, v in ref.state_dict().items()}, source="test")


def tiny_style_encoder():
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16)
    return nnx.jit(lambda: CLIPVisionModelWithProjection(cfg, rngs=nnx.Rngs(3)))()


def perturb(module, seed):
    """Random (non-default) values for every parameter of `module`, in place."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = var.get_value().shape
        var.set_value(jnp.asarray(0.3 * rng.standard_normal(shape) + (1.0 if len(shape) == 1 else 0.0), jnp.float32))


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_hybrid_tokens_match_numpy_and_betas_are_linear():
    adapter = fs.FaceStudioAdapter(CFG, 32, rngs=nnx.Rngs(1))
    perturb(adapter, 2)
    rng = np.random.default_rng(0)
    style, text, faces = rand(rng, 2, 8), rand(rng, 2, 8), rand(rng, 2, 2, 3, 6)
    betas, alpha = (0.5, 0.3, 0.2), 0.3
    tokens, ids = fs.hybrid_tokens(adapter, style, text, faces, alpha, betas)
    w = np.asarray(adapter.fuse.kernel.get_value(), np.float64)
    b = np.asarray(adapter.fuse.bias.get_value(), np.float64)
    e_f = np.einsum("bkne,n->bke", faces.astype(np.float64), betas)
    lin = lambda c: np.concatenate([np.repeat(c[:, None], 2, 1), e_f], -1) @ w + b
    e_g = (alpha * lin(style) + (1 - alpha) * lin(text)).reshape(2, 2, 3, 32)
    mu, var = e_g.mean(-1, keepdims=True), e_g.var(-1, keepdims=True)
    scale = np.asarray(adapter.token_norm.scale.get_value())
    shift = np.asarray(adapter.token_norm.bias.get_value())
    expected = ((e_g - mu) / np.sqrt(var + 1e-5) * scale + shift).reshape(2, 6, 32)
    err = rel_l2(tokens, expected)
    print(f"hybrid tokens vs numpy rel_l2 {err:.1e}")
    assert err < 1e-5
    np.testing.assert_array_equal(np.asarray(ids), [[0, 0, 0, 1, 1, 1]] * 2)
    # e_f = sum_i beta_i e_f^i, and e_g is affine in e_f: blending faces = blending their hybrid embeddings
    np.testing.assert_allclose(np.asarray(fs.blend_faces(faces, betas)), e_f, rtol=1e-5, atol=1e-6)
    s, t = jnp.asarray(style), jnp.asarray(text)
    blended = fs.hybrid_embedding(adapter, s, t, fs.blend_faces(faces[:, 0], betas), alpha)
    per_face = sum(beta * fs.hybrid_embedding(adapter, s, t, jnp.asarray(faces[:, 0, i]), alpha)
                   for i, beta in enumerate(betas))
    err = rel_l2(blended, per_face)
    print(f"beta linearity rel_l2 {err:.1e}")
    assert err < 1e-6
    with pytest.raises(ValueError, match="facestudio.betas: 2 weights for 3 references"):
        fs.blend_faces(faces, (0.5, 0.5))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, sample, ehs, style, text, face, alpha):
    model = nnx.merge(graphdef, state)
    return model(sample, 500, ehs, identity=fs.identity_context(model, style, text, face, alpha))


def test_alpha_extremes_drop_a_branch_exactly():
    model = fs.attach_adapter(tiny_unet(), CFG, rngs=nnx.Rngs(4))
    perturb(model.facestudio, 5)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    sample, ehs, face = rand(rng, 1, 8, 8, 4), rand(rng, 1, 5, 32), rand(rng, 1, 6)
    s1, s2, t1, t2 = (rand(rng, 1, 8) for _ in range(4))
    run = lambda s, t, a: np.asarray(_forward(graphdef, state, sample, ehs, s, t, face, jnp.float32(a)))
    np.testing.assert_array_equal(run(s1, t1, 1.0), run(s1, t2, 1.0))  # alpha 1: text branch unused
    np.testing.assert_array_equal(run(s1, t1, 0.0), run(s2, t1, 0.0))  # alpha 0: style unused
    assert rel_l2(run(s1, t1, 0.5), run(s1, t2, 0.5)) > 1e-3  # both used in between
    assert rel_l2(run(s1, t1, 1.0), run(s2, t1, 1.0)) > 1e-3


@pytest.mark.parametrize("combine", ["joint", "decoupled"])
def test_query_in_person_a_region_ignores_person_b(combine):
    """Layer level: one cross-attention with the slot, two people, A's region the left half of a 4x4 level."""
    attn = attention_lib.Attention(32, heads=2, dim_head=16, cross_attention_dim=32, rngs=nnx.Rngs(6))
    attn.to_k_ref = nnx.Linear(32, 32, use_bias=False, rngs=nnx.Rngs(7))
    attn.to_v_ref = nnx.Linear(32, 32, use_bias=False, rngs=nnx.Rngs(8))
    attn.identity_combine = combine
    adapter = fs.FaceStudioAdapter(CFG, 32, rngs=nnx.Rngs(9))
    perturb(adapter, 10)
    rng = np.random.default_rng(2)
    x, ehs, style, text = rand(rng, 1, 16, 32), rand(rng, 1, 5, 32), rand(rng, 1, 8), rand(rng, 1, 8)
    faces = rand(rng, 1, 2, 1, 6)
    other = faces.copy()
    other[:, 1] = rand(rng, 1, 1, 6)  # person B's embedding changes
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    masks = {"4x4": jnp.asarray(np.stack([left.reshape(-1), ~left.reshape(-1)])[None])}

    def out(face):
        tokens, ids = fs.hybrid_tokens(adapter, style, text, face, 0.6)
        ctx = IdentityContext(reference_tokens={"l": tokens}, token_identity={"l": ids},
                              strength=jnp.ones((1, 2)), region_masks=masks)
        return np.asarray(attn(jnp.asarray(x), jnp.asarray(ehs), identity=ctx, layer_name="l", spatial_shape=(4, 4)))

    a, b = out(faces), out(other)
    in_a = left.reshape(-1)
    np.testing.assert_array_equal(a[:, in_a], b[:, in_a])
    assert rel_l2(a[:, ~in_a], b[:, ~in_a]) > 1e-3


def test_reconstruction_loss_trains_only_the_preset():
    from fusion_jax.schedulers import NoiseSchedule

    method = base.get("facestudio")
    model = fs.attach_adapter(tiny_unet(seed=1), CFG, style_encoder=tiny_style_encoder())
    params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    chosen = {}
    for preset in method.trainable_presets:
        flt = method.trainable_filter(preset, CFG)
        chosen[preset] = {".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                          if flt(p, v)}
    assert chosen["adapter"] == {p for p in params if p.startswith("facestudio.fuse.")
                                 or p.startswith("facestudio.token_norm.") or "_ref." in p}
    assert chosen["adapter+unet"] == {p for p in params if "style_encoder" not in p}  # CLIP stays frozen
    rng = np.random.default_rng(3)
    batch = {"latents": rand(rng, 2, 8, 8, 4), "text_emb": rand(rng, 2, 5, 32), "empty_text_emb": rand(rng, 1, 5, 32),
             "face_embedding": rand(rng, 2, 6), "style_image": rand(rng, 2, 32, 32, 3)}
    graphdef, trainable, rest = nnx.split(model, method.trainable_filter("adapter", CFG), ...)

    @jax.jit
    def grads(trainable, rest):
        return jax.grad(lambda tr: method.loss(nnx.merge(graphdef, tr, rest), batch, jax.random.key(0),
                                               NoiseSchedule(), CFG)[0])(trainable)

    g = grads(trainable, rest)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(g)}
    assert set(flat) == chosen["adapter"]
    assert float(jnp.abs(flat["facestudio.fuse.kernel"].get_value()).sum()) > 0
    with pytest.raises(ValueError, match="'style_embedding', 'style_image' or 'masked_target'"):
        method.loss(model, {k: v for k, v in batch.items() if k != "style_image"}, jax.random.key(0),
                    NoiseSchedule(), CFG)
    # the image stream's face-masked target: encoded in the step = the same pixels given as 'style_image'
    masked = rng.uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
    no_style = {k: v for k, v in batch.items() if k != "style_image"}
    from_stream = method.loss(model, {**no_style, "masked_target": masked}, jax.random.key(0), NoiseSchedule(), CFG)
    pixels = (jax.image.resize((masked + 1) / 2, (2, 32, 32, 3), "bicubic", antialias=True) - fs.CLIP_MEAN) / fs.CLIP_STD
    direct = method.loss(model, {**no_style, "style_image": pixels}, jax.random.key(0), NoiseSchedule(), CFG)
    np.testing.assert_allclose(float(from_stream[0]), float(direct[0]), rtol=1e-6)


def test_method_flags_bad_input_and_export(tmp_path):
    method = base.get("facestudio")
    parser = argparse.ArgumentParser()
    method.add_arguments(parser)
    base.get("ip_adapter_faceid").add_arguments(parser)  # --face-embeddings is declared once, by that method
    style = tmp_path / "style.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(style)
    faces = tmp_path / "faces.npy"
    np.save(faces, np.random.default_rng(4).standard_normal((2, 6)).astype(np.float32))
    cfg, _ = method.apply_arguments(parser.parse_args(["--style-image", str(style), "--alpha", "0.25", "--beta",
                                                       "0.7,0.3", "--face-embeddings", str(faces)]), CFG, None)
    assert (cfg.alpha, cfg.betas, cfg.style_image, cfg.face_embeddings) == (0.25, (0.7, 0.3), str(style), str(faces))
    assert fs.load_style_image(style, 16).shape == (16, 16, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"--style-image .*broken\.png: cannot load"):
        method.apply_arguments(parser.parse_args(["--style-image", str(broken)]), CFG, None)
    with pytest.raises(ValueError, match=r"--style-image .*absent\.png: no such file"):
        method.apply_arguments(parser.parse_args(["--style-image", str(tmp_path / "absent.png")]), CFG, None)
    with pytest.raises(ValueError, match="--beta"):
        method.apply_arguments(parser.parse_args(["--beta", "0.5,x"]), CFG, None)
    with pytest.raises(ValueError, match="facestudio.alpha"):
        dataclasses.replace(CFG, alpha=1.5)
    # sampling inputs: betas must match the references per person
    model = fs.attach_adapter(tiny_unet(seed=2), CFG)
    request = ReferenceRequest(references=np.zeros((1, 1, 2, 8, 8, 3), np.float32))
    kw = dict(batch=1, image_size=(64, 64), latent_size=(8, 8))
    inputs = method.sampling_inputs(model, dataclasses.replace(cfg, style_image=None), request, **kw)
    assert inputs["face_embeds"].shape == (1, 1, 2, 6)
    with pytest.raises(ValueError, match="--beta: 3 weights for 2 references"):
        method.sampling_inputs(model, dataclasses.replace(cfg, betas=(0.2, 0.3, 0.5)), request, **kw)
    # export -> load_tensors round trip
    perturb(model.facestudio, 11)
    tensors = method.export_tensors(model, CFG)
    assert tensors and all("fuse" in k or "token_norm" in k or "_ref." in k for k in tensors)
    fresh = method.load_tensors(tiny_unet(seed=2), CFG, tensors, "export")
    for k, v in method.export_tensors(fresh, CFG).items():
        np.testing.assert_array_equal(v, tensors[k])
    with pytest.raises(ValueError, match="export2: FaceStudio tensors missing"):
        method.load_tensors(tiny_unet(seed=2), CFG, {k: v for k, v in tensors.items() if "fuse" not in k}, "export2")


def test_inside_the_jitted_sampler(tmp_path):
    """Through `sampling.generate`: a style image (loaded from a file, encoded by the adapter's tiny CLIP tower
    inside the jitted function), the 'direct' text branch from the prompt; strength 0 reproduces text-to-image
    (float32 reassociation of differently batched UNet calls, as in test_fusion_sampling) and strength 1 changes
    the image. (Each style file is part of the method config, hence of the compile key: one file here.)"""
    from PIL import Image

    from fusion_jax import sampling
    from fusion_jax.tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "pipe", seed=3)
    pipe = weights.load_pipeline(tmp_path / "pipe")
    cfg_fs = fs.FaceStudioConfig(num_tokens=2, style_dim=32, face_dim=6, alpha=1.0, style_size=32)
    tower = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, image_size=32, patch_size=16)
    fs.attach_adapter(pipe.unet, cfg_fs, style_encoder=nnx.jit(lambda: CLIPVisionModelWithProjection(
        tower, rngs=nnx.Rngs(3)))(), rngs=nnx.Rngs(4))
    perturb(pipe.unet.facestudio.fuse, 5)
    rng = np.random.default_rng(6)
    style_a = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(style_a)
    faces = tmp_path / "faces.npy"
    np.save(faces, rng.standard_normal((2, 6)).astype(np.float32))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = sampling.SamplingConfig(height=size, width=size, output="float", num_steps=2, guidance_scale=3.0,
                                  reference_guidance="cfg")
    ids = sampling.tokenize(pipe, ["a person"])
    noise = rng.standard_normal(sampling.latent_shape(pipe, cfg, 1)).astype(np.float32)
    refs = np.zeros((1, 2, size, size, 3), np.float32)
    cfg_fs = dataclasses.replace(cfg_fs, face_embeddings=str(faces), betas=(0.6, 0.4), style_image=str(style_a))
    run = lambda icfg, **kw: np.asarray(sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, noise=noise,
                                                          references=refs, identity_cfg=icfg, **kw))
    text_only = np.asarray(sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, noise=noise))
    off = run(cfg_fs, strength=0.0)
    on_a = run(cfg_fs, strength=1.0)
    print(f"strength 0 vs text-to-image rel_l2 {rel_l2(off, text_only):.1e}")
    assert rel_l2(off, text_only) < 1e-5
    assert np.isfinite(on_a).all() and rel_l2(on_a, text_only) > 1e-3
    # the same style image given per row with the request (ReferenceRequest.style_images, [-1, 1] at the tower's
    # input size) is the same input as the file: same image (the file is decoded and cropped the same way)
    from fusion_jax.data.images import read_centre_crop

    per_row = read_centre_crop(style_a, 32, 32, "style")[None] * 2.0 - 1.0
    on_rows = run(dataclasses.replace(cfg_fs, style_image=None), strength=1.0, style_images=per_row)
    print(f"per-row style vs file rel_l2 {rel_l2(on_rows, on_a):.1e}")
    assert rel_l2(on_rows, on_a) < 1e-5
    with pytest.raises(ValueError, match=r"style_images must be \(B=1, H, W, 3\)"):
        run(cfg_fs, style_images=per_row[0])
    with pytest.raises(ValueError, match="given without references"):
        sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, style_images=per_row)
    from fusion_jax.identity.fusion import FusionConfig

    with pytest.raises(ValueError, match="style_images: Face Fusion takes no style image"):
        run(FusionConfig(), style_images=per_row)


def test_prior_text_branch(tmp_path):
    """text_branch 'prior': Prior(CLIP_T(text)) inside a jitted function equals `sample_prior` called directly on
    the text encoder's outputs (mask up to the first EOS, empty-prompt negative, same key); that embedding is what
    the hybrid's text branch reads; a prior of the wrong width is an error naming the folder."""
    from diffusers import PriorTransformer as TorchPrior

    from fusion_jax.models.clip import CLIPTextConfig, CLIPTextModelWithProjection
    from fusion_jax.models.prior import PriorConfig, PriorTransformer, sample_prior
    from fusion_jax.schedulers.unclip import UnCLIPSampler

    cfg = dataclasses.replace(CFG, style_dim=16, text_branch="prior", prior_steps=2, prior_guidance=3.0)
    text_cfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, projection_dim=16,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=6, eos_token_id=2)
    text_encoder = nnx.jit(lambda: CLIPTextModelWithProjection(text_cfg, rngs=nnx.Rngs(1)))()
    prior = nnx.jit(lambda: PriorTransformer(PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                                         embedding_dim=16, num_embeddings=6), rngs=nnx.Rngs(2)))()
    perturb(prior, 3)
    sampler = UnCLIPSampler.from_diffusers_config({"_class_name": "UnCLIPScheduler"}, cfg.prior_steps)
    model = fs.attach_adapter(tiny_unet(seed=4), cfg)
    fs.attach_prior(model, prior, text_encoder, sampler)
    ids = jnp.asarray([[0, 5, 7, 49, 49, 49], [0, 3, 49, 49, 49, 49]], jnp.int32)  # 49: EOS (highest id) and pad
    empty = jnp.asarray([[0, 49, 49, 49, 49, 49]] * 2, jnp.int32)
    key = jax.random.key(5)
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda st: fs.prior_text_embedding(nnx.merge(graphdef, st), ids, empty, key, cfg))(state)
    te, te_neg = text_encoder(ids), text_encoder(empty[:1])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    neg_mask = jnp.asarray([[1, 1, 0, 0, 0, 0]], bool)
    expected = sample_prior(prior, sampler, te.text_embeds, te.last_hidden_state, jnp.asarray(mask),
                            negative=(te_neg.text_embeds, te_neg.last_hidden_state, neg_mask), guidance_scale=3.0,
                            key=key)
    assert ours.shape == (2, 16)
    err = rel_l2(ours, expected)
    print(f"prior branch vs sample_prior rel_l2 {err:.1e}")
    assert err < 1e-5
    with pytest.raises(ValueError, match="outputs 12-wide CLIP image embeddings, facestudio.style_dim is 16"):
        small = nnx.eval_shape(lambda: PriorTransformer(PriorConfig(num_attention_heads=2, attention_head_dim=8,
                                                                    num_layers=1, embedding_dim=12, num_embeddings=6),
                                                        rngs=nnx.Rngs(0)))
        fs.attach_prior(model, small, text_encoder, sampler)
    TorchPrior(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=12,
               num_embeddings=6).save_pretrained(tmp_path / "karlo" / "prior")
    with pytest.raises(ValueError, match=r"prior .*karlo.* width"):
        fs.load_prior_branch(model, tmp_path / "karlo", cfg)


def test_outside_random_assigns_one_person():
    """`outside: random`: positions in no region join exactly one person per image, the same at every level;
    positions inside a region keep their person."""
    rng = np.random.default_rng(7)
    masks = {"4x4": jnp.asarray(rng.random((3, 2, 16)) < 0.3), "2x2": jnp.asarray(rng.random((3, 2, 4)) < 0.3)}
    filled = fs.fill_outside(masks, jax.random.key(1))
    picks = set()
    for level, m in masks.items():
        m, f = np.asarray(m), np.asarray(filled[level])
        assert (f | ~m).all()  # nothing removed
        outside = ~m.any(axis=1)  # (B, P)
        added = f & ~m
        assert (added.any(axis=1) == outside).all() and (added.sum(axis=1) <= 1).all()
        for row in range(3):
            if outside[row].any():
                picks.add((row, int(np.argmax(added[row].any(axis=1)))))
    assert len({row for row, _ in picks}) == len(picks)  # one person per image across levels
    with pytest.raises(ValueError, match="facestudio.outside"):
        fs.FaceStudioConfig(outside="nobody")
