"""The web demo's handlers without a browser (fusion_jax/demo): the page's values in, what the page shows out.

A good request's image is checked against `sampling.generate` called directly on the same pipeline with crops
made here from the detector and `align_face` (so a mix-up in the demo's upload handling, padding, strengths,
seed or settings shows up as different pixels), and its PNG's settings are read back. Each kind of bad upload
(not an image, no face, two faces, 50 MB) must give a message naming the person and the file, leave the session's
gallery as it was, and the next good request must still work. Photos: skimage's astronaut (a face OpenCV's Haar
fallback finds; that detector is forced so the test does not depend on insightface weights), two of it side by
side, a flat image.
"""

import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fusion_jax import cli_utils, sampling
from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig, align_face
from fusion_jax.demo import handlers
from fusion_jax.demo.engine import DemoConfig, DemoEngine, DemoError, PersonRequest, pad_reference_set
from fusion_jax.demo.uploads import UploadLimits

STEPS = 2  # with the page's default guidance (7.5, 2.0): the settings of tests/test_demo_browser.py (shared compile)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("demo_photos")
    astronaut = skimage.data.astronaut()[::2, ::2].copy()  # 256 px: the face is still found
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "mirror.jpg", quality=95)
    Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)).save(folder / "two_people.png")
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(folder / "flat.png")
    (folder / "notes.png").write_text("this is a text file, not a photo\n")
    big = folder / "big.jpg"  # a real JPEG followed by padding up to 50 MB (decoders stop at the end marker)
    big.write_bytes((folder / "mirror.jpg").read_bytes())
    os.truncate(big, 50 * 2**20)
    return folder


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    # `--model tiny`: the project's tiny random pipeline (written once per machine, as the demo's default)
    return DemoEngine(DemoConfig(model="tiny", method="face_fusion", face_detector="opencv", output_dir=str(out),
                                 limits=UploadLimits(max_megabytes=20)))


def _generate(engine, history, people, seed=3, prompt="a person on the moon"):
    """One Generate click with the page's values: people = [(files, box, strength)] for both slots."""
    people = list(people) + [(None, "", 1.0)] * (2 - len(people))
    return handlers.generate(engine, history, prompt, "blurry", "face_fusion", STEPS, seed, 7.5, 2.0,
                             "disentangled", "ddim", people)


def _crop(path, size):
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
    image = np.asarray(Image.open(path).convert("RGB"))
    return align_face(image, analyzer.largest_face(image).landmarks, size, 0.4).astype(np.float32) / 127.5 - 1


def test_good_request_matches_direct_generate_and_stores_settings(engine, photos):
    astro, mirror = str(photos / "astronaut.png"), str(photos / "mirror.jpg")
    history, gallery, crops, status = _generate(engine, [], [([astro, mirror], "", 0.8)])
    assert not status.startswith(handlers.ERROR_PREFIX), status
    assert len(history) == 1 and gallery == history
    path = Path(history[0][0])
    image = np.asarray(Image.open(path))
    assert image.shape == (engine.height, engine.width, 3) == (32, 32, 3)
    assert [caption for _, caption in crops] == ["person 1: astronaut.png", "person 1: mirror.jpg"]

    # The same generation assembled here: the two crops padded to 4 slots (the last two never attended).
    loaded = engine.method_for("face_fusion")
    pipeline = loaded.pipeline
    refs = np.stack([_crop(astro, 32), _crop(mirror, 32), _crop(mirror, 32), _crop(mirror, 32)])[None, None]
    np.testing.assert_allclose(np.stack([c for c, _ in crops]).astype(np.float32) / 127.5 - 1, refs[0, 0, :2],
                               atol=1e-6)
    cfg = sampling.SamplingConfig(num_steps=STEPS, guidance_scale=7.5, height=32, width=32,
                                  reference_guidance="disentangled", reference_guidance_scale=2.0)
    direct = np.asarray(sampling.generate(
        pipeline, sampling.tokenize(pipeline, ["a person on the moon"]),
        uncond_ids=sampling.tokenize(pipeline, ["blurry"]),
        key=jax.random.fold_in(jax.random.key(3), 0), cfg=cfg, references=refs,
        reference_valid=np.array([[[True, True, False, False]]]), strength=np.float32([[0.8]]),
        identity_cfg=loaded.method_cfg))[0]
    # same inputs, same compiled function: identical up to one uint8 level (float reassociation at a boundary)
    assert np.abs(image.astype(int) - direct.astype(int)).max() <= 1

    settings = cli_utils.read_png_settings(path)
    assert settings["prompt"] == "a person on the moon" and settings["negative_prompt"] == "blurry"
    assert settings["seed"] == 3 and settings["steps"] == STEPS and settings["guidance"] == 7.5
    assert settings["sampling"]["reference_guidance_scale"] == 2.0 and settings["reference_strength"] == [
        pytest.approx(0.8)]
    assert [(r["identity"], r["path"]) for r in settings["references"]] == [(0, "astronaut.png"), (0, "mirror.jpg")]
    assert settings["identity_method"] == "face_fusion" and settings["face_detector"] == "opencv"
    assert settings["identity_weights"].startswith("untrained") and "fusion" in settings
    assert "UNTRAINED" in status


def test_bad_uploads_give_messages_and_the_next_request_works(engine, photos):
    good = str(photos / "astronaut.png")
    cases = [
        ("notes.png", r"person 1, photo 'notes.png': not an image"),
        ("flat.png", r"person 1, photo 'flat.png': no face found by the opencv detector"),
        ("two_people.png", r"person 1, photo 'two_people.png': "),  # 2 faces (Haar may add a third): checked below
        ("big.jpg", r"person 1, photo 'big.jpg': 50.0 MB is over the 20 MB limit"),
    ]
    history = [("earlier.png", "an earlier result")]
    for name, message in cases:
        bad = str(photos / name)
        new_history, gallery, crops, status = _generate(engine, history, [([good, bad], "", 1.0)])
        assert status.startswith(handlers.ERROR_PREFIX) and message in status, (name, status)
        assert new_history == history and gallery == history and crops == []
        crops, status = handlers.preview(engine, "face_fusion", [([bad], "", 1.0), (None, "", 1.0)])
        assert crops == [] and message in status, (name, status)
        if name == "two_people.png":
            assert re.search(r"'two_people.png': [2-9] faces found; each reference photo must show only this person",
                             status), status
    # the second person's photos are checked too, and named as theirs
    _, _, _, status = _generate(engine, history, [([good], "0,0,0.5,1", 1.0),
                                                  ([str(photos / "flat.png")], "0.5,0,1,1", 1.0)])
    assert "person 2, photo 'flat.png': no face" in status
    # after all of that, a good request (the same shape: no new compile) still works
    new_history, _, crops, status = _generate(engine, history, [([good], "", 1.0)], seed=4)
    assert not status.startswith(handlers.ERROR_PREFIX), status
    assert len(new_history) == 2 and new_history[1] == history[0] and len(crops) == 1
    assert cli_utils.read_png_settings(new_history[0][0])["seed"] == 4


def test_bad_settings_and_boxes(engine, photos):
    good = str(photos / "astronaut.png")
    cases = [
        (dict(prompt="   "), "the prompt is empty"),
        (dict(seed="abc"), "seed must be a number"),
        (dict(seed=-1), "seed must be a whole number"),
        (dict(people=[([good], "0.1,0.2,0.3", 1.0)]), "person 1 box: expected x0,y0,x1,y1 as fractions"),
        (dict(people=[([good], "0.5,0.2,0.3,0.9", 1.0)]), "need 0 <= x0 < x1 <= 1"),
        (dict(people=[([good], "0,0,0.5,1", 1.0), ([good], "", 1.0)]), "person 2: with 2 people every person needs"),
        (dict(people=[([good] * 5, "", 1.0)]), "person 1: 5 photos uploaded; give 1 to 4"),
    ]
    for change, message in cases:
        values = dict(prompt="p", seed=0, people=[([good], "", 1.0)])
        values.update(change)
        people = values["people"] + [(None, "", 1.0)] * (2 - len(values["people"]))
        _, _, _, status = handlers.generate(engine, [], values["prompt"], "", "face_fusion", STEPS, values["seed"],
                                            7.5, 2.0, "disentangled", "ddim", people)
        assert status.startswith(handlers.ERROR_PREFIX) and message in status, (change, status)
    with pytest.raises(DemoError, match="method 'flashface' is not served here"):
        engine.method_for("flashface")


def test_two_people_boxes_in_pixels(engine, photos):
    """Two people: fraction boxes -> pixel boxes of the 32x32 image, each person's photos padded to 4 slots."""
    people = [PersonRequest([str(photos / "astronaut.png")], "0,0.25,0.5,1", 1.0),
              PersonRequest([str(photos / "mirror.jpg"), str(photos / "astronaut.png")], "0.5, 0, 1, 0.75", 0.5)]
    _, ref_set, strengths, boxes, fractions, records = engine.prepare_references(people, "face_fusion")
    np.testing.assert_array_equal(boxes, [[0, 8, 16, 32], [16, 0, 32, 24]])
    assert fractions == [[0, 0.25, 0.5, 1], [0.5, 0, 1, 0.75]]
    np.testing.assert_array_equal(strengths, np.float32([1.0, 0.5]))
    assert ref_set.crops.shape == (2, 4, 32, 32, 3)
    np.testing.assert_array_equal(ref_set.valid, [[True, False, False, False], [True, True, False, False]])
    np.testing.assert_allclose(ref_set.crops[1, 0], _crop(photos / "mirror.jpg", 32), atol=1e-6)
    assert [(r["identity"], r["path"]) for r in records] == [(0, "astronaut.png"), (1, "mirror.jpg"),
                                                           (1, "astronaut.png")]


def test_pad_reference_set_and_drawn_box():
    from fusion_jax.references import ReferenceSet

    crops = np.arange(2 * 2 * 1 * 1 * 3, dtype=np.float32).reshape(2, 2, 1, 1, 3)
    padded = pad_reference_set(ReferenceSet(crops, np.array([[True, True], [True, False]])), 4)
    np.testing.assert_array_equal(padded.valid, [[True, True, False, False], [True, False, False, False]])
    np.testing.assert_array_equal(padded.crops[:, 2:], np.repeat(crops[:, 1:], 2, axis=1))
    # a stroke covering rows 10..29 and columns 40..99 of a 100 x 200 canvas
    layer = np.zeros((100, 200, 4), np.uint8)
    layer[10:30, 40:100] = (224, 33, 138, 255)
    value = {"background": np.full((100, 200, 3), 255, np.uint8), "layers": [layer], "composite": None}
    assert handlers.box_from_drawing(value) == "0.200,0.100,0.500,0.300"
    assert handlers.box_from_drawing({"background": None, "layers": [np.zeros((4, 4, 4), np.uint8)]}) is None
    assert handlers.box_from_drawing(None) is None
