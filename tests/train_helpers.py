"""Shared helpers for the trainer tests: tiny configs, host copies of states, batch iterators with faults."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np

from fusion_jax.config import ExperimentConfig, load_config
from fusion_jax.training.synthetic import SyntheticBatches
from fusion_jax.training.tiny import BATCH_SPEC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "tiny.yaml")


def tiny_config(*overrides: str) -> ExperimentConfig:
    """configs/tiny.yaml with quiet logging and the given key=value overrides."""
    return load_config(TINY_YAML, ("logging.progress_bar=false", "logging.tensorboard=false") + overrides)


def host(tree: Any) -> Any:
    """A numpy copy of a (sharded) pytree."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def leaves_with_paths(tree: Any) -> dict[str, np.ndarray]:
    from fusion_jax.parallel import path_to_str

    return {path_to_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def assert_trees_equal(a: Any, b: Any) -> None:
    """Bit-for-bit equality of two pytrees (same structure, same dtypes, same bytes)."""
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        np.testing.assert_array_equal(la[path], lb[path], err_msg=path, strict=True)


class FaultyBatches(SyntheticBatches):
    """Synthetic batches with NaN written into batch `nan_index` (counted from the start of the data)."""

    def __init__(self, batch_size: int, seed: int = 0, nan_index: Optional[int] = None):
        super().__init__(BATCH_SPEC, batch_size, seed)
        self.nan_index = nan_index

    def __next__(self):
        index = self.index
        batch = super().__next__()
        if index == self.nan_index:
            batch["x"][0, 0, 0, 0] = np.nan
        return batch


def tiny_batches(config: ExperimentConfig) -> SyntheticBatches:
    return SyntheticBatches(BATCH_SPEC, config.data.batch_size, config.data.seed)


def replace_section(config: ExperimentConfig, section: str, **changes) -> ExperimentConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


class SlowBatches(SyntheticBatches):
    """Synthetic batches that take `delay` seconds each (a slow pipeline), so a test can kill a run mid-way."""

    def __init__(self, batch_size: int, seed: int = 0, delay: float = 0.0):
        super().__init__(BATCH_SPEC, batch_size, seed)
        self.delay = delay

    def __next__(self):
        import time

        time.sleep(self.delay)
        return super().__next__()


def run_tiny_training(argv: list[str]) -> int:
    """`python -m tests.train_helpers DELAY_S key=value ...`: the tiny model on configs/tiny.yaml, slowed down."""
    from fusion_jax.training.loop import train
    from fusion_jax.training.tiny import make_tiny_model, tiny_loss

    delay = float(argv[0])
    config = tiny_config(*argv[1:])
    result = train(
        config, make_tiny_model, tiny_loss, lambda c: SlowBatches(c.data.batch_size, c.data.seed, delay)
    )
    print(f"done at step {result.step}", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_tiny_training(sys.argv[1:]))
