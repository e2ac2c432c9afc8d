"""Reference photos -> crops (fusion_jax.references) and the Face Fusion flags of infer/generate.py.

The CLI's images are checked against `sampling.generate` called directly on the same tiny pipeline with the
exported identity weights and crops made here from the detector and `align_face` (so any mix-up in the CLI's
grouping, padding, boxes, strengths, guidance settings or weight loading shows up as different pixels). Real
photos: skimage's astronaut (a face the Haar fallback finds), its mirror image, and a flat image (no face).
"""

import importlib.util
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fusion_jax import cli_utils, references, sampling, weights
from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig, align_face
from fusion_jax.experiment import export_face_fusion
from fusion_jax.identity import fusion
from fusion_jax.tiny import write_tiny_pipeline

FUSION_CFG = fusion.FusionConfig(combine="decoupled", strength=0.7)  # not the defaults: the CLI must read it


def _load_cli():
    script = Path(__file__).resolve().parents[1] / "infer" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_cli_refs", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.fixture(scope="module")
def cli():
    return _load_cli()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "mirror.png")
    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(folder / "flat.png")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_pipeline_refs")
    write_tiny_pipeline(path, seed=0)
    return path


def _trained_pipeline(tiny_dir, seed):
    """The tiny pipeline with identity projections whose value weights are changed (as if trained)."""
    pipeline = weights.load_pipeline(tiny_dir)
    fusion.attach_identity_projections(pipeline.unet, FUSION_CFG)
    rng = np.random.default_rng(seed)
    for block in pipeline.unet.transformer_blocks().values():
        kernel = block.attn2.to_v_ref.kernel
        kernel.set_value(kernel.get_value() + 0.5 * rng.standard_normal(kernel.get_value().shape).astype(np.float32))
    return pipeline


# ------------------------------------------------------------------------------------------------------------------
# fusion_jax.references: argument parsing and crops
# ------------------------------------------------------------------------------------------------------------------


def test_parse_and_group_references():
    assert references.parse_reference("a/b.png") == (0, Path("a/b.png"))
    assert references.parse_reference("2:x:y.png") == (2, Path("x:y.png"))
    groups = references.group_references(["1:b.png", "a.png", "0:c.png", "1:d.png"])
    assert groups == [[Path("a.png"), Path("c.png")], [Path("b.png"), Path("d.png")]]
    with pytest.raises(references.ReferenceError, match=r"--reference: .*no photo for identity \[1\]"):
        references.group_references(["0:a.png", "2:b.png"])


def test_boxes_and_strengths_validation():
    assert references.parse_box(" 1, 2,3.5,4 ") == (1.0, 2.0, 3.5, 4.0)
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,nan"):
        with pytest.raises(references.ReferenceError, match="--identity-box: expected x0,y0,x1,y1"):
            references.parse_box(bad)
    box = (0, 0, 10, 10)
    assert references.check_boxes([], 1, 32, 32) is None
    with pytest.raises(references.ReferenceError, match="--identity-box: 2 identity boxes but only 1 reference set"):
        references.check_boxes([box, box], 1, 32, 32)
    with pytest.raises(references.ReferenceError, match="--identity-box: 2 identities .* but no boxes"):
        references.check_boxes([], 2, 32, 32)
    with pytest.raises(references.ReferenceError, match=r"--identity-box #1 .* not a box inside the 32x24"):
        references.check_boxes([box, (20, 0, 33, 10)], 2, 24, 32)
    np.testing.assert_array_equal(references.check_boxes([box], 1, 32, 32), [box])
    assert references.parse_strengths(["1,0.5", "2"]) == [1.0, 0.5, 2.0]
    with pytest.raises(references.ReferenceError, match="--reference-strength: .* >= 0"):
        references.parse_strengths(["-1"])
    np.testing.assert_array_equal(references.strengths_per_identity([0.3], 3, 1.0), np.float32([0.3] * 3))
    np.testing.assert_array_equal(references.strengths_per_identity([], 2, 0.7), np.float32([0.7, 0.7]))
    with pytest.raises(references.ReferenceError, match="--reference-strength: 2 values for 3 identities"):
        references.strengths_per_identity([1.0, 2.0], 3, 1.0)


def test_reference_set_crops_pads_and_names_faceless_photo(photos):
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
    astronaut = np.asarray(Image.open(photos / "astronaut.png"))
    face = analyzer.largest_face(astronaut)
    expected = align_face(astronaut, face.landmarks, 24, 0.4).astype(np.float32) / 127.5 - 1
    ref = references.reference_set([[photos / "astronaut.png"], [photos / "mirror.png", photos / "astronaut.png"]],
                                   analyzer, 24, 0.4)
    assert ref.crops.shape == (2, 2, 24, 24, 3) and ref.crops.dtype == np.float32
    np.testing.assert_array_equal(ref.valid, [[True, False], [True, True]])
    np.testing.assert_allclose(ref.crops[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(ref.crops[1, 1], expected, atol=1e-6)
    assert [(r["identity"], r["index"]) for r in ref.records] == [(0, 0), (1, 0), (1, 1)]
    # the mirrored photo's face box is the mirror of the original's (Haar is not exactly mirror-symmetric)
    x0, _, x1, _ = ref.records[1]["face_box"]
    assert abs((512 - x1) - face.box[0]) < 16 and abs((512 - x0) - face.box[2]) < 16
    with pytest.raises(references.ReferenceError, match=r"--reference .*flat\.png: no face"):
        references.reference_set([[photos / "astronaut.png", photos / "flat.png"]], analyzer, 24)
    with pytest.raises(references.ReferenceError, match=r"--reference .*missing\.png: cannot read"):
        references.reference_set([[photos / "missing.png"]], analyzer, 24)


# ------------------------------------------------------------------------------------------------------------------
# infer/generate.py
# ------------------------------------------------------------------------------------------------------------------


def test_cli_errors_name_the_flag(cli, tiny_dir, photos, tmp_path):
    base = ["--model", str(tiny_dir), "--prompt", "a person", "--steps", "1", "--out", str(tmp_path / "o")]
    astro, mirror = str(photos / "astronaut.png"), str(photos / "mirror.png")
    cases = [
        (["--reference", str(photos / "flat.png")], r"--reference .*flat\.png: no face"),
        (["--reference", astro, "--identity-box", "0,0,8,8", "--identity-box", "8,0,16,8"],
         "--identity-box: 2 identity boxes but only 1 reference set"),
        (["--reference", astro, "--identity-box", "0,0,40,8"], r"--identity-box #0 .* not a box inside the 32x32"),
        (["--reference", f"0:{astro}", "--reference", f"1:{mirror}"], "--identity-box: 2 identities .* no boxes"),
        (["--reference", astro, "--reference-strength", "1,2"], "--reference-strength: 2 values for 1 identities"),
        (["--identity-box", "0,0,8,8"], "--identity-box given without any --reference"),
        (["--reference", astro, "--identity-weights", str(tmp_path)], "--identity-weights .*: no identity/"),
        (["--reference", astro, "--reference-size", "15"], "--reference-size 15: must be a multiple of the VAE.s downsampling factor 2"),
        (["--reference", astro, "--face-models", str(tmp_path)], "--face-models .*: no insightface"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli.main(base + extra)


def test_untrained_warning(cli, tiny_dir, photos, tmp_path):
    args = cli.parse_args(["--model", str(tiny_dir), "--prompt", "p", "--reference", str(photos / "astronaut.png"),
                           "--out", str(tmp_path)])
    groups, boxes, strengths = cli.check_reference_args(args)
    pipeline = weights.load_pipeline(tiny_dir)
    cfg = sampling.SamplingConfig(height=32, width=32)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        pipeline, identity, meta = cli.prepare_references(args, pipeline, cfg, groups, boxes, strengths)
    assert meta["identity_weights"].startswith("untrained")
    assert identity["references"].shape == (1, 1, 32, 32, 3) and identity["boxes"] is None
    assert any(b.attn2.has_identity_slot for b in pipeline.unet.transformer_blocks().values())


def test_cli_with_references_matches_direct_generate(cli, tiny_dir, photos, tmp_path):
    trained = _trained_pipeline(tiny_dir, seed=1)
    export = export_face_fusion(trained.unet, FUSION_CFG, tmp_path / "export")
    out = tmp_path / "out"
    astro, mirror = photos / "astronaut.png", photos / "mirror.png"
    boxes = [[0, 4, 16, 28], [14, 0, 32, 20]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # trained weights: no "untrained" warning
        assert cli.main(["--model", str(tiny_dir), "--prompt", "two people", "--steps", "1", "--batch-size", "1",
                         "--seed", "5", "--reference", str(astro), "--reference", f"1:{mirror}",
                         "--reference", f"1:{astro}", "--identity-box", "0,4,16,28", "--identity-box", "14,0,32,20",
                         "--reference-strength", "1.0", "--reference-strength", "0.5", "--reference-guidance", "3",
                         "--guidance-form", "disentangled", "--reference-max-timestep", "900",
                         "--identity-weights", str(export), "--out", str(out)]) == 0
    cli_image = np.asarray(Image.open(out / "00000.png"))

    # The same generation, assembled here.
    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))

    def crop(path):
        image = np.asarray(Image.open(path).convert("RGB"))
        return align_face(image, analyzer.largest_face(image).landmarks, 32, 0.4).astype(np.float32) / 127.5 - 1

    refs = np.stack([np.stack([crop(astro), crop(astro)]), np.stack([crop(mirror), crop(astro)])])[None]
    cfg = sampling.SamplingConfig(num_steps=1, height=32, width=32, reference_guidance="disentangled",
                                  reference_guidance_scale=3.0, reference_guidance_max_timestep=900)
    kwargs = dict(uncond_ids=sampling.tokenize(trained, [""]), key=jax.random.fold_in(jax.random.key(5), 0),
                  cfg=cfg, references=refs, reference_valid=np.array([[[True, False], [True, True]]]),
                  strength=np.float32([[1.0, 0.5]]), boxes=np.float32([boxes]), fusion_cfg=FUSION_CFG)
    direct = np.asarray(sampling.generate(trained, sampling.tokenize(trained, ["two people"]), **kwargs))[0]
    # Same inputs, same compiled function: identical up to one uint8 level (float reassociation at a boundary).
    assert np.abs(cli_image.astype(int) - direct.astype(int)).max() <= 1
    # The exported weights mattered: the untrained projections give another image (well beyond the one-level
    # rounding allowed above; one DDIM step of a tiny random UNet moves pixels by a few levels).
    fresh = weights.load_pipeline(tiny_dir)
    fusion.attach_identity_projections(fresh.unet, FUSION_CFG)
    untrained = np.asarray(sampling.generate(fresh, sampling.tokenize(fresh, ["two people"]), **kwargs))[0]
    change = np.abs(untrained.astype(int) - direct.astype(int))
    assert change.max() >= 3 and (change > 0).mean() > 0.1

    settings = cli_utils.read_png_settings(out / "00000.png")
    assert [(r["identity"], Path(r["path"]).name) for r in settings["references"]] == [
        (0, "astronaut.png"), (1, "mirror.png"), (1, "astronaut.png")]
    assert settings["identity_boxes"] == boxes and settings["reference_strength"] == [1.0, 0.5]
    assert settings["fusion"]["combine"] == "decoupled" and settings["identity_weights"] == str(export)
    assert settings["sampling"]["reference_guidance_scale"] == 3.0
    assert sorted(p.name for p in (out / "references").glob("*.png")) == ["id0_0.png", "id1_0.png", "id1_1.png"]
