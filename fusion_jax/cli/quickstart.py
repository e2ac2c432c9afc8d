"""Quickstart: train a miniature Face Fusion model on synthetic faces and measure it, on a CPU, no download.

    fusion-jax quickstart --out out/quickstart          # about 10 minutes on 2 idle CPU cores
    fusion-jax quickstart --out /tmp/q --fast            # seconds of training (smoke test; poor images)

(`python infer/quickstart.py ...` in a source checkout is the same program.)

Stages (each resumes: a second run with the same DIR reads the checkpoints and cached metric models):
  1. a miniature pixel-space pipeline (DIR/pipeline), 2. a text-to-image base model on synthfaces (DIR/base),
  3. Face Fusion on top of it (DIR/base_pipeline, DIR/fusion), 4. metric models (DIR/metrics),
  5. samples of held-out identities under several prompts with 0, 1 and 4 references:
     DIR/grid.png (rows: identity x prompt; columns: the 4 reference crops, then 0 / 1 / 4 references) and
     DIR/metrics.json (sim_target_*, sim_ref_*, paste_*, prompt_accuracy_* per setting, embedder accuracy).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    parser.add_argument("--steps", type=int, default=None, help="base-model steps (default 600; Face Fusion: a third)")
    parser.add_argument("--fusion-steps", type=int, default=None, help="Face Fusion steps (default 200, or steps / 3 with --steps)")
    parser.add_argument("--identities", type=int, default=None, help="held-out identities evaluated (default 8)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per identity (default 4, at most 6)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 20)")
    parser.add_argument("--fast", action="store_true",
                        help="tiny everything (tests): 4+4 steps, a 2-level 8/16-channel UNet, 2 identities, fast "
                             "metric models")
    args = parser.parse_args(argv)

    from fusion_jax.miniature import QuickstartConfig, quickstart

    kw: dict = {}
    if args.fast:
        kw = dict(base_steps=4, fusion_steps=4, batch_size=8, widths=(8, 16), identities=2, prompts=2,
                  grid_rows=4, sample_steps=2, metric_setup="fast")
    if args.steps is not None:
        kw["base_steps"] = args.steps
        kw.setdefault("fusion_steps", max(1, args.steps // 3))
    if args.fusion_steps is not None:
        kw["fusion_steps"] = args.fusion_steps
    for name in ("identities", "prompts", "sample_steps"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    for name in ("base_steps", "fusion_steps", "identities", "prompts", "sample_steps"):
        if name in kw and kw[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {kw[name]}")
    if args.steps is not None and args.fusion_steps is None and not args.fast:
        kw["fusion_steps"] = max(1, args.steps // 3)
    quickstart(QuickstartConfig(out=args.out, **kw))
    return 0

