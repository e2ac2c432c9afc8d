"""`benchmarks/quickstart_sweep.py` on the shipped model, at smoke size: its table is what its per-seed figures say."""

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_rows_summarise_their_per_seed_figures(tmp_path):
    spec = importlib.util.spec_from_file_location("quickstart_sweep", os.path.join(ROOT, "benchmarks",
                                                                                   "quickstart_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cutoffs("none,800") == [None, 800]
    out = tmp_path / "sweep.json"
    assert module.main(["--identities", "1", "--prompts", "2", "--seeds", "0,1", "--sample-steps", "2",
                        "--reference-scale", "0,3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["first_identity"] == 100 and len(result["rows"]) == 2 and len(result["per_seed"]) == 4
    for row in result["rows"]:
        figures = [f for f in result["per_seed"] if f["reference_scale"] == row["ref_scale"]]
        assert [f["seed"] for f in figures] == [0, 1]
        assert np.isclose(row["sim_1"], np.mean([f["sim_target_1"] for f in figures]))
        assert np.isclose(row["min_sim_1"], min(f["sim_target_1"] for f in figures))
        for f in figures:  # the drop is from no reference to the worse of 1 and 4 references
            assert np.isclose(f["prompt_drop"], f["prompt_accuracy_0"] - min(f["prompt_accuracy_1"],
                                                                              f["prompt_accuracy_4"]))
    # reference scale 0: the disentangled guidance is text guidance alone, so the images (and figures) are the
    # no-reference ones: the references cannot have moved anything
    for f in result["per_seed"]:
        if f["reference_scale"] == 0.0:
            assert f["prompt_accuracy_1"] == f["prompt_accuracy_0"] == f["prompt_accuracy_4"]
