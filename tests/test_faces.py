"""Face detection, alignment and embeddings (fusion_jax.data.faces).

Paths exercised, per test: alignment tests need no detector; `test_insightface_path_*` load tiny ONNX
models (tests/data_helpers.py) through insightface's real `FaceAnalysis` loading code; the
`test_opencv_fallback_*` tests run the Haar cascade shipped with OpenCV 4.x on a real photograph
(`skimage.data.astronaut()`).
"""

import numpy as np
import pytest
import skimage.data

from data_helpers import blob_face_landmarks, blob_photo, reference_embedding, write_tiny_insightface_models
from fusion_jax.data import faces
from fusion_jax.data.faces import (
    ARCFACE_TEMPLATE_112,
    FaceAnalyzer,
    FaceAnalyzerConfig,
    NoFaceError,
    align_face,
    alignment_template,
    box_from_landmarks,
    similarity_transform,
)


def _similarity_matrix(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 200, size=(5, 2))
    truth = _similarity_matrix(1.7, 0.4, 13.0, -8.0)
    target = np.c_[source, np.ones(5)] @ truth.T
    np.testing.assert_allclose(similarity_transform(source, target), truth, atol=1e-9)


def test_align_face_matches_insightface_norm_crop():
    """Independent reference: insightface's norm_crop (skimage similarity fit) at 112, no margin."""
    from insightface.utils import face_align

    image = skimage.data.astronaut()
    landmarks = np.array([[201.5, 100.5], [246.5, 102.5], [223.0, 124.0], [204.5, 145.7], [239.5, 147.3]], np.float32)
    ours = align_face(image, landmarks, size=112).astype(int)
    theirs = face_align.norm_crop(image, landmarks, image_size=112).astype(int)
    # Same transform up to float rounding: at most one grey level apart after bilinear sampling.
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("size,margin", [(112, 0.0), (256, 0.4)])
def test_aligned_crop_puts_landmarks_on_template(size, margin):
    """Dots drawn at landmarks of a rotated, scaled face land on the template points of the crop."""
    rng = np.random.default_rng(1)
    truth = _similarity_matrix(2.3, 0.3, 140.0, 60.0)  # template(112) -> photo
    landmarks = np.c_[ARCFACE_TEMPLATE_112, np.ones(5)] @ truth.T
    image = np.zeros((480, 480, 3), np.uint8)
    for index, (x, y) in enumerate(landmarks):
        image[int(round(y)) - 3 : int(round(y)) + 4, int(round(x)) - 3 : int(round(x)) + 4, index % 3] = 255
    crop = align_face(image, landmarks + rng.normal(0, 0.05, landmarks.shape), size=size, margin=margin)
    template = alignment_template(size, margin)
    for index, (x, y) in enumerate(template):
        channel = crop[..., index % 3].astype(float)
        window = channel[int(y) - 6 : int(y) + 7, int(x) - 6 : int(x) + 7]
        ys, xs = np.nonzero(window > 60)
        weights = window[ys, xs]
        centre = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum() + [int(x) - 6, int(y) - 6]
        # A 7 px dot scaled by size/(112*2.3*(1+margin)); its centroid is within a pixel of the template point.
        np.testing.assert_allclose(centre + 0.5, [x, y], atol=1.0)


def test_alignment_template_margin_zooms_about_centre():
    base, wide = alignment_template(200), alignment_template(200, margin=1.0)
    np.testing.assert_allclose(wide - 100.0, (base - 100.0) / 2.0)
    with pytest.raises(ValueError, match="margin"):
        alignment_template(112, margin=-0.1)


def test_box_from_landmarks_contains_the_landmarks():
    landmarks = blob_face_landmarks((100, 90), 80)
    box = box_from_landmarks(landmarks, (200, 200, 3))
    # The ArcFace crop of a face of side 80 at margin 0 is the blob square itself (template units).
    np.testing.assert_allclose(box, [60, 50, 140, 130], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# insightface path: tiny ONNX models through FaceAnalysis


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_insightface_models(tmp_path_factory.mktemp("buffalo_tiny"))


def test_insightface_path_detects_all_faces_largest_first(tiny_model_dir, monkeypatch):
    """insightface path: two faces in a 512 photo letterboxed to 256; boxes, landmarks, embeddings exact."""
    from insightface.utils import face_align

    def no_download(*args, **kwargs):
        raise AssertionError("insightface tried to download a model")

    monkeypatch.setattr("insightface.app.face_analysis.ensure_available", no_download)
    monkeypatch.setattr("insightface.model_zoo.model_zoo.download_onnx", no_download)
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=tiny_model_dir, det_size=(256, 256)))
    assert analyzer.backend == "insightface" and analyzer.embeddings_available

    small, large = ((416, 416), 128), ((192, 192), 256)  # detector sees sides 64 and 128 (scale 1/2)
    image = blob_photo(512, [(small[0], small[1], (255, 255, 225)), (large[0], large[1], (255, 255, 255))])
    found = analyzer.detect(image)
    assert len(found) == 2
    for face, (centre, side) in zip(found, [large, small]):  # largest first
        half = side / 2
        np.testing.assert_allclose(face.box, [centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], atol=1.0)
        expected_landmarks = blob_face_landmarks(centre, side)
        np.testing.assert_allclose(face.landmarks, expected_landmarks, atol=1.0)
        # Embedding: the tiny ArcFace is linear in the mean of the aligned crop; recompute it in NumPy
        # on insightface's own norm_crop at the true landmarks (landmark error < 1 px -> small drift).
        expected = reference_embedding(face_align.norm_crop(image, expected_landmarks, 112))
        assert face.embedding.shape == (512,)
        np.testing.assert_allclose(np.linalg.norm(face.embedding), 1.0, rtol=1e-5)
        assert float(face.embedding @ expected) > 0.999

    # The two faces' colours differ, and so do their embeddings.
    assert float(found[0].embedding @ found[1].embedding) < 0.999


def test_insightface_path_no_face_is_error_or_none(tiny_model_dir):
    """insightface path: a photo without a bright square has no face."""
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=tiny_model_dir, det_size=(128, 128)))
    empty = blob_photo(128, [])
    with pytest.raises(NoFaceError, match="empty.jpg"):
        analyzer.largest_face(empty, name="empty.jpg")
    assert analyzer.largest_face(empty, required=False) is None


def test_forced_insightface_without_models_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        FaceAnalyzer(FaceAnalyzerConfig(model_dir=str(tmp_path / "absent"), backend="insightface"))


def test_rejects_non_rgb_uint8_images(tiny_model_dir):
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=tiny_model_dir, det_size=(128, 128)))
    with pytest.raises(ValueError, match=r"RGB uint8"):
        analyzer.detect(np.zeros((64, 64), np.uint8))


# ------------------------------------------------------------------------------------------------
# OpenCV fallback on a real photograph

# Where the astronaut's (Eileen Collins') face is in skimage's 512x512 photo, read off the image:
# eyes near y 100, mouth near y 145, face centre near x 225.
ASTRONAUT_FACE_CENTRE = (225, 120)


def test_opencv_fallback_finds_the_astronaut_without_embeddings(tmp_path, caplog):
    """OpenCV Haar fallback (no insightface models in the folder): real photo, estimated landmarks."""
    with caplog.at_level("WARNING"):
        analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=str(tmp_path / "no_models")))
    assert analyzer.backend == "opencv"
    assert not analyzer.embeddings_available
    assert "embeddings unavailable" in analyzer.embeddings_unavailable_reason
    assert "embeddings unavailable" in caplog.text

    image = skimage.data.astronaut()
    face = analyzer.largest_face(image, name="astronaut")
    x0, y0, x1, y1 = face.box
    assert x0 < ASTRONAUT_FACE_CENTRE[0] < x1 and y0 < ASTRONAUT_FACE_CENTRE[1] < y1
    assert 60 < x1 - x0 < 200  # a face, not the whole photo
    assert face.embedding is None
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    with pytest.raises(RuntimeError, match="embeddings unavailable"):
        analyzer.embed(image, face.landmarks)


def test_opencv_fallback_reports_no_face_in_flat_image():
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
    flat = np.full((200, 200, 3), 128, np.uint8)
    assert analyzer.detect(flat) == []
    with pytest.raises(NoFaceError, match="flat.png"):
        analyzer.largest_face(flat, name="flat.png")


def test_opencv_5_without_cascades_gives_clear_error(monkeypatch):
    monkeypatch.delattr(faces.cv2, "CascadeClassifier")
    with pytest.raises(RuntimeError, match="opencv-python<5"):
        FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
