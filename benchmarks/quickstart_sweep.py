"""Quickstart sampling settings, chosen on validation identities the quickstart never reports.

    python benchmarks/quickstart_sweep.py --first-identity 100 --identities 32 --seeds 0,1 \
        --reference-scale 2.5,3 --reference-max-timestep none,800,600 --json out/sweep.json

Samples the shipped miniature (or --assets) for held-out identities FIRST .. FIRST+N-1 (positions in the held-out
list; the quickstart reports positions 0 .. identities-1, so a FIRST past those keeps the reported figures
untuned) under 4 prompts, without references and with 1 and 4, for every combination of text guidance, reference
guidance scale and reference guidance cut-off (`SamplingConfig.reference_guidance_max_timestep`: s_ref applies
only while t <= it), and every seed. Prints per setting the mean over seeds of SimTarget with 1 / 4 references,
prompt accuracy without / with references and the drop between them, and the worst seed of each; `--json` writes
every figure per seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from fusion_jax import miniature as mm  # noqa: E402
from fusion_jax import miniature_assets as assets  # noqa: E402
from fusion_jax import quickstart as qs  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def cutoffs(text: str) -> list[int | None]:
    """'none,800' -> [None, 800] (None: reference guidance at every step)."""
    return [None if x.strip().lower() == "none" else int(x) for x in text.split(",")]


def score(metrics, images, eval_set, n: int) -> dict[str, float]:
    """Mean SimTarget and prompt accuracy of one setting's images."""
    per_image = qs.per_image_scores(metrics, images, eval_set, n)
    return {"sim_target": float(np.mean(per_image["sim_target"])),
            "prompt_accuracy": float(np.mean(per_image["prompt_accuracy"]))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="", help="shipped-model folder (default fusion_jax/assets/miniature)")
    parser.add_argument("--first-identity", type=int, default=100, help="first held-out position (default 100)")
    parser.add_argument("--identities", type=int, default=32, help="validation identities (default 32)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per identity (default 4)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated sampling seeds (default 0,1)")
    defaults = qs.QuickstartConfig(out="")
    parser.add_argument("--guidance", default=str(defaults.guidance),
                        help=f"comma-separated text guidance scales (default the quickstart's, {defaults.guidance})")
    parser.add_argument("--reference-scale", default=str(defaults.reference_scale),
                        help=f"comma-separated reference guidance scales (default {defaults.reference_scale})")
    parser.add_argument("--reference-max-timestep", default="none",
                        help="comma-separated cut-offs: reference guidance only while t <= it ('none': always)")
    parser.add_argument("--sample-steps", type=int, default=defaults.sample_steps,
                        help=f"sampler steps (default {defaults.sample_steps})")
    parser.add_argument("--scheduler", default="ddim", help="sampler: ddim | dpmpp_2m | euler | euler_ancestral")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cfg = qs.QuickstartConfig(out="", assets=args.assets)
    model_dir, metrics_dir, record = qs.shipped(cfg)
    metrics = qs.load_metrics(cfg, metrics_dir, record)
    pipeline, identity_cfg = assets.load_quickstart_model(model_dir)
    eval_set = mm.build_eval_set(qs.model_faces(pipeline), args.identities, args.prompts, args.first_identity)
    seeds = [int(s) for s in args.seeds.split(",")]

    def sample(n, seed, guidance, scale=0.0, cutoff=None):
        return mm.sample_images(pipeline, identity_cfg, eval_set, n, steps=args.sample_steps, guidance=guidance,
                                reference_guidance="disentangled", reference_scale=scale, batch=16, seed=seed,
                                reference_max_timestep=cutoff, scheduler=args.scheduler)

    no_ref = {(g, s): score(metrics, sample(0, s, g), eval_set, 0) for g in floats(args.guidance) for s in seeds}
    rows, per_seed = [], []
    for g, scale, cutoff in itertools.product(floats(args.guidance), floats(args.reference_scale),
                                              cutoffs(args.reference_max_timestep)):
        figures = []
        for s in seeds:
            one, four = (score(metrics, sample(n, s, g, scale, cutoff), eval_set, n) for n in (1, 4))
            base = no_ref[(g, s)]["prompt_accuracy"]
            drop = base - min(one["prompt_accuracy"], four["prompt_accuracy"])
            figures.append({"guidance": g, "reference_scale": scale, "reference_max_timestep": cutoff, "seed": s,
                            "sim_target_1": one["sim_target"], "sim_target_4": four["sim_target"],
                            "prompt_accuracy_0": base, "prompt_accuracy_1": one["prompt_accuracy"],
                            "prompt_accuracy_4": four["prompt_accuracy"], "prompt_drop": drop})
        per_seed += figures
        mean = {k: float(np.mean([f[k] for f in figures])) for k in figures[0] if k.startswith(("sim", "prompt"))}
        rows.append({"guidance": g, "ref_scale": scale, "ref_max_t": "all" if cutoff is None else cutoff,
                     "sim_1": mean["sim_target_1"], "sim_4": mean["sim_target_4"],
                     "min_sim_1": min(f["sim_target_1"] for f in figures),
                     "acc_0": mean["prompt_accuracy_0"], "acc_1": mean["prompt_accuracy_1"],
                     "acc_4": mean["prompt_accuracy_4"], "max_drop": max(f["prompt_drop"] for f in figures)})
        print(rows[-1], flush=True)
    print(f"\nvalidation: held-out positions {args.first_identity}..{args.first_identity + args.identities - 1} x "
          f"{args.prompts} prompts, seeds {seeds}; means over seeds, min / max over seeds")
    print_table(rows, list(rows[0]))
    wall = time.perf_counter() - start
    print(f"{wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/quickstart_sweep.py " + " ".join(argv), "wall_s": wall,
                       "scheduler": args.scheduler, "sample_steps": args.sample_steps,
                       "first_identity": args.first_identity, "identities": args.identities,
                       "prompts": args.prompts, "rows": rows, "per_seed": per_seed}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
