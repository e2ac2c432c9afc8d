"""The detail reader's labels and accuracy against the generator's ground truth (known cases). Its training is
not repeated here: at 32 px the default reader reads marks at the majority-class rate on held-out photos
(0.265 vs 0.285, benchmarks/RESULTS.md), so no accuracy bound could be defended."""

import numpy as np

from fusion_jax import synth_details as sd
from fusion_jax.data import synthfaces


def test_mark_labels_are_the_identities_traits_and_accuracy_counts_matches():
    faces = synthfaces.SynthFaceConfig()
    ids = np.arange(40)
    labels = sd.mark_labels(ids, faces)
    expected = [sd.DETAIL_KINDS.index(synthfaces.sample_identity(int(i), faces.seed).mark_kind) for i in ids]
    np.testing.assert_array_equal(labels, expected)
    assert set(labels.tolist()) == set(range(len(sd.DETAIL_KINDS)))  # 40 identities cover every kind

    images = np.zeros((len(ids), 32, 32, 3), np.uint8)
    perfect = lambda x: labels  # noqa: E731  (a reader that is always right)
    np.testing.assert_array_equal(sd.detail_accuracy(perfect, images, ids, faces), np.ones(len(ids)))
    shifted = lambda x: (labels + 1) % len(sd.DETAIL_KINDS)  # noqa: E731  (always wrong)
    assert sd.detail_accuracy(shifted, images, ids, faces).sum() == 0
    half = lambda x: np.where(np.arange(len(ids)) % 2 == 0, labels, (labels + 1) % 4)  # noqa: E731
    assert sd.detail_accuracy(half, images, ids, faces).mean() == 0.5
