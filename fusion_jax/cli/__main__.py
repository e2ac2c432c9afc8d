"""`python -m fusion_jax.cli COMMAND ...`: the `fusion-jax` command without an installed console script."""

import sys

from fusion_jax.cli import main

sys.exit(main())
