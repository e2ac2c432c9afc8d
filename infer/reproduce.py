"""Reproduction harness on real photos: `python infer/reproduce.py --data PHOTOS --method NAME ... --out DIR`

Thin wrapper kept so `python infer/reproduce.py ...` works from a source checkout: the program is
`fusion_jax.cli.reproduce` (the same as `fusion-jax reproduce ...` once the package is installed).
"""

import os
import sys

# a checkout's scripts run its own fusion_jax (before any installed copy); the library never edits sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusion_jax.cli.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
