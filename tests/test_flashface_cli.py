"""`infer/generate.py --method flashface` on an exported FlashFace model, against `sampling.generate` called
directly with the same export, crops and settings (the method's flags, reference photos hook and preset reach the
sampler through the identity-method interface)."""

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from fusion_jax import cli_utils, references, sampling, weights
from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig, align_face
from fusion_jax.identity import base, export, flashface
from tests.test_references_cli import _load_cli, photos, tiny_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):  # noqa: F811
    pipeline = weights.load_pipeline(tiny_dir)
    cfg = flashface.FlashFaceConfig(reference_size=16)
    method = base.get("flashface")
    model = method.attach(pipeline.unet, cfg)
    out = tmp_path_factory.mktemp("flashface_export")
    export.export_identity(model, method, cfg, out)
    return out, cfg


def test_cli_matches_direct_generate(tiny_dir, photos, exported, tmp_path):  # noqa: F811
    folder, cfg = exported
    out = tmp_path / "out"
    astro = photos / "astronaut.png"
    cli = _load_cli()
    assert cli.main(["--model", str(tiny_dir), "--method", "flashface", "--identity-weights", str(folder),
                     "--prompt", "a person", "--steps", "2", "--batch-size", "1", "--seed", "3",
                     "--reference", str(astro), "--reference", str(astro), "--reference-guidance", "3.2",
                     "--reference-max-timestep", "750", "--guidance-rescale", "0.5",
                     "--face-box", "0.25,0.25,0.75,0.75", "--feature-strength", "1.1", "--out", str(out)]) == 0
    cli_image = np.asarray(Image.open(out / "00000.png"))
    settings = cli_utils.read_png_settings(out / "00000.png")
    assert settings["sampling"]["num_steps"] == 2 and settings["sampling"]["reference_guidance_max_timestep"] == 750
    assert settings["identity_method"] == "flashface" and settings["flashface"]["feature_strength"] == 1.1
    assert settings["reference_size"] == 16  # the method's crop size, not the image size

    analyzer = FaceAnalyzer(FaceAnalyzerConfig(backend="opencv"))
    image = np.asarray(Image.open(astro).convert("RGB"))
    crop = align_face(image, analyzer.largest_face(image).landmarks, 16, references.DEFAULT_MARGIN)
    refs = np.stack([crop, crop]).astype(np.float32)[None] / 127.5 - 1.0
    pipeline = weights.load_pipeline(tiny_dir)
    model, method, loaded_cfg = export.load_identity_model(folder)
    assert method.name == "flashface" and loaded_cfg == cfg
    pipeline = dataclasses.replace(pipeline, unet=model)
    run_cfg = dataclasses.replace(cfg, feature_strength=1.1, face_box=(0.25, 0.25, 0.75, 0.75))
    scfg = sampling.SamplingConfig(height=32, width=32, num_steps=2, reference_guidance_scale=3.2,
                                   reference_guidance_max_timestep=750, guidance_rescale=0.5)
    direct = sampling.generate(pipeline, sampling.tokenize(pipeline, ["a person"]),
                               uncond_ids=sampling.tokenize(pipeline, [""]),
                               key=jax.random.fold_in(jax.random.key(3), 0), cfg=scfg, references=refs,
                               identity_cfg=run_cfg)
    assert np.abs(cli_image.astype(int) - np.asarray(direct)[0].astype(int)).max() <= 1


def test_preset_flag_sets_the_released_settings():
    cli = _load_cli()
    args = cli.parse_args(["--prompt", "p", "--out", "o", "--preset", "code", "--feature-strength", "1.1"])
    cfg, scfg = base.get("flashface").apply_arguments(args, flashface.FlashFaceConfig(), sampling.SamplingConfig())
    code = flashface.preset("code")
    assert scfg == dataclasses.replace(sampling.SamplingConfig(), **code["sampling"])
    assert cfg.feature_strength == 1.1 and cfg.feature_strength_before_gate == code["flashface"]["feature_strength_before_gate"]


def test_cli_rejects_two_people_and_bad_box(tiny_dir, photos, exported, tmp_path):  # noqa: F811
    folder, _ = exported
    cli = _load_cli()
    common = ["--model", str(tiny_dir), "--method", "flashface", "--identity-weights", str(folder), "--prompt", "p",
              "--steps", "1", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="FlashFace takes one person"):
        cli.main(common + ["--reference", str(photos / "astronaut.png"), "--reference", f"1:{photos / 'mirror.png'}",
                           "--identity-box", "0,0,16,32", "--identity-box", "16,0,32,32"])
    with pytest.raises(SystemExit, match="--face-box"):
        cli.main(common + ["--reference", str(photos / "astronaut.png"), "--face-box", "0.2,0.2,1.4,0.9"])
    with pytest.raises(SystemExit, match="flat.png: found no face"):
        cli.main(common + ["--reference", str(photos / "flat.png")])
