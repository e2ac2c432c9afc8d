"""CLIP text / vision parity against transformers' PyTorch CLIP with the same random weights (float32).

Tolerance: relative L2 error < 1e-4 (the issue's bar). Both sides compute in float32; the remaining
differences are summation-order rounding, around 1e-7 relative.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from fusion_jax import weights
from fusion_jax.models import clip
from parity_helpers import rel_l2

REL_TOL = 1e-4


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter, LayerNorm scales and all biases included, so nothing stays at 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.add_(0.02 * noise)
    return model.eval()


def torch_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()}


def load_ours(cls, config, tensors):
    """Build shape-only (as weights.load_* does) and fill from the torch state dict."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    weights.load_state_dict(model, tensors)
    return model


TEXT_CASES = {
    # OpenAI CLIP (SD 1.x): quick_gelu, legacy eos_token_id == 2 (pool at the largest token id)
    "quick_gelu_legacy_eos": dict(hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1),
    # OpenCLIP (SD 2.x / SDXL): exact gelu, pool at the first eos_token_id
    "gelu_eos_id": dict(hidden_act="gelu", eos_token_id=60, bos_token_id=59, pad_token_id=0),
}


def tiny_text_config(**overrides) -> transformers.CLIPTextConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=12, layer_norm_eps=1e-5)
    return transformers.CLIPTextConfig(**{**base, **overrides})


def token_batch(config: transformers.CLIPTextConfig, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences [bos, words..., eos, pad...] of different lengths, and their attention masks."""
    rng = np.random.default_rng(seed)
    eos = config.eos_token_id if config.eos_token_id != 2 else config.vocab_size - 1
    ids = np.full((3, length), config.pad_token_id, np.int64)
    mask = np.zeros((3, length), np.int64)
    for row, n_words in enumerate([length - 2, 3, 0]):
        words = rng.integers(3, min(eos, 58), size=n_words)
        seq = [config.bos_token_id, *words, eos]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_model_matches_transformers(case):
    config = tiny_text_config(**TEXT_CASES[case])
    ref = randomise(transformers.CLIPTextModel(config), seed=1)
    # transformers 5 names a bare CLIPTextModel's keys without the `text_model.` level SD checkpoints have
    tensors = torch_tensors(ref)
    assert not any(k.startswith("text_model.") for k in tensors)
    ours = load_ours(clip.CLIPTextModel, clip.CLIPTextConfig.from_dict(config.to_dict()),
                     clip.add_tower_prefix(tensors, "text_model"))
    ids, mask = token_batch(config, length=config.max_position_embeddings, seed=2)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, ids.astype(np.int32))

    assert got.last_hidden_state.shape == tuple(expected.last_hidden_state.shape)
    assert rel_l2(got.last_hidden_state, expected.last_hidden_state) < REL_TOL
    assert rel_l2(got.pooler_output, expected.pooler_output) < REL_TOL
    # hidden_states: embeddings + every layer; [-2] is SDXL's penultimate layer / clip-skip 1
    assert len(got.hidden_states) == len(expected.hidden_states) == config.num_hidden_layers + 1
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert rel_l2(mine, theirs) < REL_TOL
    # the pooled token really is the EOS token of each row (the rows have different lengths)
    eos_pos = mask.sum(axis=1) - 1
    np.testing.assert_array_equal(
        np.asarray(got.pooler_output), np.asarray(got.last_hidden_state)[np.arange(3), eos_pos]
    )


def test_text_model_padding_attention_mask_matches_transformers():
    config = tiny_text_config(**TEXT_CASES["gelu_eos_id"])
    ref = randomise(transformers.CLIPTextModel(config), seed=3)
    ours = load_ours(clip.CLIPTextModel, clip.CLIPTextConfig.from_dict(config.to_dict()),
                     torch_tensors(ref, prefix="text_model."))
    ids, mask = token_batch(config, length=9, seed=4)  # shorter than max_position_embeddings
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = nnx.jit(lambda m, x, a: m(x, a))(ours, ids.astype(np.int32), mask)
    valid = mask.astype(bool)  # padded query rows are garbage on both sides; compare real tokens
    assert rel_l2(np.asarray(got.last_hidden_state)[valid], expected.last_hidden_state.numpy()[valid]) < REL_TOL
    assert rel_l2(got.pooler_output, expected.pooler_output) < REL_TOL


def test_text_model_with_projection_matches_transformers():
    config = tiny_text_config(**TEXT_CASES["gelu_eos_id"])
    ref = randomise(transformers.CLIPTextModelWithProjection(config), seed=5)
    ours = load_ours(clip.CLIPTextModelWithProjection, clip.CLIPTextConfig.from_dict(config.to_dict()),
                     torch_tensors(ref))  # keys already start with text_model. / text_projection
    ids, _ = token_batch(config, length=config.max_position_embeddings, seed=6)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, ids.astype(np.int32))
    assert got.text_embeds.shape == (3, config.projection_dim)
    assert rel_l2(got.text_embeds, expected.text_embeds) < REL_TOL
    assert rel_l2(got.last_hidden_state, expected.last_hidden_state) < REL_TOL
    assert rel_l2(got.hidden_states[-2], expected.hidden_states[-2]) < REL_TOL


def tiny_vision_config(**overrides) -> transformers.CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=40, projection_dim=20, num_hidden_layers=2, num_attention_heads=2,
                num_channels=3, image_size=12, patch_size=4, layer_norm_eps=1e-5)
    return transformers.CLIPVisionConfig(**{**base, **overrides})


@pytest.mark.parametrize("projection", [False, True])
def test_vision_model_matches_transformers(projection):
    config = tiny_vision_config(hidden_act="gelu" if projection else "quick_gelu")
    ref_cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    our_cls = clip.CLIPVisionModelWithProjection if projection else clip.CLIPVisionModel
    ref = randomise(ref_cls(config), seed=7)
    tensors = clip.add_tower_prefix(torch_tensors(ref), "vision_model")  # a no-op for WithProjection's keys
    ours = load_ours(our_cls, clip.CLIPVisionConfig.from_dict(config.to_dict()), tensors)
    images = np.random.default_rng(8).normal(size=(2, 12, 12, 3)).astype(np.float32)  # NHWC
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, images)
    assert got.last_hidden_state.shape == (2, 1 + 9, 32)
    assert rel_l2(got.last_hidden_state, expected.last_hidden_state) < REL_TOL
    assert len(got.hidden_states) == len(expected.hidden_states) == config.num_hidden_layers + 1
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert rel_l2(mine, theirs) < REL_TOL
    if projection:
        assert rel_l2(got.image_embeds, expected.image_embeds) < REL_TOL
    else:
        assert rel_l2(got.pooler_output, expected.pooler_output) < REL_TOL


def test_add_tower_prefix_keeps_sd_keys_and_heads():
    sd_style = {"text_model.embeddings.token_embedding.weight": 1, "text_projection.weight": 2}
    assert clip.add_tower_prefix(sd_style, "text_model") == sd_style
    bare = {"embeddings.token_embedding.weight": 1, "final_layer_norm.bias": 3}
    assert clip.add_tower_prefix(bare, "text_model") == {
        "text_model.embeddings.token_embedding.weight": 1, "text_model.final_layer_norm.bias": 3}
    with pytest.raises(ValueError, match="tower"):
        clip.add_tower_prefix(bare, "text")


def test_configs_round_trip_through_transformers():
    text = clip.CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=24, projection_dim=8,
                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=10,
                               hidden_act="gelu", eos_token_id=99, bos_token_id=98, pad_token_id=0)
    theirs = transformers.CLIPTextConfig(**text.to_dict())
    assert clip.CLIPTextConfig.from_dict(theirs.to_dict()) == text
    vision = clip.CLIPVisionConfig(hidden_size=16, intermediate_size=24, projection_dim=8, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=8, patch_size=4)
    assert clip.CLIPVisionConfig.from_dict(transformers.CLIPVisionConfig(**vision.to_dict()).to_dict()) == vision
    # a full CLIPModel config.json nests both towers
    full = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict()).to_dict()
    assert clip.CLIPTextConfig.from_dict(full) == text
    assert clip.CLIPVisionConfig.from_dict(full) == vision


def test_bad_config_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextConfig.from_dict({"hidden_act": "swish"})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        clip.CLIPTextConfig.from_dict({"num_hidden_layers": "12"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        clip.CLIPVisionConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="model_type"):
        clip.CLIPTextConfig.from_dict({"model_type": "t5"})
    config = clip.CLIPTextConfig(vocab_size=20, hidden_size=8, intermediate_size=8, projection_dim=4,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=5)
    model = nnx.eval_shape(lambda: clip.CLIPTextModel(config, rngs=nnx.Rngs(0)))  # inputs are checked first
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, 6), np.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(np.zeros((1, 5), np.float32))
    vision_config = clip.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=8, patch_size=4)
    vision = nnx.eval_shape(lambda: clip.CLIPVisionModel(vision_config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        vision(np.zeros((1, 3, 8, 8), np.float32))  # NCHW by mistake


def test_bfloat16_compute_stays_close_to_float32():
    """dtype=bfloat16 (params float32) runs end to end; bf16 keeps ~3 significant digits per op, so over a few
    layers the relative error is ~1e-2, far below what a wrong computation would give (~1)."""
    config = tiny_text_config(**TEXT_CASES["gelu_eos_id"])
    ref = randomise(transformers.CLIPTextModel(config), seed=9)
    tensors = clip.add_tower_prefix(torch_tensors(ref), "text_model")
    ours_config = clip.CLIPTextConfig.from_dict(config.to_dict())
    full = load_ours(clip.CLIPTextModel, ours_config, tensors)
    half = nnx.eval_shape(lambda: clip.CLIPTextModel(ours_config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    weights.load_state_dict(half, tensors)
    ids, _ = token_batch(config, length=config.max_position_embeddings, seed=10)
    run = nnx.jit(lambda m, x: m(x).last_hidden_state)
    got = run(half, ids.astype(np.int32))
    assert got.dtype == jnp.bfloat16
    assert rel_l2(got.astype(jnp.float32), run(full, ids.astype(np.int32))) < 3e-2


# ----------------------------------------------------------------------------------------------------------
# Style-image encoders: image_embeds and penultimate hidden states, from full CLIPModel or tower folders
# ----------------------------------------------------------------------------------------------------------


def tiny_clip_model_config() -> transformers.CLIPConfig:
    """A full CLIPModel whose top-level projection_dim (12) differs from vision_config's (20): CLIPModel's
    visual_projection uses the top-level one."""
    text = tiny_text_config(**TEXT_CASES["quick_gelu_legacy_eos"]).to_dict()
    vision = tiny_vision_config().to_dict()
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)


def test_full_clip_model_folder_gives_image_embeds_and_penultimate_states(tmp_path):
    from fusion_jax import encoders

    ref = randomise(transformers.CLIPModel(tiny_clip_model_config()), seed=11)
    ref.save_pretrained(tmp_path / "clip")  # text_model.*, vision_model.*, visual_projection, text_projection, ...
    ours = encoders.load_clip_vision(tmp_path / "clip")
    assert isinstance(ours, clip.CLIPVisionModelWithProjection) and ours.config.projection_dim == 12
    images = np.random.default_rng(12).normal(size=(2, 12, 12, 3)).astype(np.float32)
    with torch.no_grad():
        vision = ref.vision_model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
        image_embeds = ref.visual_projection(vision.pooler_output)  # CLIPModel.get_image_features
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, images)
    assert got.image_embeds.shape == (2, 12)
    assert rel_l2(got.image_embeds, image_embeds) < REL_TOL
    assert rel_l2(got.hidden_states[-2], vision.hidden_states[-2]) < REL_TOL  # penultimate layer (IP-Adapter Plus)


def test_vision_tower_folder_loads_through_the_same_entry_point(tmp_path):
    from fusion_jax import encoders

    ref = randomise(transformers.CLIPVisionModelWithProjection(tiny_vision_config(hidden_act="gelu")), seed=13)
    ref.save_pretrained(tmp_path / "ip_adapter" / "image_encoder")  # IP-Adapter repos' layout
    ours = encoders.load_clip_vision(tmp_path / "ip_adapter")
    images = np.random.default_rng(14).normal(size=(1, 12, 12, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, images)
    assert rel_l2(got.image_embeds, expected.image_embeds) < REL_TOL
    assert rel_l2(got.hidden_states[-2], expected.hidden_states[-2]) < REL_TOL


def test_full_clip_model_stray_keys_are_reported(tmp_path):
    from safetensors.numpy import save_file

    from fusion_jax import encoders

    ref = transformers.CLIPModel(tiny_clip_model_config())
    ref.save_pretrained(tmp_path / "clip")
    tensors = weights.read_tensors(tmp_path / "clip" / "model.safetensors")
    save_file({**tensors, "adapter.weight": np.zeros(2, np.float32)}, str(tmp_path / "clip" / "model.safetensors"))
    with pytest.raises(weights.CheckpointMismatchError, match="adapter.weight"):
        encoders.load_clip_vision(tmp_path / "clip")


def test_real_vit_l14_config_gives_embeds_and_penultimate_shapes():
    """FaceStudio's style tower (openai/clip-vit-large-patch14's vision config), shape-only (no weights
    materialised): image_embeds and every hidden state for a 224 x 224 image."""
    width, layers, projection = 1024, 24, 768
    config = clip.CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, projection_dim=projection,
                                   num_hidden_layers=layers, num_attention_heads=16, image_size=224, patch_size=14,
                                   hidden_act="quick_gelu")
    model = nnx.eval_shape(lambda: clip.CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(0)))
    import jax

    out = nnx.eval_shape(lambda m, x: m(x, output_hidden_states=True), model,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.image_embeds.shape == (2, projection)
    assert len(out.hidden_states) == layers + 1
    assert out.hidden_states[-2].shape == (2, 1 + 16 * 16, width)
