"""The miniature reproduction: `python infer/evaluate.py --config configs/synthfaces/experiment.yaml out=DIR`

Thin wrapper kept so the documented `python infer/evaluate.py ...` works from a source checkout: the program is
`fusion_jax.cli.evaluate` (the same as `fusion-jax evaluate ...` once the package is installed).
"""

import os
import sys

# a checkout's scripts run its own fusion_jax (before any installed copy); the library never edits sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusion_jax.cli.evaluate import *  # noqa: E402,F401,F403  (every public name: tests call main / helpers)
from fusion_jax.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
