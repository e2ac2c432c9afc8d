"""Numbers of the reproduction tables: identity similarities from embeddings, bootstrap intervals, FID.

- `identity_scores(generated, references, target)`: FlashFace's protocol on ArcFace embeddings. SimRef is the
  mean cosine similarity of a generated face to the K reference faces it was conditioned on, SimTarget its cosine
  similarity to a held-out photo of the same person, Paste = SimRef - SimTarget (high Paste = copying the
  references rather than drawing the person).
- `bootstrap_mean_interval(values, groups)`: the mean over images and a 95% percentile interval from resampling
  *identities* with replacement (images of one person are not independent draws, so identities are the unit).
- `fid(features_a, features_b)`: Frechet distance of Gaussians fitted to Inception pool3 features, in float64,
  computed as pytorch-fid's `calculate_frechet_distance` (`fusion_jax.synth_metrics.frechet_distance`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError(f"{name}: an all-zero embedding has no direction")
    return x / norm


def identity_scores(generated: np.ndarray, references: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SimRef, SimTarget, Paste of one generated face.

    generated: (D,) embedding of the generated face; references: (K, D) embeddings of the conditioning faces;
    target: (D,) or (T, D) held-out photo(s) of the person (several are averaged).
    """
    g = _unit(generated, "generated")
    refs = _unit(np.atleast_2d(references), "references")
    targets = _unit(np.atleast_2d(target), "target")
    if g.ndim != 1 or refs.shape[1] != g.shape[0] or targets.shape[1] != g.shape[0]:
        raise ValueError(f"embedding widths differ: generated {g.shape}, references {refs.shape}, target "
                         f"{targets.shape}")
    sim_ref = float(np.mean(refs @ g))
    sim_target = float(np.mean(targets @ g))
    return {"sim_ref": sim_ref, "sim_target": sim_target, "paste": sim_ref - sim_target}


def bootstrap_mean_interval(values: Sequence[float], groups: Sequence[str], *, num_samples: int = 2000,
                            level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its `level` percentile interval, resampling groups.

    Each bootstrap sample draws as many groups as there are, with replacement, and takes the mean over all
    values of the drawn groups (a group drawn twice counts twice). NaN values (e.g. no face found) are left out
    before grouping. With one group the interval is the single mean (no spread can be estimated).
    """
    values = np.asarray(values, np.float64)
    groups = np.asarray(groups, object)
    if values.shape != groups.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and groups {groups.shape} must be equal 1-D shapes")
    keep = np.isfinite(values)
    values, groups = values[keep], groups[keep]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    names, index = np.unique(groups.astype(str), return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)
    mean = float(values.mean())
    if len(names) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(num_samples, len(names)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def bootstrap_statistic_interval(groups: Sequence[str], statistic: Callable[[np.ndarray], float], *,
                                 num_samples: int = 50, level: float = 0.95,
                                 seed: int = 0) -> tuple[float, float, float]:
    """(value, low, high) of `statistic(indices)` over rows, resampling groups (for FID: rows are images).

    `statistic` gets the row indices of the resampled groups (with repeats). Costly statistics (FID: one matrix
    square root per sample) use few samples; the interval is then rough, and the table says how many.
    """
    groups = np.asarray(groups, object).astype(str)
    names, index = np.unique(groups, return_inverse=True)
    rows = [np.flatnonzero(index == i) for i in range(len(names))]
    value = float(statistic(np.arange(len(groups))))
    if len(names) < 2 or num_samples < 1:
        return value, value, value
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(num_samples):
        picked = np.concatenate([rows[i] for i in rng.integers(0, len(names), len(names))])
        boot.append(statistic(picked))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(boot, np.float64), [alpha, 1.0 - alpha])
    return value, float(low), float(high)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D), (N_b, D): float64 statistics, pytorch-fid's formula."""
    from fusion_jax.synth_metrics import feature_frechet_distance

    return feature_frechet_distance(features_a, features_b)
