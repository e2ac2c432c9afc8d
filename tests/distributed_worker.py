"""One process of the 2-process test job (tests/test_distributed.py): `python -m tests.distributed_worker OUT ARGS`.

Runs the library's train entry (`python -m fusion_jax.training`, i.e. `fusion_jax.training.__main__.main`) with
ARGS unchanged, and records the rows this process's data stream handed to the trainer, written to
OUT/rows_<process>.npz afterwards: the only addition to the entry point is that recording.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    from fusion_jax.training import synthetic

    rows: list[dict] = []
    original = synthetic.SyntheticBatches.__next__

    def recording_next(self):
        batch = original(self)
        rows.append({k: np.array(v) for k, v in batch.items()})
        return batch

    synthetic.SyntheticBatches.__next__ = recording_next
    from fusion_jax.training.__main__ import main as train_main

    rc = train_main(args)
    import jax

    np.savez(os.path.join(out, f"rows_{jax.process_index()}.npz"),
             **{k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {})
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
