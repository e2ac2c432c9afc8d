"""Identity/prompt metrics on constructed cases, and the synthetic-face embedder and reader on a tiny setup."""

import numpy as np
import pytest
from scipy.spatial.distance import cosine as scipy_cosine_distance

from fusion_jax import evaluation as ev
from fusion_jax import synth_metrics as sm
from fusion_jax.data import synthfaces as sf


def pixel_embedder(seed=0, dim=16):
    """A fixed random projection of the pixels: a deterministic embedder independent of our networks."""
    projection = np.random.default_rng(seed).normal(size=(8 * 8 * 3, dim))

    def embed(images):
        return images.reshape(len(images), -1).astype(np.float64) @ projection

    return embed


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_cosine_similarity_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    expected = [1 - scipy_cosine_distance(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(ev.cosine_similarity(a, b), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="all-zero"):
        ev.cosine_similarity(np.zeros((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        ev.cosine_similarity(a, b[:, :4])


def test_identical_images_give_similarity_one_and_paste_zero():
    embed, images = pixel_embedder(), random_images(4)
    ref = ev.sim_ref(embed, images, images)
    target = ev.sim_target(embed, images, np.stack([images, images], axis=1))
    np.testing.assert_allclose(ref, 1.0, atol=1e-12)
    np.testing.assert_allclose(target, 1.0, atol=1e-12)
    np.testing.assert_allclose(ev.paste(ref, target), 0.0, atol=1e-12)
    summary = ev.identity_metrics(embed, images, images, images)
    assert summary["sim_ref"] == pytest.approx(1.0) and summary["paste"] == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_embeddings_give_zero_and_references_are_averaged():
    # Embedder reading a one-hot code out of pixel (0, 0): image k embeds to basis vector e_k.
    def one_hot_embed(images):
        return np.eye(4)[images[:, 0, 0, 0].astype(int)]

    def coded(codes):
        images = np.zeros((len(codes), 2, 2, 3), np.uint8)
        images[:, 0, 0, 0] = codes
        return images

    generated = coded([0, 1])
    np.testing.assert_allclose(ev.sim_target(one_hot_embed, generated, coded([2, 3])), 0.0, atol=1e-12)
    # Two references each: one identical (similarity 1), one orthogonal (0) -> SimRef 0.5.
    references = np.stack([coded([0, 1]), coded([3, 2])], axis=1)
    np.testing.assert_allclose(ev.sim_ref(one_hot_embed, generated, references), [0.5, 0.5], atol=1e-12)


def test_sim_ref_and_sim_target_match_a_numpy_reference():
    embed = pixel_embedder(seed=3)
    generated, references, targets = random_images(3, 1), random_images(6, 2).reshape(3, 2, 8, 8, 3), random_images(3, 4)
    g = embed(generated)
    r = embed(references.reshape(6, 8, 8, 3)).reshape(3, 2, -1)
    t = embed(targets)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    expected_ref = np.einsum("nd,nrd->nr", unit(g), unit(r)).mean(axis=1)
    expected_target = np.sum(unit(g) * unit(t), axis=1)
    ref, target = ev.sim_ref(embed, generated, references), ev.sim_target(embed, generated, targets)
    np.testing.assert_allclose(ref, expected_ref, rtol=1e-10)
    np.testing.assert_allclose(target, expected_target, rtol=1e-10)
    np.testing.assert_allclose(ev.paste(ref, target), expected_ref - expected_target, rtol=1e-10)
    with pytest.raises(ValueError, match="references"):
        ev.sim_ref(embed, generated, references[:2])
    with pytest.raises(ValueError, match="generated"):
        ev.sim_ref(embed, generated[0], references)


def test_prompt_accuracy_counts_only_stated_attributes():
    expected = np.array([[0, 1, -1], [2, 1, -1], [1, 0, -1], [1, 1, -1]])
    read = np.array([[0, 1, 5], [2, 0, 5], [0, 0, 5], [1, 1, 5]])
    result = ev.prompt_accuracy(lambda images: read, random_images(4), expected, ["a", "b", "c"])
    assert result == {"a": 0.75, "b": 0.75, "mean": 0.75}
    with pytest.raises(ValueError, match="expected"):
        ev.prompt_accuracy(lambda images: read, random_images(3), expected)


def test_verification_pairs_and_threshold():
    identities = np.repeat(np.arange(5), 3)
    first, second, same = ev.verification_pairs(identities, 50, seed=0)
    assert same.sum() == 50 and (~same).sum() == 50
    assert np.array_equal(identities[first] == identities[second], same)
    assert np.all(first != second)
    sims = np.where(same, 0.8, 0.1) + np.random.default_rng(0).normal(0, 0.05, len(same))
    threshold = ev.best_threshold(sims, same)
    assert 0.1 < threshold < 0.8
    assert ev.verification_accuracy(sims, same, threshold) == 1.0
    assert ev.verification_accuracy(sims, same, 2.0) == 0.5  # everything "different": half the pairs right


TINY_SETUP = sm.SynthMetricSetup(
    faces=sf.SynthFaceConfig(image_size=32, num_train_identities=8, num_heldout_identities=4),
    train_identities=8, train_photos=12, eval_identities=4, eval_photos=3, verification_pairs=200,
    embedder_net=sm.ConvNetConfig(input_size=32, widths=(16, 32), out_features=32, center_crop=0.6),
    embedder_train=sm.TrainConfig(steps=120, batch_size=32, learning_rate=3e-3, steps_per_call=40, max_shift=2),
    reader_nets=(("face", sm.ConvNetConfig(input_size=32, widths=(16, 32), out_features=6, center_crop=0.6)),
                 ("scene", sm.ConvNetConfig(input_size=16, widths=(8, 16), out_features=10))),
    reader_train=sm.TrainConfig(steps=80, batch_size=32, learning_rate=3e-3, steps_per_call=40),
)


def test_tiny_metric_models_train_separate_identities_and_reload(tmp_path):
    metrics = sm.prepare_synthface_metrics(str(tmp_path), setup=TINY_SETUP, verbose=False)
    # Unseen photos of the 8 training identities: the embedder must tell them apart far above chance.
    images, identities, labels = sm.render_photos(TINY_SETUP.faces, np.arange(8), np.arange(20, 24))
    embeddings = metrics.embedder(images)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = embeddings @ embeddings.T
    same = identities[:, None] == identities[None, :]
    off_diagonal = ~np.eye(len(images), dtype=bool)
    # Measured over training seeds 0-3: similarity gap 0.89-0.94, nearest-neighbour accuracy 0.84-0.97
    # (chance: 3 of the 31 other photos are the same person, about 0.1).
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.5
    nearest = np.where(off_diagonal, similarity, -np.inf).argmax(axis=1)
    assert np.mean(identities[nearest] == identities) > 0.7
    assert metrics.report["verification"]["verification_accuracy"] > 0.6  # held-out ids: 4 people, tiny net

    read = metrics.reader(images)
    assert read.shape == labels.shape and np.all((read >= 0) & (read < [len(v) for v in sf.ATTRIBUTE_VALUES.values()]))

    # The cache: a second call loads the same models (identical outputs) instead of training.
    reloaded = sm.prepare_synthface_metrics(str(tmp_path), setup=TINY_SETUP, verbose=False)
    np.testing.assert_array_equal(reloaded.embedder(images), embeddings)
    np.testing.assert_array_equal(reloaded.reader(images), read)
    assert reloaded.report == metrics.report
    with pytest.raises(ValueError, match="expected a 'synthface_attribute_reader'"):
        sm.AttributeReader.load(str(tmp_path / sm.EMBEDDER_FILE))


def test_reader_accuracy_on_heldout_identities():
    """A small reader trained on 400 photos of 40 train identities, scored on 20 held-out identities."""
    faces = sf.SynthFaceConfig(image_size=32)
    images, _, labels = sm.render_photos(faces, np.arange(40), np.arange(10))
    test_images, _, test_labels = sm.render_photos(faces, np.arange(2000, 2020), np.arange(4))
    nets = {"face": sm.ConvNetConfig(input_size=32, widths=(16, 32), out_features=6, center_crop=0.6),
            "scene": sm.ConvNetConfig(input_size=16, widths=(8, 16), out_features=10)}
    reader = sm.train_attribute_reader(images, labels, nets, sm.TrainConfig(steps=150, batch_size=32,
                                                                            learning_rate=3e-3))
    accuracy = ev.prompt_accuracy(reader, test_images, test_labels, sf.ATTRIBUTE_NAMES)
    chance = {name: 1 / len(values) for name, values in sf.ATTRIBUTE_VALUES.items()}
    # Measured on this setup: expression ~0.4, gaze ~0.5, colour ~0.96, pattern ~0.4 (80 test photos, so
    # +-0.05 noise); the full-size reader of prepare_synthface_metrics reaches 0.85-1.0 on each.
    assert accuracy["background_colour"] > 0.85
    assert accuracy["mean"] > np.mean(list(chance.values())) + 0.15
    # The analytic colour reader needs no training and is exact on synthetic photos.
    np.testing.assert_array_equal(sm.read_background_colour(test_images), test_labels[:, 2])


def test_random_shift_is_an_edge_padded_translation():
    import jax

    images = np.random.default_rng(0).integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    shifted = np.asarray(sm.random_shift(jax.numpy.asarray(images), jax.random.key(0), 2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    found = []
    for n in range(len(images)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(padded[n, dy:dy + 10, dx:dx + 12], shifted[n])]
        assert matches, f"image {n} is not a translation of the input by at most 2 pixels"
        found.append(matches[0])
    assert len(set(found)) > 1, "offsets are drawn per image"


def test_embedder_input_checks():
    with pytest.raises(ValueError, match="identities"):
        sm.train_identity_embedder(random_images(4), np.zeros(3))
    labels = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="exactly once"):
        sm.train_attribute_reader(random_images(4), labels, {"face": sm.DEFAULT_READER_NETS["face"]})
    with pytest.raises(ValueError, match="unknown reader groups"):
        sm.train_attribute_reader(random_images(4), labels, {"hair": sm.DEFAULT_READER_NETS["face"]})
    with pytest.raises(ValueError, match="float images must lie in"):
        sm._as_uint8_range(np.full((1, 8, 8, 3), 2.0))
