"""train/export.py: the trained tiny Face Fusion UNet in diffusers format (loads in diffusers, same output),
identity modules round-trip, and with train.trainable=identity only the identity params moved."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax import weights
from fusion_jax.experiment import IDENTITY_DIR, IDENTITY_WEIGHTS, load_face_fusion_unet, tiny_pipeline_dir
from tests.test_train_entry import REPO, tiny_run


def _export_module():
    spec = importlib.util.spec_from_file_location("export_entry", os.path.join(REPO, "train", "export.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tiny_run(tmp_path_factory.getbasetemp())
    out = str(tmp_path_factory.mktemp("export"))
    assert _export_module().main(["--workdir", run["workdir"], "--out", out]) == 0
    return run, out


def test_only_identity_params_trained(exported):
    run, out = exported
    base = weights.read_tensors(tiny_pipeline_dir(run["cache"]) / "unet" / "diffusion_pytorch_model.safetensors")
    ours = weights.read_tensors(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == base.keys()
    for key in base:  # frozen UNet weights are bit-for-bit the base pipeline's
        np.testing.assert_array_equal(ours[key], base[key], err_msg=key, strict=True)
    identity = weights.read_tensors(os.path.join(out, IDENTITY_DIR, IDENTITY_WEIGHTS))
    assert identity and all("_ref." in k for k in identity)
    moved = [k for k in identity if k.endswith("to_k_ref.weight")
             and not np.array_equal(identity[k], base[k.replace("attn2.to_k_ref", "attn1.to_k")])]
    assert moved  # init: copy of attn1 -> trained away from it


def test_diffusers_loads_export_with_same_output(exported):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    _, out = exported
    theirs = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    ours = weights.load_unet(out)
    rng = np.random.default_rng(0)
    cfg = ours.config
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, 7, cfg.cross_attention_dims()[0])).astype(np.float32)
    t = np.array([10, 700], np.int32)
    mine = np.asarray(jax.jit(lambda a, b, c: ours(a, b, c))(x, t, text))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
                     torch.from_numpy(text)).sample.numpy().transpose(0, 2, 3, 1)
    rel = np.linalg.norm(mine - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel


def test_identity_modules_round_trip(exported):
    _, out = exported
    unet = load_face_fusion_unet(out)
    saved = weights.read_tensors(os.path.join(out, IDENTITY_DIR, IDENTITY_WEIGHTS))
    sd = weights.state_dict(unet)
    for key, value in saved.items():
        np.testing.assert_array_equal(sd[key], value, err_msg=key)
    # the reloaded model uses them: strength 1 vs the base model differs
    from fusion_jax.identity.fusion import FusionConfig, encode_references

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32)
    refs = jnp.asarray(rng.standard_normal((1, 1, 8, 8, 4)), jnp.float32)

    @jax.jit
    def both(x, text, refs):
        ctx = encode_references(unet, refs, text, FusionConfig())
        return unet(x, 5, text, identity=ctx), unet(x, 5, text)

    with_id, base = both(x, text, refs)
    assert np.isfinite(np.asarray(with_id)).all() and not np.allclose(with_id, base)
