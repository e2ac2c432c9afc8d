"""Quickstart: the miniature Face Fusion model on synthetic faces, sampled and measured, on a CPU, no download.

    fusion-jax quickstart --out out/quickstart                 # the shipped model: a few minutes on 2 CPU cores
    fusion-jax quickstart --out out/scratch --from-scratch     # trains every stage (about 100 min on 2 cores)
    fusion-jax quickstart --out /tmp/q --fast                  # seconds: tiny stages from scratch (smoke test)

(`python infer/quickstart.py ...` in a source checkout is the same program.)

Samples held-out identities (never seen in training) under several prompts with 0, 1 and 4 references and scores
them with the synthetic world's exact metrics (identity embedder, attribute reader), each figure with a 95%
bootstrap interval over identities. Writes OUT/grid.png (rows: identity x prompt; columns: the 4 reference
crops, then 0 / 1 / 4 references), OUT/two_people.png (two people in one image, each in their box) and
OUT/metrics.json. The shipped model is fusion_jax/assets/miniature (its training.json names the command that
made it); with --from-scratch the stages resume from OUT's checkpoints.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train every stage (pipeline, base model, Face Fusion, metric models) instead of "
                             "sampling the shipped model")
    parser.add_argument("--assets", default=None, help="folder of a shipped model (default fusion_jax/assets/miniature)")
    parser.add_argument("--steps", type=int, default=None, help="from scratch: base-model steps (default 5000)")
    parser.add_argument("--fusion-steps", type=int, default=None,
                        help="from scratch: Face Fusion steps of every round (default: the shipped recipe's, "
                             "2400 / 2400 / 1600)")
    parser.add_argument("--fusion-rounds", type=int, default=None,
                        help="from scratch: the first N rounds of the shipped Face Fusion recipe, each continuing "
                             "from the previous one's export (default 3)")
    parser.add_argument("--identities", type=int, default=None, help="held-out identities evaluated (default 64)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per identity (default 4, at most 6)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, default=None, help="text guidance scale (default 5.5)")
    parser.add_argument("--reference-scale", type=float, default=None,
                        help="reference guidance scale s_ref of the disentangled guidance (default 3.0; 0 = the "
                             "references have no effect)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds every stage: sampling, and with --from-scratch weights, data order, metric models")
    parser.add_argument("--fast", action="store_true",
                        help="tiny everything from scratch (tests): 4 base steps, 2 Face Fusion rounds of 4, a "
                             "2-level 8/16-channel UNet, 2 identities, fast metric models")
    args = parser.parse_args(argv)

    from fusion_jax.quickstart import SHIPPED_FUSION_ROUNDS, QuickstartConfig, fusion_schedule, quickstart

    kw: dict = {}
    if args.fast:
        kw = dict(from_scratch=True, base_steps=4, fusion_rounds=fusion_schedule(rounds=2, steps=4), batch_size=8,
                  widths=(8, 16), identities=2, prompts=2, grid_rows=4, grid_scale=2, sample_steps=2,
                  metric_setup="fast", two_people=1)
    if args.from_scratch:
        kw["from_scratch"] = True
    if args.assets is not None:
        kw["assets"] = args.assets
    if args.steps is not None:
        kw["base_steps"] = args.steps
    for name in ("identities", "prompts", "sample_steps", "seed", "guidance", "reference_scale"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    for flag, value in (("--steps", args.steps), ("--fusion-steps", args.fusion_steps),
                        ("--fusion-rounds", args.fusion_rounds), ("--identities", args.identities),
                        ("--prompts", args.prompts), ("--sample-steps", args.sample_steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.fusion_steps is not None or args.fusion_rounds is not None:
        recipe = kw.get("fusion_rounds", SHIPPED_FUSION_ROUNDS)
        kw["fusion_rounds"] = fusion_schedule(rounds=args.fusion_rounds, steps=args.fusion_steps, recipe=recipe)
    if kw.get("guidance", 1.0) < 1.0:
        parser.error(f"--guidance must be >= 1 (1 = no guidance), got {kw['guidance']}")
    if kw.get("reference_scale", 0.0) < 0.0:
        parser.error(f"--reference-scale must be >= 0, got {kw['reference_scale']}")
    if not kw.get("from_scratch") and any(v is not None for v in (args.steps, args.fusion_steps, args.fusion_rounds)):
        parser.error("--steps / --fusion-steps / --fusion-rounds train a model: add --from-scratch (the default "
                     "samples the shipped one)")
    quickstart(QuickstartConfig(out=args.out, **kw))
    return 0
