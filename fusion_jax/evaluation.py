"""Identity and prompt metrics: SimRef, SimTarget, Paste, prompt accuracy, face verification.

Why: the reproduction experiments (docs/DESIGN.md section 7) ask two questions of every generated image: does it
keep the reference person (cosine similarity of identity embeddings against the references, SimRef, and
against a held-out photo of the same person, SimTarget; Paste = SimRef - SimTarget is FlashFace's measure of
copy-pasting the reference) and does it follow the prompt (prompt accuracy)?

Everything here is generic: an *embedder* is any callable `images (N, H, W, 3) -> embeddings (N, D)` (the
synthetic-face embedder of `fusion_jax.synth_metrics`, or ArcFace on real faces) and a *reader* is any
callable `images -> labels (N, A)` of class indices. `python -m fusion_jax.evaluation --out DIR` trains and
caches the synthetic-face embedder and attribute readers (see `fusion_jax.synth_metrics`).
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

import numpy as np

EmbedFn = Callable[[np.ndarray], np.ndarray]  # images (N, H, W, 3) -> embeddings (N, D)
ReadFn = Callable[[np.ndarray], np.ndarray]  # images (N, H, W, 3) -> class indices (N, A)


def _check_images(name: str, images: np.ndarray, ndim: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != ndim or images.shape[-1] != 3:
        shape = "(N, H, W, 3)" if ndim == 4 else "(N, R, H, W, 3)"
        raise ValueError(f"{name} must have shape {shape}, got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return images


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) embedding arrays (need not be unit length) -> (N,)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must both have shape (N, D), got {a.shape} and {b.shape}")
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    if np.any(norm_a == 0) or np.any(norm_b == 0):
        raise ValueError("cosine similarity is undefined for an all-zero embedding")
    return np.sum(a * b, axis=1) / (norm_a * norm_b)


def identity_similarity(embed_fn: EmbedFn, images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the identity embeddings of paired images -> (N,)."""
    images_a = _check_images("images_a", images_a, 4)
    images_b = _check_images("images_b", images_b, 4)
    if len(images_a) != len(images_b):
        raise ValueError(f"images_a and images_b must pair up, got {len(images_a)} and {len(images_b)} images")
    return cosine_similarity(np.asarray(embed_fn(images_a)), np.asarray(embed_fn(images_b)))


def _similarity_to_sets(embed_fn: EmbedFn, generated: np.ndarray, others: np.ndarray, name: str) -> np.ndarray:
    """Mean cosine similarity of generated[n] to each image of others[n] (N, H, W, 3) or (N, R, H, W, 3)."""
    generated = _check_images("generated", generated, 4)
    others = np.asarray(others)
    if others.ndim == 4:
        others = others[:, None]
    others = _check_images(name, others, 5)
    if len(others) != len(generated):
        raise ValueError(f"{name} must have one entry per generated image ({len(generated)}), got {len(others)}")
    n, r = others.shape[:2]
    gen_embeddings = np.asarray(embed_fn(generated))
    other_embeddings = np.asarray(embed_fn(others.reshape(n * r, *others.shape[2:])))
    sims = cosine_similarity(np.repeat(gen_embeddings, r, axis=0), other_embeddings)
    return sims.reshape(n, r).mean(axis=1)


def sim_ref(embed_fn: EmbedFn, generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """SimRef per generated image: mean identity similarity to the references it was conditioned on.

    references: (N, H, W, 3) one per image, or (N, R, H, W, 3) R per image (averaged). Returns (N,).
    """
    return _similarity_to_sets(embed_fn, generated, references, "references")


def sim_target(embed_fn: EmbedFn, generated: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """SimTarget per generated image: identity similarity to held-out photos of the same person (not the
    references), so that copying a reference is not rewarded. targets: (N, H, W, 3) or (N, T, H, W, 3)."""
    return _similarity_to_sets(embed_fn, generated, targets, "targets")


def paste(sim_ref_values: np.ndarray, sim_target_values: np.ndarray) -> np.ndarray:
    """Paste = SimRef - SimTarget (FlashFace): how much closer to the references than to the person."""
    sim_ref_values = np.asarray(sim_ref_values, np.float64)
    sim_target_values = np.asarray(sim_target_values, np.float64)
    if sim_ref_values.shape != sim_target_values.shape:
        raise ValueError(f"sim_ref_values {sim_ref_values.shape} and sim_target_values {sim_target_values.shape} "
                         "must have the same shape")
    return sim_ref_values - sim_target_values


def identity_metrics(
    embed_fn: EmbedFn, generated: np.ndarray, references: np.ndarray, targets: np.ndarray
) -> dict[str, float]:
    """Means of SimRef, SimTarget and Paste over a batch of generated images."""
    ref = sim_ref(embed_fn, generated, references)
    target = sim_target(embed_fn, generated, targets)
    return {"sim_ref": float(ref.mean()), "sim_target": float(target.mean()), "paste": float(paste(ref, target).mean())}


def prompt_accuracy(
    read_fn: ReadFn, generated: np.ndarray, expected: np.ndarray, names: Sequence[str] | None = None
) -> dict[str, float]:
    """Fraction of generated images whose read attributes equal the prompted ones.

    expected: (N, A) class indices, -1 where the prompt did not state that attribute (not scored).
    Returns one accuracy per attribute (keyed by `names`, default "attribute_<a>") and "mean", the mean over
    all scored (image, attribute) pairs. Attributes never stated are left out.
    """
    generated = _check_images("generated", generated, 4)
    expected = np.asarray(expected)
    if expected.ndim != 2 or len(expected) != len(generated):
        raise ValueError(f"expected must have shape (N={len(generated)}, A), got {expected.shape}")
    names = list(names) if names is not None else [f"attribute_{a}" for a in range(expected.shape[1])]
    if len(names) != expected.shape[1]:
        raise ValueError(f"names has {len(names)} entries but expected has {expected.shape[1]} attributes")
    read = np.asarray(read_fn(generated))
    if read.shape != expected.shape:
        raise ValueError(f"read_fn returned shape {read.shape}, expected {expected.shape}")
    stated = expected >= 0
    if not stated.any():
        raise ValueError("expected states no attribute at all (all -1): nothing to score")
    correct = (read == expected) & stated
    result = {name: float(correct[:, a].sum() / stated[:, a].sum()) for a, name in enumerate(names) if stated[:, a].any()}
    result["mean"] = float(correct.sum() / stated.sum())
    return result


# ------------------------------------------------------------------------------------------------------
# Face verification (same person or not, from a similarity threshold), as for ArcFace's LFW protocol.
# ------------------------------------------------------------------------------------------------------


def verification_pairs(
    identities: np.ndarray, num_pairs: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced random pairs of sample indices: num_pairs same-identity and num_pairs different-identity.

    Returns (first, second, same) with same a bool array. Needs an identity with >= 2 samples and >= 2
    identities.
    """
    identities = np.asarray(identities)
    if identities.ndim != 1:
        raise ValueError(f"identities must be 1-D, got shape {identities.shape}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(identities == i) for i in np.unique(identities)]
    multi = [g for g in groups if len(g) >= 2]
    if not multi or len(groups) < 2:
        raise ValueError("identities needs >= 2 identities and one with >= 2 samples to form pairs")
    first, second = [], []
    for _ in range(num_pairs):
        group = multi[rng.integers(len(multi))]
        a, b = rng.choice(group, 2, replace=False)
        first.append(a)
        second.append(b)
    for _ in range(num_pairs):
        ga, gb = rng.choice(len(groups), 2, replace=False)
        first.append(rng.choice(groups[ga]))
        second.append(rng.choice(groups[gb]))
    same = np.arange(2 * num_pairs) < num_pairs
    return np.array(first), np.array(second), same


def best_threshold(similarities: np.ndarray, same: np.ndarray) -> float:
    """Similarity threshold (predict "same" when sim > threshold) with the best accuracy on these pairs."""
    similarities = np.asarray(similarities, np.float64)
    same = np.asarray(same, bool)
    if similarities.shape != same.shape or similarities.ndim != 1:
        raise ValueError(f"similarities {similarities.shape} and same {same.shape} must be equal 1-D shapes")
    values = np.sort(np.unique(similarities))
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    accuracies = [verification_accuracy(similarities, same, t) for t in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def verification_accuracy(similarities: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Fraction of pairs classified right by `similarity > threshold`."""
    similarities = np.asarray(similarities, np.float64)
    same = np.asarray(same, bool)
    return float(np.mean((similarities > threshold) == same))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train (or load cached) synthetic-face embedder and attribute readers; print their accuracies."""
    from fusion_jax import synth_metrics  # local import: synth_metrics builds on this module

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory where the trained models are cached")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic photo size the models read")
    parser.add_argument("--retrain", action="store_true", help="train again even if a cache exists")
    args = parser.parse_args(argv)
    synth_metrics.prepare_synthface_metrics(args.out, image_size=args.image_size, retrain=args.retrain, verbose=True)


if __name__ == "__main__":
    main()
