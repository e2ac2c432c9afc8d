"""Numbers of the reproduction harness against independent references.

- SimRef / SimTarget / Paste: closed-form cosines of embeddings built with known angles.
- Bootstrap over identities: coverage of a known mean on clustered data (an image-level bootstrap would
  under-cover there: images of one person share that person's offset).
- FID: (a) an independent NumPy formula, tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1 S2) (real and >= 0 for
  PSD S1, S2), no scipy.linalg.sqrtm; (b) pytorch-fid's own `calculate_frechet_distance`, executed from its source
  file when pytorch-fid is installed: its module imports torchvision at the top (which does not import here), so the
  function's source is taken out with `ast` and run with numpy / scipy.linalg only, as it needs nothing else.
- Face recognizer: an ArcFace-shaped ONNX model (tests/data_helpers: global average pool + linear map, which has a
  NumPy reference) routed by insightface, read through FaceMetric; bad --recognizer values give clear errors.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from data_helpers import (blob_face_landmarks, blob_photo, reference_embedding, write_tiny_detector,
                          write_tiny_insightface_models, write_tiny_recognition)
from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig, align_face
from fusion_jax.reproduction import dataset, face_metric, harness, protocol, stats


def test_identity_scores_match_closed_form():
    a, b, c = 0.3, 1.1, 0.7
    generated = np.array([2.0, 0.0, 0.0])  # not unit length: cosines must not care
    refs = np.array([[np.cos(a), np.sin(a), 0.0], [3 * np.cos(b), 0.0, 3 * np.sin(b)]])
    target = np.array([0.5 * np.cos(c), 0.0, -0.5 * np.sin(c)])
    s = stats.identity_scores(generated, refs, target)
    assert s["sim_ref"] == pytest.approx((np.cos(a) + np.cos(b)) / 2, abs=1e-12)
    assert s["sim_target"] == pytest.approx(np.cos(c), abs=1e-12)
    assert s["paste"] == pytest.approx((np.cos(a) + np.cos(b)) / 2 - np.cos(c), abs=1e-12)
    two_targets = stats.identity_scores(generated, refs, np.stack([target, [0.0, 1.0, 0.0]]))
    assert two_targets["sim_target"] == pytest.approx(np.cos(c) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="all-zero"):
        stats.identity_scores(np.zeros(3), refs, target)
    with pytest.raises(ValueError, match="widths differ"):
        stats.identity_scores(generated, refs[:, :2], target)


def test_bootstrap_over_identities_covers_known_mean():
    """95% intervals cover the true mean in about 95% of 200 clustered data sets (identity offsets sd 1, image
    noise sd 0.3, 30 identities x 6 images). An image-level bootstrap covers far less (checked as a contrast)."""
    rng = np.random.default_rng(0)
    mu, covered, naive_covered, trials = 0.4, 0, 0, 200
    for t in range(trials):
        offsets = rng.normal(0, 1.0, 30)
        values = (mu + offsets[:, None] + rng.normal(0, 0.3, (30, 6))).ravel()
        groups = np.repeat([f"id{i}" for i in range(30)], 6)
        mean, low, high = stats.bootstrap_mean_interval(values, groups, num_samples=500, seed=t)
        assert mean == pytest.approx(values.mean()) and low <= mean <= high
        covered += low <= mu <= high
        _, nlow, nhigh = stats.bootstrap_mean_interval(values, np.arange(len(values)).astype(str), num_samples=500,
                                                       seed=t)
        naive_covered += nlow <= mu <= nhigh
    # binomial(200, 0.95): sd 3 (1.5%); percentile intervals run slightly narrow at n = 30 identities
    assert 0.89 <= covered / trials <= 0.99, covered
    assert naive_covered / trials < 0.7, naive_covered  # ignoring the clustering under-covers badly


def test_bootstrap_edge_cases():
    assert stats.bootstrap_mean_interval([1.0, 3.0], ["a", "a"]) == (2.0, 2.0, 2.0)  # one identity: no spread
    mean, low, high = stats.bootstrap_mean_interval([np.nan, 1.0, 2.0, np.nan], ["a", "a", "b", "b"])
    assert mean == 1.5 and 1.0 <= low <= high <= 2.0  # NaN (no face) left out
    assert all(np.isnan(stats.bootstrap_mean_interval([np.nan], ["a"])))
    value, low, high = stats.bootstrap_statistic_interval(["a", "a", "b", "c"], lambda idx: float(len(idx)),
                                                          num_samples=30)
    assert value == 4.0 and 3.0 <= low <= high <= 6.0  # resampled groups of sizes 2, 1, 1


def _features(seed, n=40, d=6):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def _frechet_numpy_eigen(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None))))


def test_fid_matches_independent_numpy_formula():
    a, b = _features(1), _features(2) * 0.7
    ours = stats.fid(a, b)
    ref = _frechet_numpy_eigen(a, b)
    print(f"FID ours {ours:.10f} vs eigenvalue formula {ref:.10f}")
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)  # float64 both ways; sqrtm vs eig differ ~1e-12
    assert stats.fid(a, a) == pytest.approx(0.0, abs=1e-6)


def _pytorch_fid_frechet():
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = (Path(list(spec.submodule_search_locations)[0]) / "fid_score.py").read_text()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    from scipy import linalg

    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module([fn], []), "pytorch_fid/fid_score.py", "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def _pytorch_fid_algorithm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance restated (scipy sqrtm of the covariance product, eps * I added to
    both covariances when that is not finite, real part taken): used when pytorch-fid itself is not installed (it
    needs torchvision, which does not install beside this project's CPU torch)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_fid_matches_pytorch_fid_function():
    """Against pytorch-fid's own function when installed (read from its source: importing the package needs
    torchvision), else against its algorithm restated above."""
    reference = _pytorch_fid_frechet() or _pytorch_fid_algorithm
    for a, b in ((_features(3), _features(4)), (_features(5, n=4, d=6), _features(6, n=5, d=6))):  # 2nd: singular
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        assert stats.fid(a, b) == pytest.approx(float(reference(mu1, s1, mu2, s2)), rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Face recognizer
# ----------------------------------------------------------------------------------------------------------------


def test_face_metric_embedding_is_the_recognizers(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    write_tiny_recognition(folder / "w_tiny.onnx")
    metric = face_metric.FaceMetric(folder)  # no detector in the folder: the Haar fallback finds the face
    assert "w_tiny.onnx" in metric.name and "Haar" in metric.detector_name
    astronaut = skimage.data.astronaut()
    result = metric.analyze(astronaut)
    landmarks = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv")).largest_face(astronaut).landmarks
    crop = align_face(astronaut, landmarks, 112)
    np.testing.assert_array_equal(result.crop, crop)
    # insightface's ArcFaceONNX reads BGR, normalises (x - 127.5) / 127.5 and swaps to RGB: the NumPy linear model
    # on the RGB crop must give the same unit vector (float32 ONNX vs float64 NumPy)
    np.testing.assert_allclose(result.embedding, reference_embedding(crop), atol=1e-5)
    assert metric.analyze(np.full((120, 120, 3), 90, np.uint8)) is None
    # a single .onnx file works as well
    assert face_metric.FaceMetric(folder / "w_tiny.onnx").input_size == 112


def test_bad_recognizer_values_name_the_path(tmp_path):
    with pytest.raises(face_metric.RecognizerError, match=r"--recognizer .*nowhere: no such folder"):
        face_metric.FaceMetric(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(face_metric.RecognizerError, match=r"--recognizer .*empty: no insightface recognition model"):
        face_metric.FaceMetric(tmp_path / "empty")
    (tmp_path / "det").mkdir()
    write_tiny_detector(tmp_path / "det" / "det.onnx")
    with pytest.raises(face_metric.RecognizerError, match=r"det: no insightface recognition model .*det.onnx"):
        face_metric.FaceMetric(tmp_path / "det")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(face_metric.RecognizerError, match=r"x.onnx: cannot open as an ONNX model"):
        face_metric.FaceMetric(tmp_path / "bad")


def test_face_metric_with_insightface_detector_folder(tmp_path):
    """A buffalo_l-like folder (SCRFD-layout detector + recognizer): insightface detects, landmarks place the crop."""
    from insightface.utils import face_align

    metric = face_metric.FaceMetric(write_tiny_insightface_models(tmp_path / "models"), det_size=(256, 256))
    assert metric.detector_name == "insightface det_tiny.onnx" and "w_tiny.onnx" in metric.name
    small, large = ((416, 416), 128), ((192, 192), 256)
    image = blob_photo(512, [(small[0], small[1], (255, 255, 225)), (large[0], large[1], (255, 255, 255))])
    found = metric.analyze_all(image, limit=2)
    assert len(found) == 2
    for face, (centre, side) in zip(found, [large, small]):  # largest first
        expected = reference_embedding(face_align.norm_crop(image, blob_face_landmarks(centre, side), 112))
        assert float(face.embedding @ expected) > 0.999  # detector landmarks within a pixel of the true ones
    assert metric.analyze(image).box[2] - metric.analyze(image).box[0] == pytest.approx(256, abs=2)


def test_two_person_assignment_picks_each_persons_face():
    """Each person gets the detected face closest to their references; a missing face leaves one person out."""
    e = np.eye(4)
    faces_cache = {"a/r.png": dataset.PhotoFace("a/r.png", True, embedding=e[0]),
                   "b/r.png": dataset.PhotoFace("b/r.png", True, embedding=e[1])}
    plan = dataset.DataPlan([], [], {}, {})
    plan.faces = faces_cache
    people = [dataset.IdentitySplit("a", ["a/r.png"], []), dataset.IdentitySplit("b", ["b/r.png"], [])]
    face = lambda v: face_metric.FaceResult(np.zeros(4), np.zeros((2, 2, 3), np.uint8), np.asarray(v, float))  # noqa
    assert harness._assign_faces([face(0.9 * e[1] + 0.1 * e[2]), face(e[0])], people, plan) == [1, 0]
    assert harness._assign_faces([face(e[1])], people, plan) == [None, 0]
    assert harness._assign_faces([face(e[0])], people, plan) == [0, None]
    assert harness._assign_faces([], people, plan) == [None, None]
    assert harness._assign_faces([face(e[2]), face(e[0])], people[:1], plan) == [1]


def test_shipped_protocols_load_with_published_rows():
    from fusion_jax.config_files import resolve_config

    names = ["flashface_table1", "single_reference", "pulid_unsplash50", "two_person"]
    loaded = {n: protocol.load_protocol(resolve_config(f"reproduce/{n}")) for n in names}
    table1 = loaded["flashface_table1"]
    assert table1.num_references == 4 and table1.photos_needed == 5
    assert {r["method"]: (r["sim_target"], r["clip_t"], r["fid"]) for r in table1.published} == {
        "IP-Adapter": (25.7, 57.5, 121.1), "PhotoMaker": (40.0, 72.1, 84.2), "InstantID": (52.6, 62.7, 106.8),
        "FlashFace": (56.1, 74.2, 85.5)}  # the quote of FlashFace Table 1
    assert all(r["recognizer"] == "ArcFace-R101" for r in table1.published)
    assert loaded["two_person"].people_per_image == 2
    with pytest.raises(ValueError, match="published\\[0\\] has unknown key 'simtarget'"):
        protocol.ProtocolConfig(published=[{"method": "x", "simtarget": 1.0}])
