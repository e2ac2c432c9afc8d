"""The miniature reproduction (infer/evaluate.py): equal-compute step planning, paired claim intervals against
NumPy, contradicting-prompt rows, the RESULTS.md section, reuse checks. The reduced path end to end is in
test_quickstart.py (it reuses the quickstart --fast run's stages)."""

import dataclasses
import os

import numpy as np
import pytest

from fusion_jax import miniature as mm
from fusion_jax import synth_reproduction as sr
from fusion_jax.reproduction.stats import bootstrap_mean_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_steps_spends_the_same_flops():
    flops = {"decoupled_fixed": 19.0e9, "single_token": 17.9e9, "flashface": 33.9e9}
    steps = sr.plan_steps(flops, 600)
    assert steps["decoupled_fixed"] == 600
    for name, n in steps.items():  # within half a step of the budget
        assert abs(n * flops[name] - 600 * flops["decoupled_fixed"]) <= 0.5 * flops[name]
    assert sr.plan_steps({"decoupled_fixed": 1.0, "flashface": 1e6}, 3)["flashface"] == 1  # at least one step


def test_paired_difference_is_the_mean_difference_with_its_bootstrap_interval():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(8), 4)
    a, b = rng.normal(size=32) + 0.5, rng.normal(size=32)
    d = sr.paired_difference(a, b, groups, seed=3)
    assert d["difference"] == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    _, low, high = bootstrap_mean_interval(a - b, groups.astype(str), seed=3)
    assert d["ci95"] == [low, high]
    assert sr.verdict({"ci95": [0.01, 0.2]}) == "held"
    assert sr.verdict({"ci95": [-0.01, 0.2]}) == "not held" and sr.verdict({"ci95": [-0.3, -0.1]}) == "not held"


def test_contradicting_rows_compare_the_prompt_with_the_first_reference_photo():
    from fusion_jax.data import synthfaces

    eval_set = mm.build_eval_set(synthfaces.SynthFaceConfig(image_size=32), 3, 4)
    e = synthfaces.ATTRIBUTE_NAMES.index("expression")
    rows = sr.contradicting_rows(eval_set, "expression")
    expected = [eval_set.labels[i, e] != eval_set.reference_labels[i, 0, e] for i in range(len(eval_set.captions))]
    assert rows.tolist() == expected and 0 < rows.sum() < len(rows)  # both kinds of rows occur


def test_replace_section_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# head\n\nintro\n")
    sr.replace_section(str(path), "first\n")
    sr.replace_section(str(path), "second\n")
    text = path.read_text()
    assert text.startswith("# head\n\nintro\n") and "second" in text and "first" not in text
    assert text.count(sr.RESULTS_BEGIN) == 1 and text.count(sr.RESULTS_END) == 1


def test_unknown_variant_names_the_key(tmp_path, capsys):
    from fusion_jax.cli.evaluate import main

    config = os.path.join(ROOT, "configs", "synthfaces", "experiment.yaml")
    assert main(["--config", config, f"out={tmp_path}", "variants=[decoupled_fixed,nope]"]) == 2
    err = capsys.readouterr().err
    assert "variants" in err and "nope" in err


def test_a_folder_trained_with_other_settings_is_not_reused(tmp_path):
    from fusion_jax.config import save_config

    cfg = sr.EvaluationConfig(out=str(tmp_path), base_steps=4, fusion_steps=4, widths=(8, 16))
    config = sr.variant_config(cfg, str(tmp_path), "decoupled_fixed", 4)
    sr.check_reusable(config)  # nothing there yet
    os.makedirs(os.path.join(config.workdir, "checkpoints", "4"))
    save_config(config, os.path.join(config.workdir, "config.yaml"))
    sr.check_reusable(config)  # the same run (resumed when cut short)
    assert config.workdir == os.path.join(str(tmp_path), "fusion_decoupled_fixed")  # never a quickstart's 'fusion'
    longer = sr.variant_config(cfg, str(tmp_path), "decoupled_fixed", 40)  # another budget: another LR schedule
    with pytest.raises(ValueError, match=r"fusion_decoupled_fixed holds a run with other settings \(.*"
                                         r"train.steps: 4 there, 40 here"):
        sr.check_reusable(longer)
    other = sr.variant_config(dataclasses.replace(cfg, batch_size=8), str(tmp_path), "decoupled_fixed", 4)
    with pytest.raises(ValueError, match=r"fusion_decoupled_fixed holds a run with other settings "
                                         r"\(data.batch_size: 16 there"):
        sr.check_reusable(other)


def test_the_varied_reference_ablation_differs_from_decoupled_fixed_only_in_its_references(tmp_path):
    """decoupled_fixed_varied is decoupled_fixed on 4 reference slots holding 1-4 distinct photos: nothing else."""
    cfg = sr.EvaluationConfig(out=str(tmp_path), base_steps=4, fusion_steps=4, widths=(8, 16))
    flat = {n: sr._flat(sr.variant_config(cfg, str(tmp_path), n, 4)) for n in ("decoupled_fixed",
                                                                             "decoupled_fixed_varied")}
    differ = {k for k in flat["decoupled_fixed"] if flat["decoupled_fixed"][k] != flat["decoupled_fixed_varied"][k]}
    assert differ == {"workdir", "data.pipeline.num_references", "data.pipeline.vary_references"}
    assert flat["decoupled_fixed_varied"]["data.pipeline.num_references"] == 4
    assert flat["decoupled_fixed_varied"]["data.pipeline.vary_references"] is True
    assert flat["decoupled_fixed"]["data.pipeline.vary_references"] is False


def test_the_full_caption_ablation_differs_from_facestudio_only_in_its_captions(tmp_path):
    """facestudio trains on captions that leave the background out of half the photos; its ablation states it in
    every caption: nothing else differs, and both read the folder's style tower."""
    cfg = sr.EvaluationConfig(out=str(tmp_path), base_steps=4, fusion_steps=4, widths=(8, 16))
    flat = {n: sr._flat(sr.variant_config(cfg, str(tmp_path), n, 4)) for n in ("facestudio",
                                                                             "facestudio_full_captions")}
    differ = {k for k in flat["facestudio"] if flat["facestudio"][k] != flat["facestudio_full_captions"][k]}
    assert differ == {"workdir", "data.synthfaces.caption_background_dropout"}
    assert flat["facestudio"]["data.synthfaces.caption_background_dropout"] == 0.5
    assert flat["facestudio_full_captions"]["data.synthfaces.caption_background_dropout"] == 0.0
    assert flat["facestudio"]["facestudio.style_encoder"] == (str(tmp_path / sr.STYLE_TOWER_DIR),)


def test_mean_face_box_is_the_held_out_photos_mean_inside_the_image():
    from fusion_jax.data import synthfaces

    faces = synthfaces.SynthFaceConfig(image_size=32)
    eval_set = mm.build_eval_set(faces, 2, 3)
    boxes = sr.mean_face_boxes(eval_set)
    assert boxes.shape == (6, 1, 4) and np.all(boxes == boxes[0])
    photos = [synthfaces.render_face(int(i), p, faces)["face_box"]
              for i in np.unique(eval_set.identity_ids) for p in mm.REFERENCE_PHOTOS]
    np.testing.assert_allclose(boxes[0, 0], np.mean(photos, axis=0), rtol=1e-5)
    x0, y0, x1, y1 = boxes[0, 0]
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32


def test_eval_set_offset_picks_later_held_out_identities_disjoint_from_the_reported_ones():
    """A settings sweep on `first_identity=100` never sees the identities the quickstart reports (the first ones)."""
    from fusion_jax.data import synthfaces

    faces = synthfaces.SynthFaceConfig(image_size=32)
    heldout = synthfaces.split_identity_ids(faces, "heldout")
    reported = mm.build_eval_set(faces, 2, 1)
    validation = mm.build_eval_set(faces, 2, 1, first_identity=100)
    assert validation.identity_ids.tolist() == [int(heldout[100]), int(heldout[101])]
    assert not set(reported.identity_ids) & set(validation.identity_ids)
    again = synthfaces.render_face(int(heldout[100]), mm.REFERENCE_PHOTOS[0], faces)["face_crop"]
    np.testing.assert_array_equal(validation.reference_crops[0, 0], again)
    with pytest.raises(ValueError, match="held-out"):
        mm.build_eval_set(faces, 2, 1, first_identity=len(heldout) - 1)
    with pytest.raises(ValueError, match="held-out"):
        mm.build_eval_set(faces, 1, 1, first_identity=-1)
