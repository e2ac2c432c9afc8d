"""Train the quickstart's shipped model: `python train/miniature_assets.py --out runs/miniature --assets DIR`

Thin wrapper so the documented command works from a source checkout: the program is
`fusion_jax.cli.miniature_assets` (the same as `fusion-jax miniature-assets ...` once the package is installed).
"""

import os
import sys

# a checkout's scripts run its own fusion_jax (before any installed copy); the library never edits sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusion_jax.cli.miniature_assets import *  # noqa: E402,F401,F403  (every public name: tests call main / helpers)
from fusion_jax.cli.miniature_assets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
