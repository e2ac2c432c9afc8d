"""`data.source: synthetic`: deterministic random batches from a shape spec (throughput tests, smoke runs).

Batch i depends only on (seed, i), so the iterator state is one int and a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import jax
import numpy as np


class BatchIterator(Protocol):
    """What the trainer needs from a data pipeline's iterator (host-side numpy batches)."""

    def __next__(self) -> Any: ...  # this process's rows of the next global batch

    def get_state(self) -> dict[str, int]: ...  # position of the NEXT batch (checkpointed with the model)

    def set_state(self, state: Mapping[str, int]) -> None: ...  # continue from a checkpointed position


class SyntheticBatches:
    """Endless batches of standard-normal float32 arrays with shapes `(batch_size, *shape)` per key.

    Args:
      spec: name -> per-example shape, e.g. {'x': (8, 8, 4), 'target': (8, 8, 4)}.
      batch_size: global batch size; this process yields its `batch_size / process_count` rows.
      seed: data seed.
    """

    def __init__(self, spec: Mapping[str, tuple[int, ...]], batch_size: int, seed: int = 0):
        if batch_size % jax.process_count():
            raise ValueError(f"data.batch_size={batch_size} must be a multiple of {jax.process_count()} processes")
        self.spec = dict(spec)
        self.batch_size = batch_size
        self.seed = seed
        self.index = 0

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.index))
        full = {k: rng.standard_normal((self.batch_size,) + tuple(s), dtype=np.float32) for k, s in self.spec.items()}
        self.index += 1
        rows = self.batch_size // jax.process_count()
        lo = jax.process_index() * rows
        return {k: v[lo : lo + rows] for k, v in full.items()}

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: Optional[Mapping[str, int]]) -> None:
        self.index = int(state["index"]) if state else 0
