"""infer/quickstart.py: --fast from scratch end to end, resuming without retraining, the shipped-model path on
the same model (same samples), and the shipped assets themselves."""

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
    two = metrics["two_people"]
    assert -1.0 <= two["region_sim_target_own"] <= 1.0 and -1.0 <= two["region_sim_target_other"] <= 1.0


def test_quickstart_fast_runs_resumes_and_the_shipped_path_gives_the_same_samples(tmp_path):
    main = _main()
    out = tmp_path / "qs"
    start = time.perf_counter()
    assert main(["--out", str(out), "--fast"]) == 0
    first_s = time.perf_counter() - start

    grid = Image.open(out / "grid.png")
    # --fast: 2 identities x 2 prompts = 4 rows; 4 reference crops + 3 settings, each cell 32 px x grid_scale 2
    assert grid.width > 7 * 64 and grid.height > 4 * 64
    assert Image.open(out / "two_people.png").width > 64 * 2 + 32 * 2 * 2
    metrics = json.loads((out / "metrics.json").read_text())
    _check_metrics(metrics)
    assert metrics["timings"]["base"]["trained"] and metrics["timings"]["fusion"]["trained"]
    assert (out / "model" / "identity" / "identity_config.json").is_file()

    ckpt_mtime = os.path.getmtime(out / "fusion" / "checkpoints" / "4")
    start = time.perf_counter()
    assert main(["--out", str(out), "--fast"]) == 0
    second_s = time.perf_counter() - start
    again = json.loads((out / "metrics.json").read_text())
    assert not again["timings"]["base"]["trained"] and not again["timings"]["fusion"]["trained"]
    assert os.path.getmtime(out / "fusion" / "checkpoints" / "4") == ckpt_mtime  # checkpoint not rewritten
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


def test_quickstart_flags_are_checked(tmp_path, capsys):
    main = _main()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--steps", "10"])  # training steps without --from-scratch
    assert "--from-scratch" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.*--from-scratch"):
        main(["--out", str(tmp_path / "q"), "--assets", str(tmp_path / "nothing")])


def test_shipped_assets_are_complete_small_and_recorded():
    """The package's own shipped model: every file the quickstart reads, under 20 MB, made by a recorded command."""
    from fusion_jax import miniature_assets as assets

    model_dir = assets.shipped_model_dir()  # raises, naming what is missing, if the assets are incomplete
    assert assets.folder_megabytes(assets.ASSET_DIR) < 20.0
    record = json.loads((assets.ASSET_DIR / assets.RECORD_FILE).read_text())
    assert "miniature-assets" in record["command"] or "miniature_assets" in record["command"]
    assert record["stages"]["base"]["step"] >= 1 and record["stages"]["fusion"]["step"] >= 1
    for name in ("identity_embedder.safetensors", "attribute_reader.safetensors", "synthface_metrics.json"):
        assert (assets.ASSET_DIR / assets.METRICS_DIR / name).is_file()
    pipeline, identity_cfg = assets.load_quickstart_model(model_dir)
    assert pipeline.unet.config.in_channels == 12 and identity_cfg is not None
