"""The reproduction harness end to end (infer/reproduce.py -> fusion_jax.cli.reproduce) on real photos.

The data folder is made here from a real photograph (skimage's astronaut): crops and mirror images as identities,
a photo without a face (skimage's coffee) inside an identity, and a one-photo identity. Faces are found by the
OpenCV Haar fallback of fusion_jax.data.faces (the mechanism tests/test_references_cli.py uses: the tiny random
recognizer folder of `--metric-models tiny` has no detector), generation is the project's tiny random pipeline with
Face Fusion's (untrained) modules. One job's image is put in place before the first run (a real face, so the
measuring path sees a face it can check against NumPy; the tiny pipeline's 32 px images have none, which the
table must count): the harness must keep it (resume) and measure it.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from fusion_jax import cli_utils
from fusion_jax.cli import reproduce

ASTRO = skimage.data.astronaut()
PLACED = np.ascontiguousarray(ASTRO[10:310, 90:390][:, ::-1])  # a face photo standing in for a generated image


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro_data")
    photos = {
        "anna": {"1_full.png": ASTRO, "2_crop.png": ASTRO[20:300, 100:380], "3_small.png": ASTRO[::2, ::2],
                 "4_coffee.png": skimage.data.coffee()},
        "bert": {"1_mirror.png": ASTRO[:, ::-1], "2_crop.png": ASTRO[20:300, 100:380][:, ::-1],
                 "3_crop.png": ASTRO[0:256, 128:384]},
        "solo": {"only.png": ASTRO},
    }
    for name, files in photos.items():
        (root / name).mkdir()
        for file, image in files.items():
            Image.fromarray(np.ascontiguousarray(image)).save(root / name / file)
    return root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("repro_prompts") / "prompts.jsonl"
    path.write_text('{"prompt": "a photo of a person"}\n\n')
    return path


def _argv(data_dir, prompts_file, out, method="face_fusion"):
    return ["--data", str(data_dir), "--prompts", str(prompts_file), "--model", "tiny", "--method", method,
            "--metric-models", "tiny", "--protocol", "reproduce/single_reference", "--set", "num_references=2",
            "--set", "seeds=[0]", "--set", "steps=1", "--set", "guidance_form=cfg", "--set", "fid_bootstrap_samples=3",
            "--batch-size", "2", "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def first_run(data_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("repro_out")
    placed = out / "runs" / "face_fusion" / "single_reference" / "images" / "bert" / "p000_s0.png"
    placed.parent.mkdir(parents=True)
    Image.fromarray(PLACED).save(placed)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert reproduce.main(_argv(data_dir, prompts_file, out)) == 0
    return out


def test_outputs_exist_and_say_meaningless(first_run):
    out = first_run
    for rel in ("results.md", "per_image.csv", "report.html", "plots/simtarget_vs_clipt.png",
                "plots/similarity_distributions.png", "metric_models.json", "summary.json"):
        assert (out / rel).is_file(), rel
    results = (out / "results.md").read_text()
    assert results.startswith("> **MEANINGLESS")
    assert (out / "per_image.csv").read_text().startswith("# MEANINGLESS")
    assert "MEANINGLESS" in (out / "report.html").read_text()
    generated = out / "runs/face_fusion/single_reference/images/anna/p000_s0.png"
    settings = cli_utils.read_png_settings(generated)
    assert settings["meaningless_metrics"] is True and settings["prompt"] == "a photo of a person"
    assert settings["references"] == ["anna/1_full.png", "anna/2_crop.png"]
    assert settings["targets"] == ["anna/3_small.png"]
    assert settings["identity_weights"].startswith("untrained")
    # the report links every picture relatively, and the files are there
    html = (out / "report.html").read_text()
    for src in ("data/crops/anna/1_full.png.png", "runs/face_fusion/single_reference/images/anna/p000_s0.png",
                "runs/face_fusion/single_reference/faces/bert/p000_s0_0.png"):
        assert f"src='{src}'" in html and (out / src).is_file()


def test_unusable_photos_and_identities_are_named(first_run):
    results = (first_run / "results.md").read_text()
    assert "Photos without a detected face (not used): anna/4_coffee.png." in results
    assert "fewer than 3 usable photos: solo (1 usable photo(s))" in results
    row = next(ln for ln in results.splitlines() if ln.startswith("| face_fusion (ours)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2" and cells[3] == "2"  # identities, images
    assert cells[4] == "1/2"  # the tiny pipeline's image has no face: counted, not dropped
    published = [ln for ln in results.splitlines() if "(published" in ln]
    assert published == []  # the single-reference protocol ships no published rows


def test_measured_face_matches_numpy(first_run, data_dir):
    """SimRef / SimTarget / Paste of the placed image, recomputed from the recognizer's embeddings with NumPy."""
    from fusion_jax.reproduction.face_metric import FaceMetric

    with open(first_run / "per_image.csv") as f:
        rows = list(csv.DictReader(ln for ln in f if not ln.startswith("#")))
    bert = next(r for r in rows if r["identity"] == "bert")
    anna = next(r for r in rows if r["identity"] == "anna")
    assert anna["face_found"] == "False" and anna["sim_target"] == "nan"
    assert bert["face_found"] == "True"
    metric = FaceMetric(first_run / "tiny_metric_models" / "recognizer")
    emb = lambda image: metric.analyze(np.ascontiguousarray(image)).embedding.astype(np.float64)  # noqa: E731
    g = emb(PLACED)
    refs = [emb(np.asarray(Image.open(data_dir / "bert" / p))) for p in ("1_mirror.png", "2_crop.png")]
    target = emb(np.asarray(Image.open(data_dir / "bert" / "3_crop.png")))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    sim_ref, sim_target = np.mean([cos(g, r) for r in refs]), cos(g, target)
    assert float(bert["sim_ref"]) == pytest.approx(sim_ref, abs=1e-5)
    assert float(bert["sim_target"]) == pytest.approx(sim_target, abs=1e-5)
    assert float(bert["paste"]) == pytest.approx(sim_ref - sim_target, abs=1e-5)
    assert (first_run / bert["face_crop"]).is_file()
    summary = json.loads((first_run / "summary.json").read_text())["rows"][0]
    assert summary["sim_target"][0] == pytest.approx(100 * sim_target, abs=1e-3)  # mean over the one found face


def test_rerun_computes_nothing(first_run, data_dir, prompts_file, capsys):
    image = first_run / "runs/face_fusion/single_reference/images/anna/p000_s0.png"
    before = image.stat().st_mtime_ns
    assert reproduce.main(_argv(data_dir, prompts_file, first_run)) == 0
    printed = capsys.readouterr().out
    assert "(0 generated now, 0 measured now, 0 data photos analysed now)" in printed
    assert "anna/4_coffee.png" in printed and "solo (1)" in printed
    assert image.stat().st_mtime_ns == before


def test_resume_with_other_prompts_is_refused(first_run, data_dir, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "a portrait in the rain"}\n')
    with pytest.raises(SystemExit, match=r"images/anna/p000_s0.png was generated with other settings \(prompt: "
                                         r"'a photo of a person' now 'a portrait in the rain'\)"):
        reproduce.main(_argv(data_dir, other, first_run))


def test_bad_inputs_give_clear_errors(data_dir, prompts_file, tmp_path):
    base = ["--data", str(data_dir), "--method", "none", "--out", str(tmp_path / "o")]
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text('{"prompt": "fine"}\n{"prompt": "unterminated\n')
    with pytest.raises(SystemExit, match=r"--prompts .*bad.jsonl:2: not valid JSON"):
        reproduce.main(base + ["--prompts", str(bad_prompts), "--metric-models", "tiny"])
    no_prompt = tmp_path / "np.jsonl"
    no_prompt.write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit, match=r"np.jsonl:1: expected an object with a non-empty string \"prompt\""):
        reproduce.main(base + ["--prompts", str(no_prompt), "--metric-models", "tiny"])
    (tmp_path / "norec").mkdir()
    with pytest.raises(SystemExit, match=r"--recognizer .*norec: no insightface recognition model"):
        reproduce.main(base + ["--recognizer", str(tmp_path / "norec"), "--clip", str(tmp_path),
                               "--inception", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="--recognizer, --clip, --inception required"):
        reproduce.main(base)
    with pytest.raises(SystemExit, match=r"--data .*nothing: no such folder"):
        reproduce.main(["--data", str(tmp_path / "nothing"), "--method", "none", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--method 'nope'"):
        reproduce.main(base + ["--method", "nope"])
    with pytest.raises(SystemExit, match="--protocol .*single_reference.yaml: unknown config key 'num_refs'"):
        reproduce.main(base + ["--metric-models", "tiny", "--protocol", "reproduce/single_reference",
                               "--set", "num_refs=2"])


def test_no_usable_identity_names_folder_and_counts(first_run, tmp_path):
    data = tmp_path / "data"
    for name in ("x", "y"):
        (data / name).mkdir(parents=True)
        Image.fromarray(ASTRO).save(data / name / "a.png")
    Image.fromarray(skimage.data.coffee()).save(data / "y" / "b.png")
    with pytest.raises(SystemExit, match=r"--data .*data: no usable identity: each needs 5 photos .*x: 1 usable "
                                         r"photo\(s\); y: 1 usable photo\(s\); no face in \['y/b.png'\]"):
        # first_run's OUT: its tiny metric models are reused (the photos here have other names)
        reproduce.main(["--data", str(data), "--method", "none", "--metric-models", "tiny", "--out",
                        str(first_run), "--quiet"])
