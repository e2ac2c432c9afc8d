"""infer/quickstart.py: --fast from scratch end to end, resuming without retraining, the shipped-model path on
the same model (same samples), and the shipped assets themselves; infer/evaluate.py's reduced path on the same
folder (its base model, Face Fusion run and metric models are the quickstart's; FlashFace trains beside them)."""

import importlib.util
import json
import math
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("no_reference", "1_reference", "4_references")
REQUIRED = tuple(f"{k}_{n}" for k in ("sim_target", "sim_ref", "paste", "prompt_accuracy") for n in SETTINGS)


def _main():
    spec = importlib.util.spec_from_file_location("quickstart_cli", os.path.join(ROOT, "infer", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _check_metrics(metrics):
    for key in REQUIRED:
        assert math.isfinite(metrics[key]), key
        low, high = metrics[key + "_ci95"]
        assert low - 1e-9 <= metrics[key] <= high + 1e-9, key  # the mean lies inside its bootstrap interval
    for n in SETTINGS:
        assert -1.0 <= metrics[f"sim_target_{n}"] <= 1.0 and 0.0 <= metrics[f"prompt_accuracy_{n}"] <= 1.0
        # Paste is SimRef - SimTarget by definition (means of per-image values)
        assert abs(metrics[f"paste_{n}"] - (metrics[f"sim_ref_{n}"] - metrics[f"sim_target_{n}"])) < 1e-6
        assert metrics[f"frechet_{n}"] >= 0.0
    assert metrics["frechet_real_floor"] >= 0.0
    # paired differences: the mean of per-image differences is the difference of the means, inside its interval
    for name, (key, a, b) in (("sim_target_4_minus_1_references", ("sim_target", "4_references", "1_reference")),
                              ("prompt_accuracy_1_reference_minus_none",
                               ("prompt_accuracy", "1_reference", "no_reference"))):
        assert abs(metrics[name] - (metrics[f"{key}_{a}"] - metrics[f"{key}_{b}"])) < 1e-9, name
        low, high = metrics[name + "_ci95"]
        assert low - 1e-9 <= metrics[name] <= high + 1e-9, name
    two = metrics["two_people"]
    assert -1.0 <= two["region_sim_target_own"] <= 1.0 and -1.0 <= two["region_sim_target_other"] <= 1.0


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One `--fast` quickstart from scratch: (its folder, seconds); the evaluation test reuses its stages."""
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    start = time.perf_counter()
    assert _main()(["--out", str(out), "--fast"]) == 0
    return out, time.perf_counter() - start


def test_quickstart_fast_runs_resumes_and_the_shipped_path_gives_the_same_samples(fast_run, tmp_path):
    main = _main()
    out, first_s = fast_run

    grid = Image.open(out / "grid.png")
    # --fast: 2 identities x 2 prompts = 4 rows; 4 reference crops + 3 settings, each cell 32 px x grid_scale 2
    assert grid.width > 7 * 64 and grid.height > 4 * 64
    assert Image.open(out / "two_people.png").width > 64 * 2 + 32 * 2 * 2
    metrics = json.loads((out / "metrics.json").read_text())
    _check_metrics(metrics)
    stages = ("base", "fusion", "fusion_round2")  # --fast: 2 Face Fusion rounds, the second on the first's export
    assert all(metrics["timings"][name]["trained"] for name in stages)
    assert (out / "model" / "identity" / "identity_config.json").is_file()
    _check_round_two(out)

    checkpoints = [out / name / "checkpoints" / "4" for name in ("fusion", "fusion_round2")]
    ckpt_mtimes = [os.path.getmtime(c) for c in checkpoints]
    start = time.perf_counter()
    assert main(["--out", str(out), "--fast"]) == 0
    second_s = time.perf_counter() - start
    again = json.loads((out / "metrics.json").read_text())
    assert not any(again["timings"][name]["trained"] for name in stages)
    assert [os.path.getmtime(c) for c in checkpoints] == ckpt_mtimes  # checkpoints not rewritten
    for key in REQUIRED:  # same checkpoints, same noise: the same samples and metrics
        assert abs(again[key] - metrics[key]) < 1e-4, key
    assert second_s < first_s

    # The shipped-model path (the default) on an asset folder holding this run's model and metric models: no
    # training, and the same samples as the from-scratch run (same model, same seed).
    assets = tmp_path / "assets"
    shutil.copytree(out / "model", assets / "model")
    shutil.copytree(out / "metrics", assets / "metrics")
    (assets / "training.json").write_text(json.dumps({"command": "test", "metric_setup": "fast", "metric_seed": 0}))
    shipped_out = tmp_path / "shipped"
    assert main(["--out", str(shipped_out), "--assets", str(assets), "--identities", "2", "--prompts", "2",
                 "--sample-steps", "2"]) == 0
    shipped = json.loads((shipped_out / "metrics.json").read_text())
    assert "base" not in shipped["timings"] and not (shipped_out / "base").exists()
    for key in REQUIRED:
        assert abs(shipped[key] - metrics[key]) < 1e-4, key


def _check_round_two(out):
    """Round 2 started from round 1's export (its UNet is round 2's base, LoRA merged) and trained on from there:
    the exported round-2 identity tensors moved away from round 1's, and its UNet from round 1's merged UNet."""
    from fusion_jax import weights

    unet_file = "unet/diffusion_pytorch_model.safetensors"
    round1 = weights.read_tensors(out / "fusion_model" / unet_file)
    assert all(np.array_equal(v, weights.read_tensors(out / "fusion_round2_pipeline" / unet_file)[k])
               for k, v in round1.items())
    final = weights.read_tensors(out / "model" / unet_file)
    assert any(not np.array_equal(final[k], v) for k, v in round1.items())  # round 2's LoRA, merged on export
    ids = [weights.read_tensors(out / folder / "identity" / "face_fusion.safetensors")
           for folder in ("fusion_model", "model")]
    assert ids[0].keys() == ids[1].keys() and any(not np.array_equal(ids[0][k], ids[1][k]) for k in ids[0])


def test_quickstart_flags_are_checked(tmp_path, capsys):
    main = _main()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--steps", "10"])  # training steps without --from-scratch
    assert "--from-scratch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--from-scratch", "--fusion-rounds", "0"])
    assert "--fusion-rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--guidance", "0.5"])
    assert "--guidance must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--reference-scale", "-1"])
    assert "--reference-scale must be >= 0" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.*--from-scratch"):
        main(["--out", str(tmp_path / "q"), "--assets", str(tmp_path / "nothing")])


def test_fusion_schedule_is_the_shipped_recipe_as_the_flags_change_it(tmp_path):
    """The default from-scratch rounds are the ones that made the shipped model (its training.json), and each
    round's config carries its own steps and references."""
    from fusion_jax import miniature_assets as assets
    from fusion_jax.quickstart import (SHIPPED_FUSION_ROUNDS, FusionRound, QuickstartConfig, fusion_schedule,
                                       quickstart_stage_configs)

    assert QuickstartConfig(out="").fusion_rounds == SHIPPED_FUSION_ROUNDS == fusion_schedule()
    assert fusion_schedule(rounds=2) == SHIPPED_FUSION_ROUNDS[:2]
    assert fusion_schedule(rounds=5) == (*SHIPPED_FUSION_ROUNDS, SHIPPED_FUSION_ROUNDS[-1], SHIPPED_FUSION_ROUNDS[-1])
    assert fusion_schedule(rounds=2, steps=4) == (FusionRound(4), FusionRound(4))
    assert fusion_schedule(references=3, vary_references=False)[-1] == FusionRound(1600, 3, False)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        fusion_schedule(rounds=0)
    # the shipped model's own record names the same rounds: it was made one round per command, each continuing the
    # previous one's export (records older than a field did not write it: 2 references, not varied)
    record = json.loads((assets.ASSET_DIR / assets.RECORD_FILE).read_text())
    shipped_rounds = []
    while record:
        quickstart = record["quickstart"]
        shipped_rounds.insert(0, (quickstart["fusion_steps"], quickstart.get("fusion_references", 2),
                                  quickstart.get("vary_references", False)))
        record = record.get("continued_from")
    assert shipped_rounds == [(2400, 2, False), (2400, 2, False), (1600, 4, True)]
    base, fusions, _ = quickstart_stage_configs(QuickstartConfig(out=str(tmp_path)), str(tmp_path))
    assert base.train.steps == 5000
    assert [(f.train.steps, f.data.pipeline.num_references, f.data.pipeline.vary_references) for f in fusions] == [
        (2400, 2, False), (2400, 2, False), (1600, 4, True)]


def test_shipped_assets_are_complete_small_and_recorded():
    """The package's own shipped model: every file the quickstart reads, under 20 MB, made by a recorded command."""
    from fusion_jax import miniature_assets as assets

    model_dir = assets.shipped_model_dir()  # raises, naming what is missing, if the assets are incomplete
    assert assets.folder_megabytes(assets.ASSET_DIR) < 20.0
    record = json.loads((assets.ASSET_DIR / assets.RECORD_FILE).read_text())
    stages = {}
    while record:  # a model continued from an earlier one keeps that one's record (and so every command)
        assert "miniature-assets" in record["command"] or "miniature_assets" in record["command"]
        stages.update(record["stages"])
        record = record.get("continued_from")
    assert stages["base"]["step"] >= 1 and stages["fusion"]["step"] >= 1
    for name in ("identity_embedder.safetensors", "attribute_reader.safetensors", "synthface_metrics.json"):
        assert (assets.ASSET_DIR / assets.METRICS_DIR / name).is_file()
    pipeline, identity_cfg = assets.load_quickstart_model(model_dir)
    assert pipeline.unet.config.in_channels == 12 and identity_cfg is not None


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "infer", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# the quickstart's --fast stages (fusion_jax/cli/quickstart.py); FlashFace and the single-token baseline are left out
# here for time (their training / sampling paths on the 12-channel miniature: test_flashface.py, and the full run);
# IP-Adapter-FaceID is in: its rows read the recognition embedding end to end (stream -> training -> sampling);
# FaceStudio too: its style tower is trained (4 steps), read by its training step and by the alpha sweep
REDUCED_EVALUATION = ["base_steps=4", "fusion_steps=4", "batch_size=8", "widths=[8,16]", "identities=2",
                      "prompts=2", "sample_steps=2", "metric_setup=fast", "two_people=0", "style_tower_steps=4",
                      "variants=[decoupled_fixed,ip_adapter_faceid,facestudio]"]


def test_reduced_evaluation_reuses_the_quickstart_base_model(fast_run, tmp_path):
    from fusion_jax import synth_reproduction as sr

    main = _evaluate_main()
    out, _ = fast_run
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    args = ["--config", os.path.join(ROOT, "configs", "synthfaces", "experiment.yaml"), f"out={out}",
            *REDUCED_EVALUATION, f"results_md={results}"]
    assert main(args) == 0
    doc = json.loads((out / "evaluation.json").read_text())

    compute = doc["compute"]
    assert compute["steps"]["decoupled_fixed"] == 4 and compute["gflop_per_step"]["decoupled_fixed"] > 0
    # equal FLOPs: the adapter's step (no reference pass through the UNet) is cheaper, so it takes more steps
    faceid_steps = compute["steps"]["ip_adapter_faceid"]
    assert compute["gflop_per_step"]["ip_adapter_faceid"] < compute["gflop_per_step"]["decoupled_fixed"]
    assert faceid_steps == round(4 * compute["gflop_per_step"]["decoupled_fixed"]
                                 / compute["gflop_per_step"]["ip_adapter_faceid"])
    # the quickstart's base model is this evaluation's (same recipe, same seeds): not retrained; the Face Fusion
    # variant trains the budget's steps in its own folder, beside the quickstart's rounds
    assert not doc["timings"]["base"]["trained"]
    assert doc["timings"]["decoupled_fixed"]["trained"] and doc["timings"]["decoupled_fixed"]["step"] == 4
    assert (out / "fusion_decoupled_fixed" / "checkpoints" / "4").is_dir()

    assert doc["timings"]["ip_adapter_faceid"]["step"] == faceid_steps
    from fusion_jax import style_sweep

    sweep = {style_sweep.row_name("facestudio", a) for a in style_sweep.ALPHAS}
    assert set(doc["summary"]) == {"no_reference", "decoupled_fixed_1", "decoupled_fixed_4", "ip_adapter_faceid_1",
                                   "ip_adapter_faceid_4", "facestudio_1", "facestudio_4"} | sweep
    # FaceStudio reads the style tower trained in this folder (its record is in the report), at equal FLOPs
    assert doc["style_tower"]["steps"] == 4 and (out / "style_tower" / "model.safetensors").is_file()
    assert doc["timings"]["facestudio"]["step"] == compute["steps"]["facestudio"] >= 1
    for row in sweep:
        assert set(doc["per_image"][row]) >= {"style_fidelity", "text_fidelity", "sim_target"}
    for row, values in doc["summary"].items():
        for key in sr.TABLE_KEYS:
            low, high = values[key + "_ci95"]
            assert math.isfinite(values[key]) and low - 1e-9 <= values[key] <= high + 1e-9, (row, key)
            assert values[key] == pytest.approx(np.mean(doc["per_image"][row][key]), abs=1e-9)
    verdicts = {c["claim"]: c["verdict"] for c in doc["claims"]}
    assert len(verdicts) == 8 and set(verdicts.values()) <= {"held", "not held", "not testable here"}
    faceid = next(c for c in doc["claims"] if "IP-Adapter-FaceID" in c["claim"])
    assert faceid["difference"] == pytest.approx(np.mean(np.subtract(
        doc["per_image"]["decoupled_fixed_1"]["sim_target"], doc["per_image"]["ip_adapter_faceid_1"]["sim_target"])))
    four_vs_one = next(c for c in doc["claims"] if "4 vs 1" in c["claim"])
    per_image = doc["per_image"]
    assert four_vs_one["difference"] == pytest.approx(
        np.mean(np.subtract(per_image["decoupled_fixed_4"]["sim_target"], per_image["decoupled_fixed_1"]["sim_target"])))
    alpha = next(c for c in doc["claims"] if "alpha sweep" in c["claim"])
    assert alpha["verdict"] in ("held", "not held")
    assert alpha["difference"] == pytest.approx(np.mean(np.subtract(
        per_image["facestudio_alpha1.00"]["style_fidelity"], per_image["facestudio_alpha0.00"]["style_fidelity"])))
    assert alpha["text_difference"] == pytest.approx(np.mean(np.subtract(
        per_image["facestudio_alpha0.00"]["text_fidelity"], per_image["facestudio_alpha1.00"]["text_fidelity"])))
    for claim in ("region", "single embedding token", "single CFG"):  # rows not in this run
        assert all(v == "not testable here" for c, v in verdicts.items() if claim in c), claim

    markdown = (out / "evaluation.md").read_text()
    assert "Face Fusion (decoupled, fixed t), 4 references" in markdown and "**not testable here**" in markdown
    assert markdown in results.read_text() and results.read_text().startswith("# Results\n")
    assert "FaceStudio's alpha sweep" in markdown and "alpha 0.50" in markdown
    for name in (*sr.PLOTS, style_sweep.plot_name("facestudio")):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _assets_main():
    spec = importlib.util.spec_from_file_location("assets_cli", os.path.join(ROOT, "train", "miniature_assets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_miniature_assets_continues_a_shipped_model(fast_run, tmp_path, capsys):
    """`miniature-assets --continue-from ASSETS`: one more Face Fusion round on an assets folder (here the --fast
    run's, claiming 2 rounds), written as new assets whose record keeps the previous one; errors name the cause."""
    from fusion_jax import weights

    out, _ = fast_run
    previous = tmp_path / "previous"
    shutil.copytree(out / "model", previous / "model")
    shutil.copytree(out / "metrics", previous / "metrics")
    record = {"command": "python train/miniature_assets.py --out X", "stages": {"fusion_round2": {"step": 4}},
              "quickstart": {"fusion_rounds": 2}}
    (previous / "training.json").write_text(json.dumps(record))
    main = _assets_main()
    assert main(["--out", str(tmp_path / "run"), "--continue-from", str(previous), "--fusion-rounds", "2"]) == 1
    assert "holds 2 Face Fusion round(s); --fusion-rounds must be 3" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "run"), "--continue-from", str(tmp_path), "--fusion-steps", "2"]) == 1
    assert "no training.json" in capsys.readouterr().err

    target = tmp_path / "next"
    assert main(["--out", str(tmp_path / "run"), "--continue-from", str(previous), "--fusion-steps", "2",
                 "--assets", str(target)]) == 0
    written = json.loads((target / "training.json").read_text())
    # the record lists the rounds: the two it continued (the shipped recipe's first two, the record giving a count)
    # and the new one, the recipe's round 3 with the flags' steps (4 slots holding 1-4 distinct photos)
    assert [tuple(r.values()) for r in written["quickstart"]["fusion_rounds"]] == [(2400, 2, False), (2400, 2, False),
                                                                                  (2, 4, True)]
    assert written["continued_from"] == record
    assert written["stages"]["fusion_round3"]["step"] == 2 and written["stages"]["fusion_round3"]["trained"]
    assert written["fusion_config"]["data"]["pipeline"]["num_references"] == 4
    assert written["fusion_config"]["data"]["pipeline"]["vary_references"] is True
    assert written["fusion_config"]["model"]["identity_init"].endswith("fusion_round2_model")
    # round 3 draws its own data order and noise: the seeds moved on by 1000 per round
    assert written["fusion_config"]["train"]["seed"] == written["fusion_config"]["data"]["seed"] == 2000
    for name in ("identity_embedder.safetensors", "attribute_reader.safetensors"):  # metric models kept as they were
        assert (target / "metrics" / name).read_bytes() == (previous / "metrics" / name).read_bytes()
    before = weights.read_tensors(previous / "model" / "identity" / "face_fusion.safetensors")
    after = weights.read_tensors(target / "model" / "identity" / "face_fusion.safetensors")
    assert before.keys() == after.keys() and any(not np.array_equal(before[k], after[k]) for k in before)
