"""Photo decoding, the `face_identities` TFDS builder (through its command line) and the celeb_a source.

Face detection here runs on the insightface path with the tiny ONNX models of tests/data_helpers.py
(bright squares are the "faces"), so where each face and its landmarks are is known exactly.
"""

import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from data_helpers import blob_face_landmarks, blob_photo, reference_embedding, write_tiny_insightface_models
from fusion_jax.data import images as image_io
from fusion_jax.data.celeba import CelebASource
from fusion_jax.data.face_identities import FaceIdentitiesSource, read_captions
from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig
from fusion_jax.data.sources import validate_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Decoding


def _pattern(height=24, width=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png_bytes(image, mode=None, **save):
    buffer = io.BytesIO()
    (Image.fromarray(image, mode) if mode else Image.fromarray(image)).save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def test_decode_honours_exif_orientation():
    raw = np.kron(_pattern(3, 5), np.ones((8, 8, 1), np.uint8))  # 24 x 40 blocks survive JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    Image.fromarray(raw).save(buffer, format="JPEG", quality=98, subsampling=0, exif=exif.tobytes())
    decoded = image_io.decode_image_bytes(buffer.getvalue()).astype(int)
    expected = np.rot90(raw, k=-1)
    assert decoded.shape == expected.shape == (40, 24, 3)
    assert np.abs(decoded - expected).mean() < 3  # JPEG error only
    assert np.abs(decoded - np.rot90(raw, k=1)).mean() > 30  # the opposite rotation is far off


def test_decode_converts_grayscale_16bit_cmyk_and_alpha():
    rgb = _pattern()
    gray = rgb[..., 0]
    np.testing.assert_array_equal(image_io.decode_image_bytes(_png_bytes(gray, "L")), np.repeat(gray[..., None], 3, -1))

    gray16 = (np.arange(24 * 40, dtype=np.uint32).reshape(24, 40) * 68).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray16).save(buffer, format="PNG")
    expected16 = np.rint(gray16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(image_io.decode_image_bytes(buffer.getvalue()), np.repeat(expected16[..., None], 3, -1))

    rgb16 = rgb.astype(np.uint16) * 257 + 100
    ok, encoded = cv2.imencode(".png", rgb16[..., ::-1])
    assert ok
    np.testing.assert_array_equal(image_io.decode_image_bytes(encoded.tobytes()), np.rint(rgb16 / 257.0).astype(np.uint8))

    cmyk = np.concatenate([rgb, rgb[..., :1] // 3], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buffer, format="TIFF")
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255.0
    assert np.abs(image_io.decode_image_bytes(buffer.getvalue()).astype(float) - expected).max() <= 1.0

    alpha = np.zeros((24, 40), np.uint8)
    alpha[:, 20:] = 255
    alpha[:, 10:20] = 128
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    decoded = image_io.decode_image_bytes(_png_bytes(rgba, "RGBA")).astype(float)
    expected = rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    assert np.abs(decoded - expected).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_corrupt_files_raise_error_naming_the_file(tmp_path, data):
    if data is None:
        data = _png_bytes(_pattern())[:60]  # truncated PNG
    path = tmp_path / "broken.png"
    path.write_bytes(data)
    with pytest.raises(image_io.CorruptImageError, match="broken.png"):
        image_io.read_image(path)


def test_captions_file_errors_name_the_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"file": "a/1.png", "caption": "fine"}\n\n{"file": "a/2.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:3"):
        read_captions(str(path))


# ------------------------------------------------------------------------------------------------
# Builder

# Per identity: list of (file name, how it is written, faces [(centre, side)]), all 128 px photos.
_WHITE = (255, 255, 255)
_PHOTOS = {
    "person_a": [("p0.png", "rgb", ((64, 64), 32)), ("p1.jpg", "exif_rot", ((40, 56), 32)), ("p2.png", "gray16", ((72, 48), 32))],
    "person_b": [("q0.png", "rgba", ((64, 72), 32)), ("q1.tif", "cmyk", ((56, 64), 32)), ("q2.jpg", "corrupt", None)],
    "person_c": [("r0.png", "rgb", ((64, 64), 64)), ("r1.png", "rgb", None)],  # one face left: single
    "person_d": [("s0.png", "rgb", ((64, 64), 32))],  # single photo
    "person_e": [("t0.png", "rgb", ((48, 48), 32)), ("t1.png", "rgb", ((80, 80), 32)), ("notes.txt", "text", None)],
}


def _write_photo(path, how, face, seed):
    image = blob_photo(128, [(face[0], face[1], _WHITE)] if face else [], seed=seed)
    if how == "rgb":
        Image.fromarray(image).save(path)
    elif how == "exif_rot":  # stored rotated 90 CCW with an EXIF tag that rotates it back
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(image[:, :96], k=1))).save(path, quality=95, exif=exif.tobytes())
        image = image[:, :96]
    elif how == "gray16":
        Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(path)
    elif how == "rgba":
        Image.fromarray(np.concatenate([image, np.full((128, 128, 1), 255, np.uint8)], -1), "RGBA").save(path)
    elif how == "cmyk":
        Image.fromarray(np.concatenate([255 - image, np.zeros((128, 128, 1), np.uint8)], -1), "CMYK").save(path)
    elif how == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    elif how == "text":
        path.write_text("not a photo")
    return image


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory):
    """Build through `train/build_dataset.py` (one subprocess); returns (data_dir, summary, expectations)."""
    root = tmp_path_factory.mktemp("photos")
    model_dir = write_tiny_insightface_models(tmp_path_factory.mktemp("models"))
    expected = {}
    for seed, (identity, photos) in enumerate(_PHOTOS.items()):
        (root / identity).mkdir()
        for name, how, face in photos:
            image = _write_photo(root / identity / name, how, face, seed)
            if face is not None:
                expected[f"{identity}/{name}"] = (image, face)
    captions = root / "captions.jsonl"
    captions.write_text(
        json.dumps({"file": "person_a/p0.png", "caption": "person a smiling"}) + "\n"
        + json.dumps({"file": "q0.png", "caption": "person b outdoors"}) + "\n"
    )
    data_dir = tmp_path_factory.mktemp("tfds")
    command = [
        sys.executable, os.path.join(REPO, "train", "build_dataset.py"), "--input", str(root), "--data-dir", str(data_dir),
        "--captions", str(captions), "--caption-template", "a photo of {identity}", "--model-dir", model_dir,
        "--det-size", "128", "--reference-size", "64", "--reference-margin", "0.25",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return str(data_dir), summary, expected


def test_build_summary_counts_each_kind_of_skip(built_dataset):
    _, summary, _ = built_dataset
    assert summary["examples"] == 7  # a: 3, b: 2 (one corrupt), e: 2
    assert summary["identities"] == 3
    assert summary["skipped_corrupt"] == 1
    assert summary["skipped_no_face"] == 1
    assert summary["skipped_single_photo_identities"] == 2  # person_c (one face left), person_d
    assert summary["skipped_files"] == {
        "corrupt": ["person_b/q2.jpg"], "no_face": ["person_c/r1.png"], "single_photo_identities": ["person_c", "person_d"],
    }
    assert summary["detector"] == "insightface" and summary["embeddings_available"]


def test_built_records_hold_faces_identities_and_captions(built_dataset):
    data_dir, _, expected = built_dataset
    source = FaceIdentitiesSource(data_dir)
    assert len(source) == 7
    files_by_identity = {}
    for index in range(len(source)):
        record = source[index]
        validate_record(record, where=f"record {index}")
        assert record["identity"] == source.identities[index]
        files_by_identity.setdefault(int(record["identity"]), set()).add(record["file"].split("/")[0])
        original, (centre, side) = expected.pop(record["file"])
        # EXIF orientation was applied: the stored photo has the orientation it was drawn in.
        assert record["image"].shape == original.shape
        assert np.abs(record["image"].astype(int) - original).mean() < 3  # stored as JPEG
        half = side / 2
        np.testing.assert_allclose(record["face_box"], [centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], atol=1.0)
        np.testing.assert_allclose(record["landmarks"], blob_face_landmarks(centre, side), atol=1.0)
        assert record["face_crop"].shape == (64, 64, 3)
        # The crop (margin 0.25) shows the whole white square, centred, with dark around it.
        assert record["face_crop"][26:38, 26:38].mean() > 240 and record["face_crop"][:3].mean() < 40
        assert record["has_embedding"]
        aligned = image_io.decode_image_bytes(_png_bytes(original))  # same pixels the builder saw
        from insightface.utils import face_align

        reference = reference_embedding(face_align.norm_crop(aligned, blob_face_landmarks(centre, side), 112))
        assert float(record["embedding"] @ reference) > 0.999
        captions = {"person_a/p0.png": "person a smiling", "person_b/q0.png": "person b outdoors"}
        assert record["caption"] == captions.get(record["file"], f"a photo of {record['file'].split('/')[0]}")
    # Left over: exactly the face photos of the skipped single-photo identities.
    assert sorted(expected) == ["person_c/r0.png", "person_d/s0.png"]
    # Each identity id holds the photos of exactly one folder.
    assert sorted(tuple(sorted(v)) for v in files_by_identity.values()) == [("person_a",), ("person_b",), ("person_e",)]
    np.testing.assert_array_equal(source.reference_crop(0), source[0]["face_crop"])


def test_pipeline_reads_the_built_dataset(built_dataset):
    """The built dataset is a face source for the training stream: references come from other photos."""
    from fusion_jax.data.pipeline import PipelineConfig, make_pipeline

    source = FaceIdentitiesSource(built_dataset[0])
    config = PipelineConfig(resolution=48, num_references=2, reference_size=32, batch_size=7, num_parallel_calls=2,
                            process_index=0, process_count=1)
    iterator = make_pipeline(source, config)
    batch = next(iterator)
    iterator.close()
    assert batch["references"].shape == (7, 2, 32, 32, 3)
    assert sorted(batch["source_index"].tolist()) == list(range(7))  # one epoch of 7 targets
    for target, refs in zip(batch["source_index"], batch["reference_source_index"]):
        assert target not in refs and np.all(source.identities[refs] == source.identities[target])
        files = {source[int(i)]["file"].split("/")[0] for i in [target, *refs]}
        assert len(files) == 1  # same identity folder


def test_opening_an_unbuilt_dataset_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_dataset.py"):
        FaceIdentitiesSource(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# celeb_a source


def _celeba_example(identity, centre, side, seed):
    image = blob_photo(218, [(centre, side, (255, 255, 255))], seed=seed)[:, :178].copy()
    marks = blob_face_landmarks(centre, side)
    names = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
    landmarks = {f"{n}_{axis}": np.int64(round(marks[i][j])) for i, n in enumerate(names) for j, axis in enumerate("xy")}
    return {"image": image, "landmarks": landmarks, "identity": {"Identity_No": np.int64(identity)}, "attributes": {}}


def test_celeba_source_gives_face_records_from_landmarks(tmp_path):
    """celeb_a examples in TFDS's layout; embeddings by the tiny ArcFace (insightface path)."""
    from insightface.utils import face_align

    examples = [_celeba_example(identity, (88, 104), 64, seed) for seed, identity in enumerate([7, 3, 7, 3, 9])]
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(model_dir=write_tiny_insightface_models(tmp_path / "m"), det_size=(128, 128)))
    source = CelebASource(examples, reference_size=112, reference_margin=0.0, analyzer=analyzer)
    np.testing.assert_array_equal(source.identities, [7, 3, 7, 3, 9])
    record = source[2]
    validate_record(record, where="celeba record")
    landmarks = record["landmarks"]
    np.testing.assert_allclose(landmarks, np.rint(blob_face_landmarks((88, 104), 64)))
    np.testing.assert_allclose(record["face_box"], [56, 72, 120, 136], atol=1.5)
    reference_crop = face_align.norm_crop(examples[2]["image"], landmarks, 112)
    assert np.abs(record["face_crop"].astype(int) - reference_crop).max() <= 1
    assert float(record["embedding"] @ reference_embedding(reference_crop)) > 0.9999
    assert record["identity"] == 7 and record["has_embedding"]
    assert not CelebASource(examples)[0]["has_embedding"]


def test_celeba_from_tfds_without_prepared_data_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="celeb_a is not prepared"):
        CelebASource.from_tfds(data_dir=str(tmp_path))
