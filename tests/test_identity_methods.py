"""The identity-method interface: registry, registered config sections, the one export format, and the
single-token baseline as a registered method.

References: Face Fusion's own functions called directly (the interface must give the same numbers), a NumPy mean
for the pooled tokens, and the files on disk for the export format.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax import config as config_lib
from fusion_jax import sampling, weights
from fusion_jax.identity import base, export, fusion, single_token
from fusion_jax.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_identity_methods")
    write_tiny_pipeline(path, seed=2)
    return weights.load_pipeline(path)


def _fresh_unet(pipeline):
    graphdef, state = nnx.split(pipeline.unet)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


# --------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_lookup():
    assert {"face_fusion", "single_token"} <= set(base.names())
    assert base.get("face_fusion").config_class is fusion.FusionConfig
    assert base.default_method().name == "face_fusion"
    # the config type selects the method exactly (SingleTokenConfig subclasses FusionConfig)
    assert base.for_config(fusion.FusionConfig()).name == "face_fusion"
    assert base.for_config(single_token.SingleTokenConfig()).name == "single_token"
    with pytest.raises(ValueError, match=r"--method: unknown identity method 'nope'.*face_fusion"):
        base.get("nope", what="--method")


def test_registered_sections_in_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  name: single_token\nsingle_token:\n  combine: decoupled\nfusion:\n  init: zero\n")
    cfg = config_lib.load_config(str(path), ["single_token.reference_timestep=current"])
    assert cfg.objective.name == "single_token"
    assert cfg.single_token == single_token.SingleTokenConfig(combine="decoupled", reference_timestep="current")
    assert cfg.fusion.init == "zero"
    # save -> load round trip keeps every section
    config_lib.save_config(cfg, str(tmp_path / "resolved.yaml"))
    assert config_lib.load_config(str(tmp_path / "resolved.yaml")) == cfg
    # a config built in code sees every registered section's defaults
    assert config_lib.ExperimentConfig().fusion == fusion.FusionConfig()
    swapped = cfg.with_section("fusion", fusion.FusionConfig(combine="decoupled"))
    assert swapped.fusion.combine == "decoupled" and swapped.single_token == cfg.single_token


def test_config_errors_name_the_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("objective:\n  name: flashfaces\n")
    with pytest.raises(config_lib.ConfigError, match=r"bad\.yaml: key 'objective\.name': expected one of"):
        config_lib.load_config(str(path))
    path.write_text("single_token:\n  combin: joint\n")
    with pytest.raises(config_lib.ConfigError, match=r"bad\.yaml: unknown config key 'single_token\.combin'"):
        config_lib.load_config(str(path))
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'nosuchsection.x'"):
        config_lib.load_config(None, ["nosuchsection.x=1"])


def test_config_layer_imports_no_method():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(config_lib))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
               [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("fusion_jax.identity.fusion", "fusion_jax.identity.flashface",
                                                     "fusion_jax.models"))], imported


# ---------------------------------------------------------------------------------------------- the baseline


def test_single_token_pools_face_fusion_tokens(pipeline):
    unet = _fresh_unet(pipeline)
    cfg = fusion.FusionConfig()
    fusion.attach_identity_projections(unet, cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    side = unet.config.sample_size
    refs = jnp.asarray(rng.standard_normal((2, 1, 3, side, side, 4)), jnp.float32)
    empty = jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32)
    full = fusion.encode_references(unet, refs, empty, cfg)
    pooled = base.get("single_token").reference_context(unet, refs, empty, single_token.SingleTokenConfig())
    for name, tokens in full.reference_tokens.items():
        b, t, c = tokens.shape
        expected = np.asarray(tokens).reshape(b, 3, t // 3, c).mean(axis=2)  # one token per reference image
        np.testing.assert_allclose(np.asarray(pooled.reference_tokens[name]), expected, rtol=1e-6, atol=1e-6)
        assert pooled.token_identity[name].shape == (b, 3)


def test_methods_differ_only_in_tokens_through_generate(pipeline):
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    cfg = sampling.SamplingConfig(height=size, width=size, num_steps=2, output="float")
    unet = _fresh_unet(pipeline)
    fusion.attach_identity_projections(unet, fusion.FusionConfig(), rngs=nnx.Rngs(0))
    import dataclasses

    pipe = dataclasses.replace(pipeline, unet=unet)
    ids = sampling.tokenize(pipe, ["a person", "a smiling person"])
    refs = np.random.default_rng(1).uniform(-1, 1, (2, 1, 1, size, size, 3)).astype(np.float32)
    key = jax.random.key(0)
    face_fusion = sampling.generate(pipe, ids, key=key, cfg=cfg, references=refs, identity_cfg=fusion.FusionConfig())
    legacy_kw = sampling.generate(pipe, ids, key=key, cfg=cfg, references=refs, fusion_cfg=fusion.FusionConfig())
    default = sampling.generate(pipe, ids, key=key, cfg=cfg, references=refs)
    np.testing.assert_array_equal(np.asarray(face_fusion), np.asarray(legacy_kw))
    np.testing.assert_array_equal(np.asarray(face_fusion), np.asarray(default))
    # one reference image pooled to one token per layer is NOT the same conditioning as its whole feature map
    pooled = sampling.generate(pipe, ids, key=key, cfg=cfg, references=refs,
                               identity_cfg=single_token.SingleTokenConfig())
    assert not np.allclose(np.asarray(pooled), np.asarray(face_fusion), atol=1e-4)
    with pytest.raises(ValueError, match="identity_cfg or its older name fusion_cfg"):
        sampling.generate(pipe, ids, key=key, cfg=cfg, references=refs, identity_cfg=fusion.FusionConfig(),
                          fusion_cfg=fusion.FusionConfig())


def test_single_token_loss_is_face_fusion_loss_on_pooled_tokens(pipeline):
    unet = _fresh_unet(pipeline)
    cfg = single_token.SingleTokenConfig()
    method = base.get("single_token")
    model = method.attach(unet, cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    side = unet.config.sample_size
    batch = {"latents": jnp.asarray(rng.standard_normal((2, side, side, 4)), jnp.float32),
             "text_emb": jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32),
             "empty_text_emb": jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32),
             "reference_latents": jnp.asarray(rng.standard_normal((2, 2, side, side, 4)), jnp.float32)}
    key = jax.random.key(4)
    graphdef, state = nnx.split(model)

    def jitted_loss(loss_fn, **kw):  # jitted: the eager UNet dispatches op by op (minutes on 2 cores)
        return jax.jit(lambda st: loss_fn(nnx.merge(graphdef, st), batch, key, pipeline.schedule, cfg, **kw)[0])(state)

    def pooled_encode(u, refs, empty, c, **kw):
        ctx = fusion.encode_references(u, refs, empty, c, **kw)
        return single_token.pool_tokens(ctx, 2)

    ours = jitted_loss(method.loss)
    direct = jitted_loss(fusion.fusion_loss, encode=pooled_encode)
    plain = jitted_loss(fusion.fusion_loss)
    assert float(ours) == float(direct)  # the same program: bit for bit
    assert float(ours) != float(plain)


# ------------------------------------------------------------------------------------------------- export


def test_export_format_round_trip(pipeline, tmp_path):
    unet = _fresh_unet(pipeline)
    cfg = single_token.SingleTokenConfig(combine="decoupled", blocks=("mid", "up"))
    method = base.get("single_token")
    model = method.attach(unet, cfg, rngs=nnx.Rngs(1))
    out = export.export_identity(model, method, cfg, tmp_path / "exp", extra={"step": 7})
    meta = json.loads((out / "identity" / "identity_config.json").read_text())
    assert meta["method"] == "single_token" and meta["format"] == export.IDENTITY_FORMAT and meta["step"] == 7
    assert meta["config"]["blocks"] == ["mid", "up"]
    saved = weights.read_tensors(out / "identity" / "single_token.safetensors")
    assert saved and all("_ref." in k for k in saved) and not any(k.startswith("down_blocks") for k in saved)
    loaded, loaded_method, loaded_cfg = export.load_identity_model(out)
    assert loaded_method.name == "single_token" and loaded_cfg == cfg
    sd = weights.state_dict(loaded)
    for k, v in weights.state_dict(model).items():
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    with pytest.raises(ValueError, match="an export of identity method 'single_token', not 'face_fusion'"):
        export.load_identity_model(out, base.get("face_fusion"))


def test_reads_first_face_fusion_export_format(pipeline, tmp_path):
    """Exports written before the method interface (identity_modules.safetensors, key "fusion") still load."""
    from safetensors.numpy import save_file

    unet = _fresh_unet(pipeline)
    cfg = fusion.FusionConfig(combine="decoupled")
    fusion.attach_identity_projections(unet, cfg, rngs=nnx.Rngs(2))
    tensors = base.get("face_fusion").export_tensors(unet, cfg)
    folder = tmp_path / "old" / "identity"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "identity_modules.safetensors"))
    (folder / "identity_config.json").write_text(json.dumps(
        {"format": "fusion_jax.face_fusion.identity_modules/1", "fusion": export.config_dict(cfg)}))
    model, method, got = export.load_identity_tensors(_fresh_unet(pipeline), tmp_path / "old")
    assert method.name == "face_fusion" and got == cfg
    sd = weights.state_dict(model)
    for k, v in tensors.items():
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    (folder / "identity_config.json").write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(ValueError, match=r"identity_config\.json: format 'something/9'"):
        export.read_identity_config(tmp_path / "old")


def test_face_embeddings_reach_the_method_checked(pipeline, monkeypatch):
    """`generate(face_embeddings=...)` is validated against the references and handed to the method's request."""
    import dataclasses

    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    cfg = sampling.SamplingConfig(height=size, width=size, num_steps=1, output="float")
    unet = _fresh_unet(pipeline)
    fusion.attach_identity_projections(unet, fusion.FusionConfig(), rngs=nnx.Rngs(0))
    pipe = dataclasses.replace(pipeline, unet=unet)
    ids = sampling.tokenize(pipe, ["a person"])
    refs = np.zeros((1, 1, 2, size, size, 3), np.float32)
    seen = {}
    method = base.get("face_fusion")
    original = type(method).sampling_inputs

    def spy(self, model, c, request, **kw):
        seen["embeddings"] = request.face_embeddings
        return original(self, model, c, request, **kw)

    monkeypatch.setattr(type(method), "sampling_inputs", spy)
    emb = np.random.default_rng(0).standard_normal((1, 2, 512)).astype(np.float32)  # (B, N, D): one person
    sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, references=refs, face_embeddings=emb)
    np.testing.assert_array_equal(seen["embeddings"], emb[:, None])
    with pytest.raises(ValueError, match=r"face_embeddings must be \(B, K, N, D\)=\(1, 1, 2, D\)"):
        sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, references=refs, face_embeddings=emb[:, :1])
    with pytest.raises(ValueError, match="given without references"):
        sampling.generate(pipe, ids, key=jax.random.key(0), cfg=cfg, face_embeddings=emb)


def test_saved_config_keeps_only_sections_in_use(tmp_path):
    cfg = config_lib.load_config(None, ["objective.name=face_fusion", "single_token.strength=0.5"])
    saved = config_lib.to_dict(cfg)
    assert "fusion" in saved and saved["single_token"]["strength"] == 0.5  # the objective's and a changed one
    assert not {"flashface", "facestudio", "ip_adapter_faceid"} & set(saved)  # unused, at their defaults
    config_lib.save_config(cfg, str(tmp_path / "c.yaml"))
    assert config_lib.load_config(str(tmp_path / "c.yaml")) == cfg


def test_config_layer_imports_no_heavy_module():
    import subprocess
    import sys

    code = ("import sys, fusion_jax.config as c; c.ExperimentConfig(); "
            "print(sorted(m for m in sys.modules if m.startswith(('fusion_jax.models', 'fusion_jax.data.pipeline', "
            "'fusion_jax.data.synthfaces', 'fusion_jax.identity', 'cv2', 'tensorflow', 'jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_numpy(prediction_type):
    import dataclasses as dc

    from fusion_jax.experiment.losses import min_snr_weight
    from fusion_jax.schedulers import NoiseSchedule

    schedule = dc.replace(NoiseSchedule(), prediction_type=prediction_type)
    t = np.array([0, 10, 250, 500, 999])
    a = np.asarray(schedule.alphas_cumprod, np.float64)[t]
    snr = a / (1 - a)
    expected = {"epsilon": np.minimum(snr, 5) / snr, "v_prediction": np.minimum(snr, 5) / (snr + 1),
                "sample": np.minimum(snr, 5)}[prediction_type]
    # float32 SNR: 1 - alpha_bar at t=0 is ~8.5e-4, so its float32 rounding (6e-8) is ~7e-5 relative there
    np.testing.assert_allclose(np.asarray(min_snr_weight(schedule, jnp.asarray(t), 5.0)), expected, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(min_snr_weight(schedule, jnp.asarray(t), 0.0)), np.ones(5))
