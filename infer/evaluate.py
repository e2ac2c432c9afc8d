"""The miniature reproduction: no reference vs an IP-Adapter-like single-token baseline vs Face Fusion (joint /
decoupled, fixed / current), 1 vs 4 references, on held-out synthetic identities. Not for CI (an hour or more).

    python infer/evaluate.py --config configs/synthfaces/experiment.yaml out=out/eval [key=value ...]

Writes OUT/evaluation.md (table) and OUT/evaluation.json (all numbers, settings, timings); every stage resumes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
