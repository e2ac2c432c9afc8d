"""The miniature reproduction: the base model (no reference), Face Fusion (joint / decoupled x fixed / current),
an IP-Adapter-like single-token baseline and FlashFace, each trained for the same training FLOPs on one base
model, with 1 and 4 references, on held-out synthetic identities; the seed papers' claims checked. Hours at the
defaults on a CPU; `fusion_steps=` sets the compute budget (steps of Face Fusion decoupled / fixed).

    fusion-jax evaluate --config synthfaces/experiment out=out/eval [key=value ...]
    python infer/evaluate.py --config configs/synthfaces/experiment.yaml out=out/eval   # in a checkout

Writes OUT/evaluation.md (tables with 95% intervals, compute per method, the claims checklist), OUT/evaluation.json
(every number, per-image scores, settings, timings) and two PNG plots; every stage resumes. `results_md=FILE`
also writes the section between FILE's evaluate markers, `figures_dir=DIR` copies the plots there.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from fusion_jax.config import ConfigError, load_config, split_argv
    from fusion_jax.synth_reproduction import EvaluationConfig, evaluate

    try:
        path, overrides = split_argv(argv)
        cfg = load_config(path, overrides, cls=EvaluationConfig)
        evaluate(cfg, overrides=overrides)
    except (ConfigError, ValueError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(os.path.abspath(cfg.out), "evaluation.md")).read())
    return 0

