"""FlashFace (fusion_jax.identity.flashface) against an independent PyTorch re-statement of the released computation.

`flashface_reference.ReleasedFlashFace` is the released model's module tree (LDM-style names, `ref_*` copies, `ori_*`
aliases, `self_attn_first`) and forward (reference pass with e[:1], norm1 recorded in the middle block and the
ReferenceNet decoder, lambda-weighted reference self-attention, mask channel), built on tiny random weights
(every parameter perturbed, so zero-initialised paths are exercised). Its state dict, in the released layout with
its aliases, is what `load_flashface` reads; forwards and one guided step are compared with a relative L2 error
bound of 1e-4 (float32; the two sides differ in summation order and the attention kernels only).
Reference latents are 7x7 (7 -> 4 -> back to 7: the odd-size path of the 28x28 released references).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flashface_reference import ReleasedFlashFace, released_guidance
from fusion_jax import weights
from fusion_jax.identity import flashface
from fusion_jax.identity.base import ReferenceRequest
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from parity_helpers import rel_l2

TOL = 1e-4
# The released UNet with dim 32, dim_mult (1, 2), 2 heads, 1 res block per level, attention at both levels,
# context 16, as a diffusers config.json.
TINY_CONFIG = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32, "cross_attention_dim": 16,
    "attention_head_dim": 2, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "in_channels": 4, "out_channels": 4,
}
B, H, R, RH, L = 2, 8, 3, 7, 5  # samples, latent side, references, reference latent side, text tokens


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(torch model, its state dict as numpy, the safetensors file of it)."""
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    model = ReleasedFlashFace().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("flashface") / "flashface.safetensors"
    save_file(tensors, str(path))
    return model, tensors, path


@pytest.fixture(scope="module")
def ours(released):
    return flashface.load_flashface(released[2], unet_config=TINY_CONFIG)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, H, H, 4)).astype(np.float32)
    c = rng.standard_normal((B, L, 16)).astype(np.float32)
    nc = np.repeat(rng.standard_normal((1, L, 16)).astype(np.float32), B, 0)
    refs = rng.standard_normal((R, RH, RH, 4)).astype(np.float32)
    ref_ctx = np.repeat(nc[:1], R, 0)
    mask = np.zeros((B, H, H, 1), np.float32)
    mask[:, 1:6, 2:7] = 1.0  # the same face square for both samples (the released code pairs masks that way)
    return dict(x=x, c=c, nc=nc, refs=refs, ref_ctx=ref_ctx, mask=mask)


def _jit_model_fn(model, fn):
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: compiled(state, *args)


def test_loader_fills_every_parameter_from_the_released_layout(released, ours):
    model, tensors, _ = released
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"time_embedding", "encoder", "middle", "decoder", "head", "ref_encoder", "ref_decoder",
                        "ref_middle", "ori_encoder", "ori_decoder", "ori_middle"}
    # every parameter of ours is concrete (load_flashface refuses leftovers) and comes from the right copy
    sd = weights.state_dict(ours)
    assert len(sd) == len([k for k in tensors if k.split(".")[0] in
                           ("time_embedding", "head", "ori_encoder", "ori_middle", "ori_decoder", "ref_encoder",
                            "ref_decoder")])
    np.testing.assert_array_equal(sd["unet.conv_in.weight"], tensors["ori_encoder.0.weight"])
    assert sd["unet.conv_in.weight"].shape[1] == 5 and sd["reference_net.conv_in.weight"].shape[1] == 4
    np.testing.assert_array_equal(sd["reference_net.conv_in.weight"], tensors["ref_encoder.0.weight"])
    np.testing.assert_array_equal(
        sd["unet.mid_block.attentions.0.transformer_blocks.0.attn_ref.to_out.0.weight"],
        tensors["ori_middle.1.blocks.0.self_attn.self_attn_first.o.weight"])
    np.testing.assert_array_equal(sd["reference_net.up_blocks.0.upsamplers.0.conv.weight"],
                                  tensors["ref_decoder.1.2.1.weight"])
    assert ours.unet.config.in_channels == 5 and ours.config.in_channels == 4


def _forward_check(model, ours, inputs, lam, t):
    n = lam.shape[0] // B
    x = np.concatenate([inputs["x"]] * n)
    ctx = np.concatenate([inputs["c"], inputs["nc"]] if n == 2 else [inputs["c"], inputs["c"], inputs["nc"]])
    mask = np.concatenate([inputs["mask"]] * n)
    with torch.no_grad():
        expected = _nhwc(model(_nchw(x), torch.full((n * B,), t), torch.from_numpy(ctx), _nchw(inputs["refs"]),
                               torch.from_numpy(inputs["ref_ctx"]), torch.from_numpy(mask[..., 0]),
                               torch.from_numpy(lam)))
    fn = _jit_model_fn(ours, lambda m, *a: m(*a))
    got = fn(np.concatenate([x, mask], -1), np.full((n * B,), t, np.float32), ctx, inputs["refs"],
             inputs["ref_ctx"], lam)
    return rel_l2(got, expected), model.features()


@pytest.mark.parametrize("branches", [2, 3])
def test_forward_matches_the_released_computation(released, ours, inputs, branches):
    """2-way: lambda 0.85 on every row; 3-way: [1.2, 0, 0] per branch; and the recorded reference features."""
    model = released[0]
    lam = (np.full((2 * B,), 0.85, np.float32) if branches == 2
           else np.repeat(np.array([1.2, 0.0, 0.0], np.float32), B))
    err, torch_feats = _forward_check(model, ours, inputs, lam, 420.0)
    print(f"forward {branches}-way rel_l2 {err:.2e}")
    assert err < TOL, err
    feats = _jit_model_fn(ours, lambda m, r, t, c: m.reference_features(r, t, c))(
        inputs["refs"], np.float32(420.0), inputs["ref_ctx"])
    names = {"middle.1.blocks.0": "mid_block.attentions.0.transformer_blocks.0",
             "decoder.0.1.blocks.0": "up_blocks.0.attentions.0.transformer_blocks.0",
             "decoder.1.1.blocks.0": "up_blocks.0.attentions.1.transformer_blocks.0",
             "decoder.2.1.blocks.0": "up_blocks.1.attentions.0.transformer_blocks.0",
             "decoder.3.1.blocks.0": "up_blocks.1.attentions.1.transformer_blocks.0"}
    assert sorted(feats) == sorted(names.values()) == sorted(ours.layers)
    for theirs, mine in names.items():
        assert feats[mine].shape == tuple(torch_feats[theirs].shape)
        feat_err = rel_l2(feats[mine], torch_feats[theirs].numpy())
        print(f"features {mine} rel_l2 {feat_err:.2e}")
        assert feat_err < TOL


@pytest.mark.parametrize("t", [900, 500], ids=["above_gate", "below_gate"])
def test_guided_noise_matches_the_released_sampler_step(released, ours, inputs, t):
    model = released[0]
    g = flashface.preset("code")["guidance"]
    assert (g.text, g.reference, g.gate, g.feature_strength, g.feature_strength_before_gate, g.rescale) == (
        7.5, 3.2, 750, 1.2, 0.85, 0.5)
    with torch.no_grad():
        expected = _nhwc(released_guidance(
            model, _nchw(inputs["x"]), torch.full((B,), float(t)), torch.from_numpy(inputs["c"]),
            torch.from_numpy(inputs["nc"]), _nchw(inputs["refs"]), torch.from_numpy(inputs["ref_ctx"]),
            torch.from_numpy(inputs["mask"][..., 0]), g.text, g.reference, g.gate, g.feature_strength,
            g.feature_strength_before_gate, g.rescale))
    fn = _jit_model_fn(ours, lambda m, *a: flashface.guided_noise(m, *a, guidance=g))
    got = fn(inputs["x"], np.full((B,), t, np.int32), inputs["c"], inputs["nc"], inputs["refs"], inputs["ref_ctx"],
             inputs["mask"])
    print(f"guided_noise t={t} rel_l2 {rel_l2(got, expected):.2e}")
    assert rel_l2(got, expected) < TOL


def test_result_does_not_depend_on_reference_order(ours, inputs):
    fn = _jit_model_fn(ours, lambda m, *a: m(*a))
    x5 = np.concatenate([inputs["x"], inputs["mask"]], -1)
    t = np.full((B,), 300.0, np.float32)
    a = fn(x5, t, inputs["c"], inputs["refs"], inputs["ref_ctx"], np.float32(1.2))
    perm = [2, 0, 1]
    b = fn(x5, t, inputs["c"], inputs["refs"][perm], inputs["ref_ctx"][perm], np.float32(1.2))
    print(f"reference order rel_l2 {rel_l2(b, a):.2e}")
    assert rel_l2(b, a) < 1e-6  # same tokens in another order: softmax sums reordered, nothing else


def test_lambda_zero_zero_mask_and_zero_sa_out_is_the_base_unet():
    """init 'zero' (SA' output projection zero), mask 0, lambda 0: the base UNet's output; and references reach
    only the mid block and the decoder (the down blocks' outputs are bit-identical with and without them)."""
    config = UNetConfig.from_dict(TINY_CONFIG)
    base = UNet2DConditionModel(config, rngs=nnx.Rngs(3))
    base_state = nnx.state(base)
    model = flashface.attach_flashface(nnx.clone(base), flashface.FlashFaceConfig(init="zero"))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, H, H, 4)).astype(np.float32)
    c = rng.standard_normal((B, L, 16)).astype(np.float32)
    refs = rng.standard_normal((R, RH, RH, 4)).astype(np.float32)
    rc = rng.standard_normal((R, L, 16)).astype(np.float32)
    base_out = _jit_model_fn(base, lambda m, *a: m(*a))(x, np.float32(250.0), c)
    x5 = np.concatenate([x, np.zeros((B, H, H, 1), np.float32)], -1)
    ff_out = _jit_model_fn(model, lambda m, *a: m(*a))(x5, np.full((B,), 250.0, np.float32), c, refs, rc,
                                                       np.float32(0.0))
    # 5- vs 4-channel conv_in with a zero 5th channel: the same sums, XLA may order them differently
    print(f"lambda 0 vs base rel_l2 {rel_l2(ff_out, base_out):.2e}, max abs {np.abs(ff_out - base_out).max():.2e}")
    assert rel_l2(ff_out, base_out) < 1e-6
    assert jax.tree.leaves(nnx.state(base)) and jax.tree.all(jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)), base_state, nnx.state(base)))  # the base model is untouched

    def down_and_mid(m, x5, refs, rc, lam):
        feats = m.reference_features(refs, 250.0, rc)
        from fusion_jax.identity.context import IdentityContext
        tokens = {k: v.reshape(1, -1, v.shape[-1]) for k, v in feats.items()}
        ctx = IdentityContext.self_attention_only(tokens, jnp.full((B,), lam))
        unet = m.unet
        emb = unet._time_embedding(250.0, B, None)
        outs = []
        for identity in (ctx, None):
            h = unet.conv_in(x5)
            for block in unet.down_blocks:
                h, _ = block(h, emb, c, identity)
            outs.append(h)
            outs.append(unet.mid_block(h, emb, c, identity))
        return outs

    trained = flashface.attach_flashface(UNet2DConditionModel(config, rngs=nnx.Rngs(4)), flashface.FlashFaceConfig())
    d_ref, m_ref, d_none, m_none = _jit_model_fn(trained, down_and_mid)(x5, refs, rc, np.float32(1.0))
    np.testing.assert_array_equal(np.asarray(d_ref), np.asarray(d_none))
    assert rel_l2(m_ref, m_none) > 1e-3


def test_loader_rejects_missing_and_misshaped_keys_by_name(released, tmp_path):
    from safetensors.numpy import save_file

    tensors = dict(released[1])
    key = "ori_decoder.2.1.blocks.0.self_attn.self_attn_first.q.weight"
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(weights.CheckpointMismatchError, match=r"missing.*" + key.replace(".", r"\.")):
        flashface.load_flashface(tmp_path / "missing.safetensors", unet_config=TINY_CONFIG)
    bad_key = "ref_encoder.1.0.layer1.2.weight"
    bad = dict(tensors)
    bad[bad_key] = np.zeros((32, 32, 3, 1), np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.CheckpointMismatchError, match=bad_key.replace(".", r"\.") + r": checkpoint"):
        flashface.load_flashface(tmp_path / "bad.safetensors", unet_config=TINY_CONFIG)
    extra = dict(tensors, **{"ori_decoder.9.0.layer1.0.weight": np.zeros(3, np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(weights.CheckpointMismatchError, match=r"unexpected.*ori_decoder\.9\.0"):
        flashface.load_flashface(tmp_path / "extra.safetensors", unet_config=TINY_CONFIG)


def test_pickle_needs_opt_in_and_loads_with_it(released, ours, tmp_path):
    path = tmp_path / "flashface.ckpt"
    torch.save(released[0].state_dict(), path)
    with pytest.raises(weights.CheckpointError, match=r"refusing to unpickle .*flashface\.ckpt"):
        flashface.load_flashface(path, unet_config=TINY_CONFIG)
    loaded = flashface.load_flashface(path, unet_config=TINY_CONFIG, allow_pickle=True)
    a, b = weights.state_dict(loaded), weights.state_dict(ours)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_convert_writes_an_export_that_loads_back(released, ours, tmp_path):
    import json

    cfg_file = tmp_path / "unet_config.json"
    cfg_file.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "fusion_jax.convert", "flashface", str(released[2]), str(out),
                           "--unet-config", str(cfg_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "unet" / "config.json").is_file() and (out / "identity" / "flashface.safetensors").is_file()
    meta = json.loads((out / "identity" / "identity_config.json").read_text())
    assert meta["method"] == "flashface"
    loaded = flashface.load_flashface(out)
    a, b = weights.state_dict(loaded), weights.state_dict(ours)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert loaded.unet.config == ours.unet.config


def _released_mask(box, size):
    """The demo's mask (its formula, including max(x2 - y1, y2 - y1)) for a normalised box, image size x size."""
    x1, y1, x2, y2 = (int(v * size) for v in box)
    side = max(x2 - y1, y2 - y1)
    m = torch.zeros((size, size))
    m[y1:y1 + side, x1:x1 + side] = 1
    return m[::8, ::8].numpy()


@pytest.mark.parametrize("box", [(0.3, 0.1, 0.6, 0.4), (0.1, 0.5, 0.4, 0.9), (0.0, 0.0, 0.0, 0.0)])
def test_face_mask_is_the_demos(box):
    size = 96
    pixel = flashface.face_box_pixels(",".join(map(str, box)), size, size)
    got = flashface.face_mask(pixel[None], (size, size), (size // 8, size // 8))
    np.testing.assert_array_equal(got[0, :, :, 0], _released_mask(box, size))
    square = flashface.face_mask(pixel[None], (size, size), (size // 8, size // 8), mask_side="max_wh")
    x1, y1, x2, y2 = pixel.astype(int)
    side = max(x2 - x1, y2 - y1)
    expected = np.zeros((size, size), np.float32)
    if side:
        expected[y1:y1 + side, x1:x1 + side] = 1
    np.testing.assert_array_equal(square[0, :, :, 0], expected[::8, ::8])


@pytest.mark.parametrize("value", ["0.1,0.2,1.3,0.5", "0.5,0.2,0.1,0.4", "-0.1,0,0.5,0.5", "0.1,0.2,0.3", "a,b,c,d"])
def test_face_box_outside_unit_square_names_the_flag(value):
    with pytest.raises(ValueError, match="--face-box"):
        flashface.normalized_box(value)
    args = type("Args", (), {"face_box": value, "preset": None, "feature_strength": None,
                             "feature_strength_before_gate": None})()
    with pytest.raises(ValueError, match="--face-box"):
        flashface.FlashFace().apply_arguments(args, flashface.FlashFaceConfig(), None)


def test_presets_and_config_errors_name_the_field():
    from fusion_jax.sampling import SamplingConfig

    args = type("Args", (), {"face_box": None, "preset": "paper", "feature_strength": 0.7,
                             "feature_strength_before_gate": None})()
    cfg, scfg = flashface.FlashFace().apply_arguments(args, flashface.FlashFaceConfig(), SamplingConfig())
    assert cfg.feature_strength == 0.7 and cfg.feature_strength_before_gate == 0.85
    assert (scfg.reference_guidance_scale, scfg.reference_guidance_max_timestep, scfg.num_steps) == (2.0, None, 50)
    with pytest.raises(ValueError, match="--preset"):
        flashface.preset("fast")
    args.face_box, args.preset, args.feature_strength = "0.25,0.125,0.5,0.5", None, None
    cfg, _ = flashface.FlashFace().apply_arguments(args, flashface.FlashFaceConfig(), SamplingConfig())
    assert cfg.face_box == (0.25, 0.125, 0.5, 0.5) and cfg.strength == cfg.feature_strength == 1.2
    out = flashface.FlashFace().sampling_inputs(None, cfg, ReferenceRequest(np.zeros((1, 1, 4, 4, 3))), batch=1,
                                                image_size=(64, 64), latent_size=(8, 8))
    np.testing.assert_array_equal(out["face_mask"], flashface.face_mask(np.array([[16, 8, 32, 32]]), (64, 64), (8, 8)))
    for field, value in (("reference_timestep", "never"), ("mask_side", "round"), ("text_dropout", 1.5),
                         ("num_references", 0), ("feature_strength", float("nan")), ("face_box", (0.5, 0, 0.2, 1))):
        with pytest.raises(ValueError, match=f"flashface.{field}"):
            flashface.FlashFaceConfig(**{field: value})


def test_reference_photos_need_exactly_one_face(tmp_path):
    import skimage.data
    from PIL import Image

    from fusion_jax import references as refs_lib
    from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig

    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(tmp_path / "one.png")
    Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)).save(tmp_path / "two.png")
    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(tmp_path / "none.png")
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
    crops = flashface.reference_crops([tmp_path / "one.png"], analyzer, size=32)
    assert crops.shape == (1, 32, 32, 3) and -1 <= crops.min() < crops.max() <= 1
    with pytest.raises(refs_lib.ReferenceError, match=r"--reference .*two\.png: found 2 faces"):
        flashface.reference_crops([tmp_path / "one.png", tmp_path / "two.png"], analyzer, size=32)
    with pytest.raises(refs_lib.ReferenceError, match=r"--reference .*none\.png: found no face"):
        flashface.reference_crops([tmp_path / "none.png"], analyzer, size=32)


def test_sampling_inputs_pad_references_and_build_the_mask():
    method = flashface.FlashFace()
    refs = np.stack([np.full((2, 4, 4, 3), v, np.float32) for v in (0.1, 0.2)])  # (B=2, N=2, ...)
    valid = np.array([[True, True], [True, False]])
    boxes = np.array([[[16, 8, 32, 24]], [[0, 0, 0, 0]]], np.float64)
    out = method.sampling_inputs(None, flashface.FlashFaceConfig(), ReferenceRequest(refs, valid, None, boxes),
                                 batch=2, image_size=(64, 64), latent_size=(8, 8))
    assert out["references"].shape == (2, 1, 4, 4, 4, 3)
    assert [float(r.mean()) for r in out["references"][1, 0]] == pytest.approx([0.2] * 4)
    np.testing.assert_array_equal(out["references"][0, 0, 2], refs[0, 0])  # cycled: 0, 1, 0, 1
    assert out["face_mask"].shape == (2, 8, 8, 1) and out["face_mask"][1].sum() == 0
    side = max(32 - 8, 24 - 8)  # the demo's max(x2 - y1, y2 - y1)
    expected = np.zeros((64, 64))
    expected[8:8 + side, 16:16 + side] = 1
    np.testing.assert_array_equal(out["face_mask"][0, :, :, 0], expected[::8, ::8])
    np.testing.assert_allclose(out["feature_strength"], [1.2, 1.2])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        method.sampling_inputs(None, flashface.FlashFaceConfig(),
                               ReferenceRequest(refs, None, None, np.array([[[0, 0, 80, 10]]] * 2, np.float64)),
                               batch=2, image_size=(64, 64), latent_size=(8, 8))
    with pytest.raises(ValueError, match="at most 4"):
        method.sampling_inputs(None, flashface.FlashFaceConfig(), ReferenceRequest(np.zeros((1, 5, 4, 4, 3))),
                               batch=1, image_size=(64, 64), latent_size=(8, 8))


@pytest.mark.parametrize("channels", [4, 12], ids=["sd_latents", "folded_pixels"])
def test_loss_trains_reference_modules_and_export_round_trip(channels):
    """On SD's 4 latent channels and on the miniature's 12 (2x2-folded pixels): the main UNet gets one more input
    channel (the mask), the ReferenceNet keeps the base's."""
    from fusion_jax.schedulers import NoiseSchedule

    config = UNetConfig.from_dict({**TINY_CONFIG, "in_channels": channels, "out_channels": channels})
    method = flashface.FlashFace()
    cfg = flashface.FlashFaceConfig(reference_dropout=0.5)
    model = method.attach(UNet2DConditionModel(config, rngs=nnx.Rngs(0)), cfg)
    assert method.base_unet(model) is model.unet
    assert model.unet.config.in_channels == channels + 1 and model.unet.config.out_channels == channels
    assert model.reference_net.config.in_channels == channels
    rng = np.random.default_rng(2)
    batch = {"latents": rng.standard_normal((2, 8, 8, channels)).astype(np.float32),
             "text_emb": rng.standard_normal((2, L, 16)).astype(np.float32),
             "empty_text_emb": rng.standard_normal((1, L, 16)).astype(np.float32),
             "reference_latents": rng.standard_normal((2, 2, RH, RH, channels)).astype(np.float32),
             "face_mask": np.ones((2, 64, 64, 1), np.float32)}
    keep = method.trainable_filter("reference", cfg)
    params = nnx.state(model, nnx.Param)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
    selected = {k for k, v in flat.items() if keep(tuple(k.split(".")), v)}
    assert selected and all(k.startswith(("reference_net.", "unet.conv_in.")) or ".attn_ref." in k for k in selected)
    assert any(k.startswith("reference_net.") for k in selected) and any(".attn_ref." in k for k in selected)
    graphdef, state = nnx.split(model)
    loss_fn = jax.jit(lambda state, key: method.loss(nnx.merge(graphdef, state), batch, key, NoiseSchedule(), cfg)[0])
    loss = loss_fn(state, jax.random.key(0))
    assert np.isfinite(float(loss))
    # the ReferenceNet and SA' are in the loss (a forward-only check: changing either changes it)
    for part in ("reference_net", "attn_ref"):
        bumped = jax.tree_util.tree_map_with_path(
            lambda path, v: v + 0.05 if part in jax.tree_util.keystr(path) else v, state)
        assert abs(float(loss_fn(bumped, jax.random.key(0))) - float(loss)) > 1e-6, part

    tensors = method.export_tensors(model, cfg)
    assert all(k.startswith("reference_net.") or ".attn_ref." in k for k in tensors)
    unet5 = UNet2DConditionModel(model.unet.config, rngs=nnx.Rngs(9))
    weights.load_state_dict(unet5, {k: v for k, v in weights.state_dict(model.unet).items() if ".attn_ref." not in k},
                            source="test")
    loaded = method.load_tensors(unet5, cfg, tensors, "test export")
    a, b = weights.state_dict(loaded), weights.state_dict(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(weights.CheckpointMismatchError, match="reference_net.conv_in.weight"):
        method.load_tensors(UNet2DConditionModel(model.unet.config, rngs=nnx.Rngs(9)), cfg,
                            {k: v for k, v in tensors.items() if k != "reference_net.conv_in.weight"}, "test export")
    odd = UNetConfig.from_dict({**TINY_CONFIG, "in_channels": channels + 2, "out_channels": channels})
    with pytest.raises(ValueError, match=f"as many input channels as output channels \\({channels}\\)"):
        method.attach(UNet2DConditionModel(odd, rngs=nnx.Rngs(0)), cfg)


@pytest.mark.parametrize("quirk", [True, False], ids=["released_reshape", "transposed"])
def test_released_vae_matches_its_restatement(tmp_path, quirk):
    """The released VAE's key layout (to_qkv split into to_q/k/v) and its mid-block reshape quirk (an option)."""
    from safetensors.numpy import save_file

    from flashface_reference import ReleasedVAE

    torch.manual_seed(7)
    model = ReleasedVAE(quirk=quirk).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "sd-v1-vae.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(path))
    config = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 32,
              "latent_channels": 4}
    vae = flashface.load_released_vae(path, quirk=quirk, vae_config=config)
    rng = np.random.default_rng(8)
    image = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    z = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        mean_ref = _nhwc(model.encode_mean(_nchw(image)))
        image_ref = _nhwc(model.decode(_nchw(z)))
    enc = _jit_model_fn(vae, lambda m, x: m.encode(x).mean)
    dec = _jit_model_fn(vae, lambda m, x: m.decode(x))
    print(f"vae quirk={quirk} encode {rel_l2(enc(image), mean_ref):.2e} decode {rel_l2(dec(z), image_ref):.2e}")
    assert rel_l2(enc(image), mean_ref) < TOL and rel_l2(dec(z), image_ref) < TOL
    if quirk:  # the quirk is not a no-op: the correctly transposed attention gives another image
        plain = flashface.load_released_vae(path, quirk=False, vae_config=config)
        assert rel_l2(_jit_model_fn(plain, lambda m, x: m.decode(x))(z), image_ref) > 1e-3
    with pytest.raises(weights.CheckpointError, match="refusing to unpickle"):
        flashface.load_released_vae(tmp_path / "sd-v1-vae.pth", vae_config=config)


def test_released_text_encoder_matches_its_restatement(tmp_path):
    from safetensors.numpy import save_file

    from flashface_reference import ReleasedTextTower

    torch.manual_seed(9)
    model = ReleasedTextTower().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "openai-clip-vit-large-14.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(path))
    config = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 8, "projection_dim": 32}
    encoder = flashface.load_released_text_encoder(path, text_config=config)
    ids = np.array([[49 % 100, 5, 7, 99, 99, 99, 99, 99], [3, 4, 99, 99, 99, 99, 99, 99]], np.int32)
    with torch.no_grad():
        expected = model.encode_text(torch.from_numpy(ids).long()).numpy()
    got = _jit_model_fn(encoder, lambda m, x: m(x).last_hidden_state)(ids)
    print(f"text encoder rel_l2 {rel_l2(got, expected):.2e}")
    assert rel_l2(got, expected) < TOL
    with pytest.raises(weights.CheckpointMismatchError, match=r"textual\.transformer\.0\.oops"):
        flashface.released_clip_text_tensors({"textual.transformer.0.oops.weight": np.zeros(2)})


def test_generate_end_to_end_matches_a_manual_loop(tmp_path):
    """`sampling.generate` with the FlashFace model as the pipeline's UNet against a loop written here from the
    public pieces (text encoder, VAE posterior mean, the DDIM sampler, `guided_noise`, decode): 2 trailing DDIM
    steps (t = 999 above the gate, 499 below it), a face box, 2 references cycled to 4."""
    from fusion_jax import sampling, schedulers
    from fusion_jax.tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "tiny", seed=0)
    pipeline = weights.load_pipeline(tmp_path / "tiny")
    cfg = flashface.FlashFaceConfig()
    model = flashface.FlashFace().attach(pipeline.unet, cfg)
    pipeline = dataclasses.replace(pipeline, unet=model)
    settings = dict(flashface.preset("code")["sampling"], num_steps=2)
    scfg = sampling.SamplingConfig(height=16, width=16, output="float", **settings)
    ids = sampling.tokenize(pipeline, ["a photo of a person"])
    rng = np.random.default_rng(3)
    refs = rng.uniform(-1, 1, (1, 2, 8, 8, 3)).astype(np.float32)
    box = np.array([[[4, 2, 10, 8]]], np.float64)
    noise = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    got = sampling.generate(pipeline, ids, key=jax.random.key(0), cfg=scfg, references=refs, boxes=box,
                            identity_cfg=cfg, noise=noise)

    guidance = flashface.preset("code")["guidance"]
    empty = sampling.tokenize(pipeline, [""])
    sampler = schedulers.make_sampler("ddim", pipeline.schedule, 2, timestep_spacing="trailing")
    assert [int(t) for t in np.asarray(sampler.timesteps)] == [999, 499]  # both sides of the gate
    mask = np.zeros((16, 16), np.float32)
    side = max(10 - 2, 8 - 2)  # the demo's square
    mask[2:2 + side, 4:4 + side] = 1
    mask = mask[::2, ::2][None, :, :, None]

    def manual(parts, ids, empty, refs, noise, mask):
        unet, vae, text_encoder = parts
        c = text_encoder(ids).last_hidden_state
        nc = text_encoder(empty).last_hidden_state
        cycled = refs[0][jnp.array([0, 1, 0, 1])]
        ref_latents = sampling.encode_reference_images(vae, cycled)
        x = noise * sampler.init_noise_sigma
        state = sampler.init_state(x)
        # the gate decided here, per step: 2-way (no reference guidance) at t=999, 3-way (no gate) at t=499
        per_step = (dataclasses.replace(guidance, reference=0.0), dataclasses.replace(guidance, gate=None))
        for i, g in enumerate(per_step):
            x_in = sampler.scale_model_input(x, i)
            t = jnp.full((1,), sampler.timesteps[i])
            eps = flashface.guided_noise(unet, x_in, t, c, nc, ref_latents, jnp.repeat(nc, 4, axis=0), mask, g)
            x, state = sampler.step(state, eps, x, i, jax.random.key(1))
        return sampling.decode_latents(vae, x, "float")

    models = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
    graphdefs, states = zip(*(nnx.split(m) for m in models))
    expected = jax.jit(lambda s, *a: manual(tuple(nnx.merge(g, x) for g, x in zip(graphdefs, s)), *a))(
        states, ids, empty, refs, noise, mask)
    assert got.shape == (1, 16, 16, 3)
    print(f"generate vs manual loop rel_l2 {rel_l2(got, expected):.2e}")
    assert rel_l2(got, expected) < TOL


def test_cached_variant_encodes_references_once_at_t0(ours):
    """'current' (released) caches nothing; 'cached' runs the reference pass once at t=0: per-example features
    for every mid / decoder layer (shapes only: traced, not compiled)."""
    from fusion_jax.identity.base import SamplingParts

    method = flashface.FlashFace()
    b, n = 2, 4
    parts = SamplingParts(text_uncond=jnp.zeros((b, L, 16)), text_cond=jnp.zeros((b, L, 16)),
                          empty_text=jnp.zeros((b, L, 16)), ref_latents=jnp.zeros((b, 1, n, RH, RH, 4)),
                          inputs={}, schedule=None, batch=b)
    assert method.encode_references(ours, flashface.FlashFaceConfig(), parts, jax.random.key(0)) is None
    cache = jax.eval_shape(lambda: method.encode_references(ours, flashface.FlashFaceConfig(reference_timestep="cached"),
                                                           parts, jax.random.key(0)))
    assert sorted(cache) == sorted(ours.layers)
    assert cache["mid_block.attentions.0.transformer_blocks.0"].shape == (b, n, 4 * 4, 64)
    assert cache["up_blocks.1.attentions.1.transformer_blocks.0"].shape == (b, n, RH * RH, 32)
