"""Pre-encode a face dataset: `python train/preencode.py --model SD_PIPELINE --out OUT (--face-identities DIR | --synthfaces N)`

Thin wrapper kept so the documented `python train/preencode.py ...` works from a source checkout: the program is
`fusion_jax.cli.preencode` (the same as `fusion-jax preencode ...` once the package is installed).
"""

import os
import sys

# a checkout's scripts run its own fusion_jax (before any installed copy); the library never edits sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusion_jax.cli.preencode import *  # noqa: E402,F401,F403  (every public name: tests call main / helpers)
from fusion_jax.cli.preencode import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
