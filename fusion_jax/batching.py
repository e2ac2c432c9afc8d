"""Run a jitted function over an array in fixed-size batches (one compiled shape: the last batch is padded)."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np


def map_padded_batches(fn: Callable, items: np.ndarray, batch_size: int, empty_shape: tuple) -> np.ndarray:
    """`fn` on consecutive `batch_size` rows of `items` (the last batch zero-padded, padding rows dropped from the
    result), concatenated as float64; `empty_shape` is the result's shape for no items."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(jnp.asarray(chunk)), np.float64)[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros(empty_shape)
