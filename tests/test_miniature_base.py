"""The Frechet distance of `synth_metrics` (the miniature base model's sample-quality measure) against closed
forms and an independent NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_jax import synth_metrics as sm
from fusion_jax.data import synthfaces as sf

# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------


def _reference_fd(mu1, s1, mu2, s2):
    """Independent of scipy.linalg.sqrtm: tr((s1 s2)^(1/2)) = tr((s1^(1/2) s2 s1^(1/2))^(1/2)), a symmetric PSD
    matrix whose square root is exact through its eigendecomposition (float64)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def _random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_fd_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # = 9.25 + 4 + 1
    assert sm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert sm.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-12)


def test_fd_commuting_covariances_closed_form():
    # same eigenvectors: FD = |dmu|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    l1, l2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    got = sm.frechet_distance(mu1, (q * l1) @ q.T, mu2, (q * l2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)  # sqrtm of a well-conditioned 6x6: ~1e-13 relative


def test_fd_general_covariances_match_reference():
    rng = np.random.default_rng(1)
    for d in (2, 16, 128):  # 128 = the identity embedder's width
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 2.0)
        assert sm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_fd_of_samples_uses_float64_unbiased_statistics():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    y = (rng.normal(size=(400, 8)) * 1.5 + 0.3).astype(np.float32)
    mu, cov = sm.feature_statistics(x)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(cov, (x64 - x64.mean(0)).T @ (x64 - x64.mean(0)) / (len(x) - 1), rtol=1e-12)
    y64 = y.astype(np.float64)
    ref = _reference_fd(x64.mean(0), np.cov(x64, rowvar=False), y64.mean(0), np.cov(y64, rowvar=False))
    assert sm.feature_frechet_distance(x, y) == pytest.approx(ref, rel=1e-9)


def test_fd_of_samples_converges_to_the_gaussians_distance():
    # N = 200k samples in 4-D: the estimate's bias is O(D / N) and its standard deviation about
    # 2 |dmu| sqrt(tr(s1 + s2) / N) ~ 0.01, so 0.05 absolute is 5 standard deviations.
    rng = np.random.default_rng(3)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, 0.0, 0.0])
    s1, s2 = np.diag([1.0, 1.0, 0.5, 2.0]), np.diag([4.0, 1.0, 0.5, 0.5])
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    expected = 1.0 + (1 - 2) ** 2 + (np.sqrt(2) - np.sqrt(0.5)) ** 2
    assert sm.feature_frechet_distance(x, y) == pytest.approx(expected, abs=0.05)


def test_fd_singular_covariances_are_finite():
    # fewer samples than dimensions (rank-deficient covariances): pytorch-fid's eps * I fallback
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.1
    fd = sm.feature_frechet_distance(x, y)
    mx, sx = x.mean(0), np.cov(x, rowvar=False)
    my, sy = y.mean(0), np.cov(y, rowvar=False)
    assert np.isfinite(fd)
    assert fd == pytest.approx(_reference_fd(mx, sx + 1e-6 * np.eye(32), my, sy + 1e-6 * np.eye(32)), abs=1e-3)


def test_fd_errors_name_the_argument():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        sm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        sm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="features"):
        sm.feature_statistics(np.zeros((1, 4)))


def test_embedder_fd_and_real_floor():
    faces = sf.SynthFaceConfig(image_size=32)

    def embed(images):  # a stand-in embedder: mean colour of the image (3 features)
        return np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(axis=1)

    ids = sf.split_identity_ids(faces, "heldout")[:12]
    floor = sm.real_frechet_floor(embed, faces, ids, np.arange(0, 4), np.arange(4, 8))
    a, _, _ = sm.render_photos(faces, ids, np.arange(0, 4))
    b, _, _ = sm.render_photos(faces, ids, np.arange(4, 8))
    assert floor == pytest.approx(_reference_fd(embed(a).mean(0), np.cov(embed(a), rowvar=False),
                                                embed(b).mean(0), np.cov(embed(b), rowvar=False)), rel=1e-9)
    with pytest.raises(ValueError, match="disjoint"):
        sm.real_frechet_floor(embed, faces, ids, np.arange(0, 4), np.arange(3, 6))
