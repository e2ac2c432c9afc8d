"""Synthetic faces: determinism, record contract, caption round trip, geometry of landmarks and crops."""

import itertools

import cv2
import numpy as np
import pytest

from fusion_jax.data import sources
from fusion_jax.data import synthfaces as sf

CFG = sf.SynthFaceConfig(image_size=64, num_train_identities=20, num_heldout_identities=5, photos_per_identity=3)


def test_same_ids_and_seed_give_identical_bytes_and_other_photos_differ():
    first = sf.render_face(7, 2, CFG)
    again = sf.render_face(7, 2, CFG)
    for key in ("image", "face_crop", "face_box", "landmarks", "attribute_labels"):
        assert first[key].tobytes() == again[key].tobytes(), key
    assert first["caption"] == again["caption"]

    other_photo = sf.render_face(7, 3, CFG)
    # Pose is continuous and drawn per photo: landmarks move by a visible amount.
    assert np.abs(other_photo["landmarks"] - first["landmarks"]).max() > 0.5
    assert sf.sample_identity(7) == sf.sample_identity(7)
    assert sf.sample_identity(7) != sf.sample_identity(8)
    other_seed = sf.render_face(7, 2, sf.SynthFaceConfig(image_size=64, seed=1))
    assert other_seed["image"].tobytes() != first["image"].tobytes()


@pytest.mark.parametrize("size", [64, 128])
def test_source_protocol_and_record_contract(size):
    cfg = sf.SynthFaceConfig(image_size=size, crop_size=size // 2, num_train_identities=4,
                             num_heldout_identities=2, photos_per_identity=3)
    train, heldout = sf.SynthFaces(cfg, "train"), sf.SynthFaces(cfg, "heldout")
    assert len(train) == 12 and len(heldout) == 6
    assert train.identities.dtype == np.int64 and train.identities.shape == (12,)
    assert set(train.identities.tolist()).isdisjoint(heldout.identities.tolist())
    record = train[5]
    sources.validate_record(record)  # the data pipeline's own check of the face-record contract
    assert record["identity"] == train.identities[5] == 1 and record["photo_id"] == 2
    assert record["image"].dtype == np.uint8 and record["image"].shape == (size, size, 3)
    assert record["face_crop"].dtype == np.uint8 and record["face_crop"].shape == (size // 2, size // 2, 3)
    assert record["face_box"].dtype == np.float32 and record["face_box"].shape == (4,)
    assert record["landmarks"].dtype == np.float32 and record["landmarks"].shape == (5, 2)
    assert record["embedding"].shape == (512,) and not record["embedding"].any() and not record["has_embedding"]
    x0, y0, x1, y1 = record["face_box"]
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    inside = (record["landmarks"] >= [x0, y0]) & (record["landmarks"] <= [x1, y1])
    assert inside.all(), "every landmark lies inside the face box"
    assert sf.parse_caption(record["caption"]).as_dict() == record["attributes"]
    assert np.array_equal(sf.PromptAttributes(**record["attributes"]).labels(), record["attribute_labels"])
    assert train[-1]["identity"] == 3
    with pytest.raises(IndexError, match="out of range"):
        train[12]


def test_caption_round_trip_over_every_attribute_combination():
    choices = [values + (None,) for values in sf.ATTRIBUTE_VALUES.values()]
    for combo in itertools.product(*choices):
        attributes = sf.PromptAttributes(*combo)
        assert sf.parse_caption(sf.build_caption(attributes)) == attributes
        assert sf.PromptAttributes.from_labels(attributes.labels()) == attributes
    example = sf.PromptAttributes("smiling", "left", "blue", "striped")
    assert sf.build_caption(example) == "a person smiling, looking left, on a striped blue background"


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="expression"):
        sf.PromptAttributes(expression="angry")
    with pytest.raises(ValueError, match="image_size"):
        sf.SynthFaceConfig(image_size=8)
    with pytest.raises(ValueError, match="split"):
        sf.SynthFaces(CFG, "test")
    with pytest.raises(ValueError, match="unknown background word"):
        sf.parse_caption("a person on a shiny blue background")


def test_chosen_attributes_are_rendered_and_keep_the_scene():
    base = sf.render_face(3, 1, CFG, sf.PromptAttributes("neutral", "camera", "red", "plain"))
    recoloured = sf.render_face(3, 1, CFG, sf.PromptAttributes("neutral", "camera", "blue", "plain"))
    assert base["caption"] == "a person with a neutral expression, looking at the camera, on a plain red background"
    # Same photo id: identical pose, only the background changes.
    assert np.array_equal(base["landmarks"], recoloured["landmarks"])
    corner_red, corner_blue = base["image"][:6, :6].reshape(-1, 3).mean(0), recoloured["image"][:6, :6].reshape(-1, 3).mean(0)
    assert corner_red[0] > 2 * corner_red[2] and corner_blue[2] > 2 * corner_blue[0]


def _nose_offset_along_eyes(record):
    """Signed nose-tip offset from the eye midpoint along the eye axis, in eye distances (rotation removed)."""
    left_eye, right_eye, nose = record["landmarks"][:3]
    axis = right_eye - left_eye
    return float(np.dot(nose - (left_eye + right_eye) / 2, axis) / np.dot(axis, axis))


def test_gaze_and_expression_move_the_landmarks_the_right_way():
    offsets = {g: _nose_offset_along_eyes(sf.render_face(4, 0, CFG, sf.PromptAttributes(gaze=g))) for g in sf.GAZES}
    assert offsets["left"] < -0.1 and offsets["right"] > 0.1 and abs(offsets["camera"]) < 0.02
    widths = {e: np.linalg.norm(np.subtract(*sf.render_face(4, 0, CFG, sf.PromptAttributes(expression=e))["landmarks"][3:]))
              for e in sf.EXPRESSIONS}
    assert widths["smiling"] > widths["neutral"] > widths["surprised"]


@pytest.mark.parametrize("identity,photo", [(0, 0), (11, 5), (2, 9)])
def test_landmarks_match_the_traits_and_the_crop_is_aligned(identity, photo):
    """Independent check of the geometry: landmarks follow the identity's face-unit layout under one similarity
    transform (eye axis angle = photo rotation), and warping the image by that transform reproduces the crop."""
    cfg = sf.SynthFaceConfig(image_size=128, crop_size=64)
    attributes = sf.PromptAttributes(expression="neutral", gaze="camera", background_pattern="plain")
    record = sf.render_face(identity, photo, cfg, attributes)
    traits, params = sf.sample_identity(identity), sf.sample_photo(identity, photo, 0, attributes)
    units = np.array([
        [-traits.eye_spacing, traits.eye_y], [traits.eye_spacing, traits.eye_y], [0, traits.eye_y + traits.nose_length],
        [-traits.mouth_width, traits.mouth_y + 0.02], [traits.mouth_width, traits.mouth_y + 0.02]])
    left_eye, right_eye = record["landmarks"][:2]
    angle = np.arctan2(*(right_eye - left_eye)[::-1])
    np.testing.assert_allclose(angle, params.rotation, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(right_eye - left_eye),
                               2 * traits.eye_spacing * params.scale * cfg.image_size, rtol=1e-4)

    # Where those face-unit points sit in the aligned crop, in pixel-index coordinates.
    crop = cfg.face_crop_size
    in_crop = units * crop / cfg.crop_extent + [crop / 2, crop / 2 + 0.12 * crop / cfg.crop_extent] - 0.5
    matrix, _ = cv2.estimateAffinePartial2D(record["landmarks"].astype(np.float64), in_crop)
    np.testing.assert_allclose(cv2.transform(record["landmarks"][None].astype(np.float64), matrix)[0], in_crop,
                               atol=1e-3)
    warped = cv2.warpAffine(record["image"], matrix, (crop, crop), flags=cv2.INTER_AREA,
                            borderMode=cv2.BORDER_REPLICATE)
    # The crop is cut from the supersampled picture, the warp from the 128-pixel one: they differ by resampling
    # only (measured 0.6-1.5 grey levels on average); a crop off by one pixel differs by 4-9.
    difference = np.abs(warped.astype(float) - record["face_crop"].astype(float))
    assert difference[4:-4, 4:-4].mean() < 2.5


def test_caption_background_dropout_leaves_the_background_out_of_some_captions_only():
    """A fraction of photos (drawn once per photo) keep their background in the image but not in the caption;
    every other byte of the record is what the default config renders."""
    dropped = sf.SynthFaceConfig(image_size=32, caption_background_dropout=0.5)
    full = sf.SynthFaceConfig(image_size=32)
    states = []
    for identity, photo in itertools.product(range(10), range(8)):
        a, b = sf.render_face(identity, photo, dropped), sf.render_face(identity, photo, full)
        assert a["image"].tobytes() == b["image"].tobytes() and a["attributes"] == b["attributes"]
        stated = sf.parse_caption(a["caption"]).as_dict()
        expected = dict(b["attributes"])
        if stated["background_colour"] is None:
            expected.update(background_colour=None, background_pattern=None)
        assert stated == expected
        assert sf.render_face(identity, photo, dropped)["caption"] == a["caption"]  # fixed per photo
        states.append(stated["background_colour"] is not None)
    assert 0.3 < np.mean(states) < 0.7  # 80 photos at p = 0.5
    assert all(sf.parse_caption(sf.render_face(i, 0, sf.SynthFaceConfig(
        image_size=32, caption_background_dropout=1.0))["caption"]).background_colour is None for i in range(5))
    with pytest.raises(ValueError, match="caption_background_dropout"):
        sf.SynthFaceConfig(caption_background_dropout=1.5)
