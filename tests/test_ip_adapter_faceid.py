"""IP-Adapter-FaceID: our UNet with a published-layout adapter vs diffusers' UNet with the same adapter loaded
through diffusers' own IP-Adapter path (`_load_ip_adapter_weights`, `added_cond_kwargs={'image_embeds': ...}`).

Tiny SD 1.x UNet (down, mid and up cross-attention, so the processor order down -> up -> mid that numbers
`ip_adapter.N` is exercised), every weight perturbed, float32, relative L2 < 1e-4 (the UNet parity bound of
test_unet.py; the adapter adds a few float32 matmuls and softmaxes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import weights
from fusion_jax.identity import base, ip_adapter_faceid as ipa
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from parity_helpers import rel_l2

TOL = 1e-4
CONFIG = UNetConfig(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
EMB = 512
CLIP_DIM, CLIP_TOKENS = 48, 5  # Plus: a tiny CLIP width and token count


def torch_unet(seed=0):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    model = TorchUNet.from_config(CONFIG.to_dict()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def our_unet(reference):
    tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    model = nnx.eval_shape(lambda: UNet2DConditionModel(CONFIG, rngs=nnx.Rngs(0)))
    return weights.load_state_dict(model, tensors, source="diffusers test model")


def published_state_dict(reference, *, seed=1, lora_rank=0):
    """A random adapter in the published flat layout, numbered by diffusers' attn_processors order."""
    rng = np.random.default_rng(seed)
    cross, tokens = CONFIG.cross_attention_dim, 4
    r = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
    sd = {"image_proj.proj.0.weight": r(2 * EMB, EMB), "image_proj.proj.0.bias": r(2 * EMB),
          "image_proj.proj.2.weight": r(cross * tokens, 2 * EMB), "image_proj.proj.2.bias": r(cross * tokens),
          "image_proj.norm.weight": 1 + r(cross), "image_proj.norm.bias": r(cross)}
    for i, (name, _) in enumerate(reference.attn_processors.items()):
        attn = reference.get_submodule(name[: -len(".processor")])
        hidden = attn.to_q.weight.shape[0]
        if name.endswith("attn2.processor"):
            sd[f"ip_adapter.{i}.to_k_ip.weight"] = 4 * r(hidden, cross)
            sd[f"ip_adapter.{i}.to_v_ip.weight"] = 4 * r(hidden, cross)
        if lora_rank:
            for proj, lin in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
                sd[f"ip_adapter.{i}.to_{proj}_lora.down.weight"] = r(lora_rank, lin.weight.shape[1])
                sd[f"ip_adapter.{i}.to_{proj}_lora.up.weight"] = r(lin.weight.shape[0], lora_rank)
    return sd


def nested(sd):
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        section, rest = k.split(".", 1)
        out[section][rest] = torch.from_numpy(v.copy())
    return out


def merge_diffusers_lora(reference, loras, alphas=None):
    """W += alpha / rank * up @ down on the modules diffusers' LoRA converters name
    (`unet.<path>.processor.to_q_lora.down.weight`), as load_lora_weights (PEFT) applies them."""
    with torch.no_grad():
        for key, down in loras.items():
            if ".down.weight" not in key:
                continue
            up = loras[key.replace(".down.", ".up.")]
            path, proj = key[len("unet."):].split(".processor.")
            proj = proj.split("_lora")[0]
            attn = reference.get_submodule(path)
            lin = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
            alpha = (alphas or {}).get(key + ".alpha", down.shape[0])
            lin.weight += (alpha / down.shape[0]) * up @ down


def diffusers_with_adapter(reference, sd, scale, lora_file=None):
    """diffusers' own loading path; the LoRA keys are merged as diffusers' load_ip_adapter -> load_lora_weights
    (PEFT, scale 1) applies them, on the modules `_load_ip_adapter_loras` names; a separate kohya LoRA file through
    diffusers' `_convert_non_diffusers_lora_to_diffusers` (names and alphas)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    state = nested(sd)
    reference._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    merge_diffusers_lora(reference, reference._load_ip_adapter_loras([state]).get(0, {}))
    if lora_file is not None:
        merge_diffusers_lora(reference, *_convert_non_diffusers_lora_to_diffusers(load_file(str(lora_file))))
    for proc in reference.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [scale]
    return reference


def inputs(seed=2, batch=2):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    ehs = rng.standard_normal((batch, 7, CONFIG.cross_attention_dim)).astype(np.float32)
    face = rng.standard_normal((batch, EMB)).astype(np.float32)
    return sample, ehs, face


def torch_out(model, sample, t, ehs, face):
    with torch.no_grad():
        out = model(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.as_tensor(t), torch.from_numpy(ehs),
                    added_cond_kwargs={"image_embeds": [torch.from_numpy(face)[:, None]]})
    return out.sample.permute(0, 2, 3, 1).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, sample, t, ehs, face, scale):
    model = nnx.merge(graphdef, state)
    return model(sample, t, ehs, identity=ipa.identity_context(model, face, scale))


@functools.partial(jax.jit, static_argnums=0)
def _base_forward(graphdef, state, sample, t, ehs):
    return nnx.merge(graphdef, state)(sample, t, ehs)


def jax_out(model, sample, t, ehs, face, scale):
    """One compiled function for every test (same structure and shapes; t and scale traced)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, sample, jnp.float32(t), ehs, face, jnp.float32(scale)))


def base_out(model, sample, t, ehs):
    graphdef, state = nnx.split(model)
    return np.asarray(_base_forward(graphdef, state, sample, jnp.float32(t), ehs))


def kohya_lora_file(reference, path, rank=3, seed=20):
    """A random LoRA in the kohya layout of the published *_lora.safetensors: every attention projection."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    sd = {}
    for name in reference.attn_processors:
        attn = reference.get_submodule(name[: -len(".processor")])
        for proj, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out_0", attn.to_out[0])):
            stem = "lora_unet_" + f"{name[: -len('.processor')]}.{proj}".replace(".", "_")
            out_f, in_f = lin.weight.shape
            sd[stem + ".lora_down.weight"] = (0.05 * rng.standard_normal((rank, in_f))).astype(np.float32)
            sd[stem + ".lora_up.weight"] = (0.05 * rng.standard_normal((out_f, rank))).astype(np.float32)
            sd[stem + ".alpha"] = np.asarray(2.0, np.float32)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("lora_rank, lora_file, scale", [(0, False, 0.7), (4, False, 1.0), (0, True, 1.0)],
                         ids=["faceid", "faceid+lora", "faceid+lora_file"])
def test_matches_diffusers_ip_adapter(tmp_path, lora_rank, lora_file, scale):
    reference = torch_unet()
    model = our_unet(reference)
    sd = published_state_dict(reference, lora_rank=lora_rank)
    file = tmp_path / "ip-adapter-faceid_sd15.safetensors"
    from safetensors.numpy import save_file

    save_file(sd, str(file))
    lora = kohya_lora_file(reference, tmp_path / "ip-adapter-faceid_sd15_lora.safetensors") if lora_file else None
    model = ipa.load(model, file, lora=lora)
    sample, ehs, face = inputs()
    ours = jax_out(model, sample, 321, ehs, face, scale)
    expected = torch_out(diffusers_with_adapter(reference, sd, scale, lora), sample, 321, ehs, face)
    err = rel_l2(ours, expected)
    print(f"rel_l2 {err:.2e}")
    assert err < TOL
    if lora is not None:  # the LoRA file matters at this tolerance
        plain = jax_out(ipa.load(our_unet(torch_unet()), file), sample, 321, ehs, face, scale)
        assert rel_l2(plain, expected) > 1e-3
    # the adapter matters: the base UNet is far from it
    assert rel_l2(base_out(model, sample, 321, ehs), expected) > 1e-2
    # export round trip: the published layout comes back unchanged (without the merged LoRA keys)
    exported = ipa.adapter_tensors(model)
    assert set(exported) == {k for k in sd if "_lora." not in k}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k])


def test_scale_zero_is_the_base_unet_and_pickles(tmp_path):
    reference = torch_unet(seed=3)
    model = our_unet(reference)
    sd = published_state_dict(reference, seed=4)
    file = tmp_path / "ip-adapter-faceid_sd15.bin"
    torch.save(nested(sd), str(file))
    with pytest.raises(ValueError, match="refusing to unpickle .*ip-adapter-faceid_sd15.bin"):
        ipa.load(model, file)
    model = ipa.load(model, file, allow_pickle=True)
    sample, ehs, face = inputs(seed=5)
    base = base_out(model, sample, 500, ehs)
    np.testing.assert_array_equal(jax_out(model, sample, 500, ehs, face, 0.0), base)
    assert rel_l2(jax_out(model, sample, 500, ehs, face, 1.0), base) > 1e-2


def test_bad_files_name_the_file(tmp_path):
    from safetensors.numpy import save_file

    reference = torch_unet(seed=6)
    sd = published_state_dict(reference, seed=7)
    unet = our_unet(reference)
    no_proj = tmp_path / "no_proj.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("image_proj.")}, str(no_proj))
    with pytest.raises(ValueError, match=r"no_proj\.safetensors: no 'image_proj\.\*' keys"):
        ipa.load(unet, no_proj)
    with pytest.raises(ValueError, match="no such IP-Adapter file"):
        ipa.load(unet, tmp_path / "absent.safetensors")
    short = tmp_path / "short.safetensors"
    save_file({k: v for k, v in sd.items() if k != "ip_adapter.1.to_v_ip.weight"}, str(short))
    with pytest.raises(ValueError, match=r"short\.safetensors: .*missing \['ip_adapter\.1\.to_v_ip\.weight'\]"):
        ipa.load(unet, short)
    te_lora = tmp_path / "te_lora.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 4), np.float32)},
              str(te_lora))
    with pytest.raises(ValueError, match=r"te_lora\.safetensors: LoRA keys that are not UNet"):
        ipa.merge_lora_file(unet, te_lora)


def test_convert_cli(tmp_path, capsys):
    """`python -m fusion_jax.convert ip_adapter_faceid SRC.bin OUT.safetensors`: pickles only with
    --allow-pickle; OUT holds the same keys and values (LoRA keys included)."""
    from fusion_jax import convert

    reference = torch_unet(seed=10)
    sd = published_state_dict(reference, seed=11, lora_rank=2)
    src, out = tmp_path / "faceid.bin", tmp_path / "faceid.safetensors"
    torch.save(nested(sd), str(src))
    assert convert.main(["ip_adapter_faceid", str(src), str(out)]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err and not out.exists()
    assert convert.main(["ip_adapter_faceid", str(src), str(out), "--allow-pickle"]) == 0
    back = weights.read_tensors(out)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)
    # with --unet (and a separate LoRA file): an export folder that the generic export loader reads back
    from fusion_jax.identity import export

    reference.save_pretrained(tmp_path / "unet")
    lora = kohya_lora_file(reference, tmp_path / "faceid_lora.safetensors")
    folder = tmp_path / "export"
    assert convert.main(["ip_adapter_faceid", str(out), str(folder), "--unet", str(tmp_path / "unet"),
                         "--lora", str(lora)]) == 0
    model, method, cfg = export.load_identity_model(folder)
    assert method.name == "ip_adapter_faceid" and cfg.variant == "faceid"
    direct = ipa.load(our_unet(reference), out, lora=lora)
    ours, theirs = weights.state_dict(model), weights.state_dict(direct)
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=1e-6, err_msg=k)


def test_method_interface(tmp_path):
    """Registered; attach gives a fresh adapter; the loss reads 'face_embedding' and the 'adapter' preset trains
    only the adapter; export -> load_tensors gives the same numbers; CLI flags."""
    import argparse

    from fusion_jax.schedulers import NoiseSchedule

    method = base.get("ip_adapter_faceid")
    assert method.batch_keys == ("face_embedding",)
    cfg = ipa.IPAdapterFaceIDConfig(text_dropout=0.0, face_dropout=0.0)
    model = method.attach(our_unet(torch_unet(seed=9)), cfg)
    sample, ehs, face = inputs(seed=8)
    batch = {"latents": jnp.asarray(sample), "text_emb": jnp.asarray(ehs), "empty_text_emb": jnp.zeros((1, 7, 32)),
             "face_embedding": jnp.asarray(face)}
    flt = method.trainable_filter("adapter", cfg)
    graphdef, trainable, rest = nnx.split(model, flt, ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert names and all("ip_image_proj" in n or "_ref." in n for n in names)

    def loss(tr):
        return method.loss(nnx.merge(graphdef, tr, rest), batch, jax.random.key(0), NoiseSchedule(), cfg)[0]

    grads = jax.eval_shape(jax.grad(loss), trainable)  # traced only (the loss math is the generic denoising one)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    with pytest.raises(ValueError, match="face_embedding"):
        method.loss(model, {k: v for k, v in batch.items() if k != "face_embedding"}, jax.random.key(0),
                    NoiseSchedule(), cfg)
    tensors = method.export_tensors(model, cfg)
    fresh = method.load_tensors(our_unet(torch_unet(seed=9)), cfg, tensors, "export")
    np.testing.assert_array_equal(jax_out(model, sample, 10, ehs, face, 1.0),
                                  jax_out(fresh, sample, 10, ehs, face, 1.0))
    parser = argparse.ArgumentParser()
    method.add_arguments(parser)
    emb_file = tmp_path / "faces.npy"
    np.save(emb_file, face[:1])
    new_cfg, _ = method.apply_arguments(parser.parse_args(["--ip-scale", "0.6", "--face-embeddings", str(emb_file)]),
                                        cfg, None)
    assert new_cfg.strength == 0.6 and new_cfg.face_embeddings == str(emb_file)
    np.save(tmp_path / "bad.npy", face[:, :10])
    with pytest.raises(ValueError, match="--face-embeddings"):
        method.apply_arguments(parser.parse_args(["--face-embeddings", str(tmp_path / "bad.npy")]), cfg, None)
    with pytest.raises(ValueError, match="ip_adapter_faceid.face_dropout"):
        dataclasses.replace(cfg, face_dropout=2.0)
    # sampling inputs: the request's embeddings (the CLI's detector) first, else the --face-embeddings file
    from fusion_jax.identity.base import ReferenceRequest

    refs = np.zeros((2, 1, 3, 8, 8, 3), np.float32)
    kw = dict(batch=2, image_size=(64, 64), latent_size=(8, 8))
    emb = np.random.default_rng(9).standard_normal((2, 1, 3, EMB)).astype(np.float32)
    got = method.sampling_inputs(model, cfg, ReferenceRequest(refs, face_embeddings=emb), **kw)
    np.testing.assert_array_equal(np.asarray(got["face_embeds"]), emb)
    got = method.sampling_inputs(model, new_cfg, ReferenceRequest(refs), **kw)
    np.testing.assert_array_equal(np.asarray(got["face_embeds"]), np.broadcast_to(face[None, None, :1], (2, 1, 1, EMB)))
    with pytest.raises(ValueError, match=r"face_embeddings must be \(B=2, K=1, N, 512\)"):
        method.sampling_inputs(model, cfg, ReferenceRequest(refs, face_embeddings=emb[..., :8]), **kw)
    with pytest.raises(ValueError, match="--face-embeddings FILE.npy"):
        method.sampling_inputs(model, cfg, ReferenceRequest(refs), **kw)


@pytest.mark.parametrize("variant", ["faceid", "plusv2"])
def test_inside_the_jitted_sampler(tmp_path, variant):
    """Through `sampling.generate` (the generic sampler calling the interface): scale 0 reproduces text-to-image
    (both IP-Adapter CFG branches then see no face tokens; only the batching of the UNet calls differs, float32
    reassociation amplified by guidance and the decoder, as in test_fusion_sampling), scale 1 changes the image.
    PlusV2: the CLIP tokens come from the reference crops through the model's (tiny) image encoder."""
    from fusion_jax import sampling
    from fusion_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
    from fusion_jax.tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "pipe", seed=2)
    pipe = weights.load_pipeline(tmp_path / "pipe")
    method = base.get("ip_adapter_faceid")
    icfg = ipa.IPAdapterFaceIDConfig()
    if variant == "plusv2":
        icfg = ipa.IPAdapterFaceIDConfig(variant="plus", clip_dim=CLIP_DIM, resampler_dim=32, resampler_heads=1,
                                         shortcut=True, s_scale=0.5)
    method.attach(pipe.unet, icfg, rngs=nnx.Rngs(1))
    if variant == "plusv2":
        tower = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=32, patch_size=16)
        ipa.attach_image_encoder(pipe.unet, nnx.jit(lambda: CLIPVisionModel(tower, rngs=nnx.Rngs(2)))())
    emb = tmp_path / "face.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((1, EMB)).astype(np.float32))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = sampling.SamplingConfig(height=size, width=size, output="float", num_steps=2, guidance_scale=3.0,
                                  reference_guidance="cfg")
    ids = sampling.tokenize(pipe, ["a person"])
    noise = np.random.default_rng(1).standard_normal(sampling.latent_shape(pipe, cfg, 1)).astype(np.float32)
    refs = np.random.default_rng(3).uniform(-1, 1, (1, 1, size, size, 3)).astype(np.float32)
    icfg = dataclasses.replace(icfg, face_embeddings=str(emb))
    run = lambda **kw: np.asarray(sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, noise=noise, **kw))
    text_only = run()
    off = run(references=refs, identity_cfg=icfg, strength=0.0)
    on = run(references=refs, identity_cfg=icfg, strength=1.0)
    assert np.isfinite(on).all()
    print(f"{variant}: scale 0 vs text-to-image rel_l2 {rel_l2(off, text_only):.1e}")
    assert rel_l2(off, text_only) < 1e-5
    assert rel_l2(on, text_only) > 1e-3
    with pytest.raises(ValueError, match="--face-embeddings"):
        run(references=refs, identity_cfg=dataclasses.replace(icfg, face_embeddings=None))
    if variant == "plusv2":
        with pytest.raises(ValueError, match="1 embeddings per person; FaceID-Plus pairs"):
            run(references=np.concatenate([refs, refs], axis=1), identity_cfg=icfg)


def published_plus_state_dict(reference, *, seed=12):
    """A random FaceID-Plus adapter in the published layout (resampler width = cross width, 1 head of 64)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
    d = CONFIG.cross_attention_dim
    sd = {k: v for k, v in published_state_dict(reference, seed=seed).items() if k.startswith("ip_adapter.")}
    sd.update({"image_proj.proj.0.weight": r(2 * EMB, EMB), "image_proj.proj.0.bias": r(2 * EMB),
               "image_proj.proj.2.weight": r(4 * d, 2 * EMB), "image_proj.proj.2.bias": r(4 * d),
               "image_proj.norm.weight": 1 + r(d), "image_proj.norm.bias": r(d)})
    pr = "image_proj.perceiver_resampler."
    sd.update({pr + "proj_in.weight": 3 * r(d, CLIP_DIM), pr + "proj_in.bias": r(d),
               pr + "proj_out.weight": 3 * r(d, d), pr + "proj_out.bias": r(d),
               pr + "norm_out.weight": 1 + r(d), pr + "norm_out.bias": r(d)})
    for i in range(4):
        lp = f"{pr}layers.{i}."
        sd.update({lp + "0.norm1.weight": 1 + r(d), lp + "0.norm1.bias": r(d), lp + "0.norm2.weight": 1 + r(d),
                   lp + "0.norm2.bias": r(d), lp + "0.to_q.weight": 3 * r(64, d), lp + "0.to_kv.weight": 3 * r(128, d),
                   lp + "0.to_out.weight": 3 * r(d, 64), lp + "1.0.weight": 1 + r(d), lp + "1.0.bias": r(d),
                   lp + "1.1.weight": 3 * r(4 * d, d), lp + "1.3.weight": 3 * r(d, 4 * d)})
    return sd


@functools.partial(jax.jit, static_argnums=(0, 7))
def _forward_plus(graphdef, state, sample, ehs, face, clip, s_scale, shortcut):
    model = nnx.merge(graphdef, state)
    ctx = ipa.identity_context(model, face, 0.8, clip_embeds=clip, shortcut=shortcut, s_scale=s_scale)
    return model(sample, 321, ehs, identity=ctx)


@pytest.mark.parametrize("shortcut, s_scale", [(False, 1.0), (True, 0.6)], ids=["plus", "plusv2"])
def test_plus_matches_diffusers(tmp_path, shortcut, s_scale):
    from safetensors.numpy import save_file

    reference = torch_unet(seed=13)
    sd = published_plus_state_dict(reference)
    file = tmp_path / "ip-adapter-faceid-plusv2_sd15.safetensors"
    save_file(sd, str(file))
    model = ipa.load(our_unet(reference), file)
    sample, ehs, face = inputs(seed=14)
    clip = np.random.default_rng(15).standard_normal((2, CLIP_TOKENS, CLIP_DIM)).astype(np.float32)
    graphdef, state = nnx.split(model)
    ours = np.asarray(_forward_plus(graphdef, state, sample, ehs, face, clip, jnp.float32(s_scale), shortcut))
    torch_model = diffusers_with_adapter(reference, sd, 0.8)
    proj = torch_model.encoder_hid_proj.image_projection_layers[0]
    proj.clip_embeds = torch.from_numpy(clip)[:, None]
    proj.shortcut, proj.shortcut_scale = shortcut, s_scale
    expected = torch_out(torch_model, sample, 321, ehs, face)
    err = rel_l2(ours, expected)
    print(f"plus shortcut={shortcut} rel_l2 {err:.2e}")
    assert err < TOL
    assert rel_l2(base_out(model, sample, 321, ehs), expected) > 1e-2
    exported = ipa.adapter_tensors(model)
    assert set(exported) == set(sd)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k])
    with pytest.raises(ValueError, match="needs clip_embeds"):
        ipa.identity_context(model, face)


def test_padding_references_are_never_attended():
    """reference_valid False: that face's tokens are masked (layer level, decoupled combine): the output equals
    the one without the padding face at all."""
    from types import SimpleNamespace

    from fusion_jax.identity.context import IdentityContext
    from fusion_jax.models import attention as attention_lib

    stub = SimpleNamespace(ip_image_proj=ipa.MLPProjModel(EMB, 32, 4, 2, rngs=nnx.Rngs(0)))
    attn = attention_lib.Attention(32, heads=2, dim_head=16, cross_attention_dim=32, rngs=nnx.Rngs(1))
    attn.to_k_ref = nnx.Linear(32, 32, use_bias=False, rngs=nnx.Rngs(2))
    attn.to_v_ref = nnx.Linear(32, 32, use_bias=False, rngs=nnx.Rngs(3))
    attn.identity_combine = "decoupled"
    rng = np.random.default_rng(4)
    x, ehs = rng.standard_normal((1, 16, 32)).astype(np.float32), rng.standard_normal((1, 5, 32)).astype(np.float32)
    faces = rng.standard_normal((1, 1, 2, EMB)).astype(np.float32)

    def out(face, valid=None):
        tokens, ids, _ = ipa.face_tokens(stub, face, reference_valid=valid)
        ctx = IdentityContext(reference_tokens={"l": tokens}, token_identity={"l": ids}, strength=jnp.full((1, 1), 0.9))
        return np.asarray(attn(jnp.asarray(x), jnp.asarray(ehs), identity=ctx, layer_name="l"))

    padded = out(faces, np.array([[[True, False]]]))
    err = rel_l2(padded, out(faces[:, :, :1]))
    print(f"padding masked rel_l2 {err:.1e}")
    assert err < 5e-6  # the same softmax with extra exact-zero terms: float32 reduction order only
    assert rel_l2(out(faces), padded) > 1e-3
