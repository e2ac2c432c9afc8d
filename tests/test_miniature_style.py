"""The miniature style tower (FaceStudio's CLIP image encoder): its contrastive loss against a NumPy statement,
its export against transformers' PyTorch CLIP tower, its training folder (loaded as `facestudio.style_encoder`,
reused, refused when the settings differ); and the alpha sweep's style photos and fidelity scores."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import miniature as mm
from fusion_jax import miniature_style as ms
from fusion_jax import style_sweep, weights
from fusion_jax.data import synthfaces
from fusion_jax.data.configs import SynthFaceConfig
from fusion_jax.models import clip


def _numpy_clip_loss(img, txt, scale, same):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = np.exp(scale) * img @ txt.T

    def ce(lg, target):
        lg = lg - lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        return -(target / target.sum(axis=1, keepdims=True) * logp).sum(axis=1).mean()

    return 0.5 * (ce(logits, same) + ce(logits.T, same.T))


def test_contrastive_loss_matches_numpy_with_duplicate_captions():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    captions = np.array(["a", "b", "a", "c", "b", "d"])
    same = captions[:, None] == captions[None, :]
    got = ms.contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(2.0),
                              jnp.asarray(same))
    np.testing.assert_allclose(float(got), _numpy_clip_loss(img, txt, 2.0, same.astype(float)), rtol=1e-5)
    # with distinct captions it is CLIP's loss: the diagonal is the only positive
    eye = np.eye(6, dtype=bool)
    got = ms.contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(1.0),
                              jnp.asarray(eye))
    np.testing.assert_allclose(float(got), _numpy_clip_loss(img, txt, 1.0, eye.astype(float)), rtol=1e-5)


def test_saved_tower_is_a_transformers_clip_vision_model(tmp_path):
    """save_vision_encoder writes a folder transformers' CLIPVisionModelWithProjection loads, giving our
    image_embeds (float32: only summation order differs, 1e-5 relative)."""
    from transformers import CLIPVisionModelWithProjection

    config = ms.tower_config(ms.StyleTowerConfig(hidden_size=16, layers=2, heads=2, patch_size=8), 32, 12)
    ours = nnx.jit(lambda: clip.CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(5)))()
    weights.save_vision_encoder(ours, tmp_path / "tower")
    theirs = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "tower").eval()
    pixels = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
    got = np.asarray(ours(jnp.asarray(pixels)).image_embeds)
    assert got.shape == (3, 12)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    loaded = weights.load_vision_encoder(tmp_path / "tower", subfolder="")
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(pixels)).image_embeds), got)


FACES = SynthFaceConfig(image_size=32, num_train_identities=20, num_heldout_identities=6, photos_per_identity=16)


def test_train_style_tower_writes_a_facestudio_style_encoder(tmp_path):
    from fusion_jax.identity.facestudio import _load_style_tower

    pipeline = mm.write_miniature_pipeline(tmp_path / "pipeline", mm.MiniatureModelConfig(widths=(8, 16)))
    cfg = ms.StyleTowerConfig(hidden_size=16, layers=1, heads=2, steps=3, batch_size=8, eval_photos=16)
    logs = []
    record = ms.train_style_tower(tmp_path / "tower", pipeline, FACES, cfg, logs.append)
    assert record["steps"] == 3 and np.isfinite(record["final_loss"])
    assert set(record["heldout_background_retrieval"]) == {"colour", "pattern", "both"}
    tower, width = _load_style_tower(str(tmp_path / "tower"))
    assert width == mm.MiniatureModelConfig().text_width and tower.config.image_size == 32
    # the same settings reuse the folder; other settings are refused, naming it (nothing is overwritten)
    before = (tmp_path / "tower" / "model.safetensors").read_bytes()
    assert ms.train_style_tower(tmp_path / "tower", pipeline, FACES, cfg, logs.append) == record
    assert "reusing" in logs[-1]
    with pytest.raises(ValueError, match=r"tower holds a style tower trained with other settings"):
        ms.train_style_tower(tmp_path / "tower", pipeline, FACES, dataclasses.replace(cfg, steps=4))
    assert (tmp_path / "tower" / "model.safetensors").read_bytes() == before
    # a record written before a SynthFaceConfig field existed is that field's default: still the same settings
    saved = json.loads((tmp_path / "tower" / "training.json").read_text())
    del saved["settings"]["synthfaces"]["caption_background_dropout"]
    (tmp_path / "tower" / "training.json").write_text(json.dumps(saved))
    assert ms.train_style_tower(tmp_path / "tower", pipeline, FACES, cfg, logs.append)["steps"] == 3
    with pytest.raises(ValueError, match="other settings"):
        ms.train_style_tower(tmp_path / "tower", pipeline,
                             dataclasses.replace(FACES, caption_background_dropout=0.5), cfg)


def test_contradicting_styles_never_share_the_prompted_background():
    eval_set = mm.build_eval_set(FACES, 3, 4)
    images, labels = style_sweep.contradicting_styles(eval_set, FACES, seed=0)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    for name in style_sweep.STYLE_ATTRIBUTES:
        a = synthfaces.ATTRIBUTE_NAMES.index(name)
        assert (labels[:, a] != eval_set.labels[:, a]).all(), name
    # the face box is mid-grey (FaceStudio's training input), the background is not
    assert (images == 128).all(axis=-1).mean() > 0.05 and (images != 128).any(axis=-1).mean() > 0.3
    again, _ = style_sweep.contradicting_styles(eval_set, FACES, seed=0)
    np.testing.assert_array_equal(again, images)


def test_fidelity_scores_count_the_background_attributes():
    class Reader:  # reads fixed labels: the scores are then exact fractions
        def __init__(self, read):
            self.reader = lambda images: read

    eval_set = mm.build_eval_set(FACES, 1, 2)
    c, p = (synthfaces.ATTRIBUTE_NAMES.index(n) for n in style_sweep.STYLE_ATTRIBUTES)
    style = eval_set.labels.copy()
    style[:, c], style[:, p] = (style[:, c] + 1) % 6, (style[:, p] + 1) % 4
    read = eval_set.labels.copy()
    read[0, c] = style[0, c]  # row 0: colour as the style image, pattern as the prompt; row 1: all as the prompt
    scores = style_sweep.fidelity_scores(Reader(read), np.zeros((2, 32, 32, 3), np.uint8), eval_set, style)
    np.testing.assert_array_equal(scores["style_fidelity"], [0.5, 0.0])
    np.testing.assert_array_equal(scores["text_fidelity"], [0.5, 1.0])
