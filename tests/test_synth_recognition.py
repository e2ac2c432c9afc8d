"""The synthetic world's recognition embedding (fusion_jax/data/synth_recognition.py): the ArcFace stand-in."""

import dataclasses

import numpy as np

from fusion_jax.data import synth_recognition as rec
from fusion_jax.data import synthfaces
from fusion_jax.data.configs import PipelineConfig, SynthFaceConfig

FACES = SynthFaceConfig(image_size=32, recognition_embedding=True, num_train_identities=40, num_heldout_identities=8,
                        photos_per_identity=4)


def test_trait_features_stay_within_their_documented_range():
    """Every numeric range in NUMERIC_RANGES covers what sample_identity draws (else a feature leaves [-1, 1])."""
    features = np.stack([rec.trait_features(synthfaces.sample_identity(i)) for i in range(300)])
    assert features.shape[1] == len(rec.NUMERIC_RANGES) + 3 * len(rec.COLOURS) + sum(
        len(v) for v in rec.CATEGORIES.values()) + 4
    assert np.all(np.abs(features) <= 1.0 + 1e-9)
    assert np.all(features.std(axis=0) > 0.01)  # and every feature varies between people


def test_embedding_recognises_the_person_not_the_photo():
    """Unit norm; photos of one person agree far more than photos of two people, whatever the pose / lighting /
    expression; the deviation from the identity code has the configured norm (512-d noise: norm within ~5%)."""
    emb = np.stack([[synthfaces.render_face(i, p, FACES)["embedding"] for p in range(4)] for i in range(20)])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    sims = np.einsum("ipd,jqd->ijpq", emb, emb)
    same = np.mean([sims[i, i, p, q] for i in range(20) for p in range(4) for q in range(4) if p != q])
    other = np.mean([sims[i, j].mean() for i in range(20) for j in range(20) if i != j])
    assert same > 0.7 and abs(other) < 0.3 and same - other > 0.5, (same, other)
    # expected same-person cosine for unit code + noise of norm s, renormalised: 1 / (1 + s^2) (noise orthogonal)
    assert abs(same - 1 / (1 + FACES.embedding_noise ** 2)) < 0.05
    code = rec.identity_embedding(synthfaces.sample_identity(3))
    unnormalised_gap = emb[3] * np.sqrt(1 + FACES.embedding_noise ** 2) - code
    np.testing.assert_allclose(np.linalg.norm(unnormalised_gap, axis=-1), FACES.embedding_noise, rtol=0.1)


def test_embedding_is_a_pure_function_of_ids_and_seed_and_leaves_pixels_alone():
    a = synthfaces.render_face(5, 2, FACES)
    b = synthfaces.render_face(5, 2, FACES)
    plain = synthfaces.render_face(5, 2, dataclasses.replace(FACES, recognition_embedding=False))
    np.testing.assert_array_equal(a["embedding"], b["embedding"])
    assert a["has_embedding"] and not plain["has_embedding"] and not plain["embedding"].any()
    np.testing.assert_array_equal(a["image"], plain["image"])
    other_world = synthfaces.render_face(5, 2, dataclasses.replace(FACES, seed=1))
    assert float(a["embedding"] @ other_world["embedding"]) < 0.9  # another world: other people


def test_the_image_stream_carries_the_target_photos_embedding():
    """What IP-Adapter-FaceID trains on: batch 'face_embedding' is the target record's embedding."""
    from fusion_jax.data.pipeline import make_pipeline

    source = synthfaces.SynthFaces(FACES, "train")
    stream = make_pipeline(source, PipelineConfig(resolution=32, num_references=1, reference_size=32, batch_size=4,
                                                  num_parallel_calls=1, prefetch=1))
    batch = next(stream)
    stream.close()
    assert batch["has_face_embedding"].all()
    np.testing.assert_allclose(np.linalg.norm(batch["face_embedding"], axis=-1), 1.0, atol=1e-5)
    expected = {tuple(np.round(source[i]["embedding"], 5)) for i in range(len(source))}
    assert all(tuple(np.round(e, 5)) in expected for e in batch["face_embedding"])
