"""The miniature reproduction: no reference vs an IP-Adapter-like single-token baseline vs Face Fusion (joint /
decoupled, fixed / current), 1 vs 4 references, on held-out synthetic identities. Not for CI (an hour or more).

    fusion-jax evaluate --config synthfaces/experiment out=out/eval [key=value ...]
    python infer/evaluate.py --config configs/synthfaces/experiment.yaml out=out/eval   # in a checkout

Writes OUT/evaluation.md (table) and OUT/evaluation.json (all numbers, settings, timings); every stage resumes.
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
    from fusion_jax.miniature import EvaluationConfig, evaluate

    try:
        path, overrides = split_argv(argv)
        cfg = load_config(path, overrides, cls=EvaluationConfig)
        evaluate(cfg)
    except (ConfigError, ValueError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(os.path.abspath(cfg.out), "evaluation.md")).read())
    return 0

