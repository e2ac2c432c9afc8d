"""infer/quickstart.py end to end at its --fast setting, and resuming from DIR without retraining."""

import importlib.util
import json
import math
import os
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("sim_target_no_reference", "sim_target_1_reference", "sim_target_4_references",
            "prompt_accuracy_no_reference", "prompt_accuracy_4_references")


def _main():
    spec = importlib.util.spec_from_file_location("quickstart_cli", os.path.join(ROOT, "infer", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_quickstart_fast_runs_and_resumes(tmp_path):
    main = _main()
    out = tmp_path / "qs"
    start = time.perf_counter()
    assert main(["--out", str(out), "--fast"]) == 0
    first_s = time.perf_counter() - start

    grid = np.asarray(Image.open(out / "grid.png"))
    # --fast: 2 identities x 2 prompts = 4 rows of 4 reference crops + 3 samples, 32 px cells, 2 px gaps
    assert grid.shape == (4 * 34 + 2, 7 * 34 + 2, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert math.isfinite(metrics[key]), key
    for n in ("no_reference", "1_reference", "4_references"):
        assert -1.0 <= metrics[f"sim_target_{n}"] <= 1.0 and -1.0 <= metrics[f"sim_ref_{n}"] <= 1.0
        assert 0.0 <= metrics[f"prompt_accuracy_{n}"] <= 1.0
        # Paste is SimRef - SimTarget by definition (means of per-image values)
        assert abs(metrics[f"paste_{n}"] - (metrics[f"sim_ref_{n}"] - metrics[f"sim_target_{n}"])) < 1e-6
    assert 0.0 <= metrics["embedder_verification_accuracy"] <= 1.0
    assert metrics["timings"]["base"]["trained"] and metrics["timings"]["fusion"]["trained"]
    assert (out / "base" / "checkpoints" / "4").is_dir() and (out / "fusion" / "checkpoints" / "4").is_dir()

    ckpt_mtime = os.path.getmtime(out / "fusion" / "checkpoints" / "4")
    start = time.perf_counter()
    assert main(["--out", str(out), "--fast"]) == 0
    second_s = time.perf_counter() - start
    again = json.loads((out / "metrics.json").read_text())
    assert not again["timings"]["base"]["trained"] and not again["timings"]["fusion"]["trained"]
    assert os.path.getmtime(out / "fusion" / "checkpoints" / "4") == ckpt_mtime  # checkpoint not rewritten
    assert again["timings"]["base"]["seconds"] == 0.0 and again["timings"]["fusion"]["seconds"] == 0.0
    # same checkpoints, same noise: the same samples and metrics
    for key in REQUIRED:
        assert abs(again[key] - metrics[key]) < 1e-4, key
    assert second_s < first_s
