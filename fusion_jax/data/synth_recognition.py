"""The synthetic world's face-recognition model: an ArcFace stand-in for the methods that read an embedding.

IP-Adapter-FaceID and FaceStudio condition on an ArcFace embedding per photo. Synthfaces has no real faces for
ArcFace to read, so its records can carry the embedding a perfect-but-noisy recogniser would give:

- the person's identity traits (`synthfaces.IdentityTraits`: head shape, eyes, brows, nose, mouth, colours, hair,
  glasses, mark) as a feature vector, each numeric trait scaled from its sampling range to [-1, 1], colours from
  [0, 255] to [-1, 1], categorical traits as centred one-hots (so two random people are uncorrelated on average);
- a fixed random linear map to 512 dimensions (seeded by `PROJECTION_SEED`, not by the world's seed: one
  recogniser for every world, as one ArcFace checkpoint serves every dataset), then unit norm;
- per-photo noise of norm about `embedding_noise` (seeded by world seed, identity and photo), then unit norm
  again: photos of one person differ, as ArcFace embeddings of one person's photos do.

Like ArcFace, the embedding ignores the photo's nuisance (pose, lighting, expression, gaze, background) and holds
no pixels; unlike ArcFace it is a linear code of the traits, so a model can decode appearance from it exactly up
to the noise: it favours the embedding methods, which is the conservative direction for the claim that Face
Fusion's multi-scale encoding beats one embedding token. The metrics (`synth_metrics`) never read it: SimTarget
is measured by a separately trained pixel embedder.
"""

from __future__ import annotations

import functools

import numpy as np

from fusion_jax.data import synthfaces

EMBEDDING_DIM = 512
PROJECTION_SEED = 0x5EC0  # the recogniser's "weights": fixed across worlds

# Sampling range of each numeric trait (`synthfaces.sample_identity`), mapped to [-1, 1].
NUMERIC_RANGES = {
    "face_width": (0.68, 0.9), "face_squareness": (2.0, 4.0), "chin_taper": (0.0, 0.3), "eye_y": (-0.15, 0.0),
    "eye_spacing": (0.27, 0.38), "eye_width": (0.11, 0.16), "eye_openness": (0.35, 0.8),
    "brow_thickness": (0.035, 0.085), "brow_arch": (0.0, 0.08), "brow_tilt": (-0.1, 0.08),
    "nose_length": (0.25, 0.4), "nose_width": (0.07, 0.14), "mouth_y": (0.47, 0.6), "mouth_width": (0.17, 0.28),
    "fringe_height": (-0.75, -0.52), "fringe_tilt": (-0.3, 0.3), "mark_size": (0.06, 0.2),
}
COLOURS = ("skin", "eye_colour", "lip", "hair", "mark_colour")
CATEGORIES = {"nose_style": (0, 1, 2), "hair_style": synthfaces.HAIR_STYLES, "glasses": (0, 1, 2, 3),
              "mark_kind": synthfaces.MARK_KINDS}


def trait_features(traits: synthfaces.IdentityTraits) -> np.ndarray:
    """The traits as one float64 vector, every entry in about [-1, 1] (see the module docstring)."""
    parts = [2.0 * (getattr(traits, k) - lo) / (hi - lo) - 1.0 for k, (lo, hi) in NUMERIC_RANGES.items()]
    for name in COLOURS:
        parts.extend(np.asarray(getattr(traits, name), np.float64) / 127.5 - 1.0)
    for name, values in CATEGORIES.items():
        one_hot = np.asarray([getattr(traits, name) == v for v in values], np.float64)
        parts.extend(one_hot - 1.0 / len(values))
    parts.extend(np.asarray(traits.mark_position, np.float64))  # face units, within about [-0.5, 0.85]
    parts.extend((np.cos(2 * traits.mark_angle), np.sin(2 * traits.mark_angle)))  # a scar's line has no direction
    return np.asarray(parts, np.float64)


@functools.lru_cache(maxsize=None)
def projection(num_features: int) -> np.ndarray:
    """The fixed random map (num_features, 512), Gaussian with variance 1 / num_features."""
    rng = np.random.default_rng(PROJECTION_SEED)
    return rng.standard_normal((num_features, EMBEDDING_DIM)) / np.sqrt(num_features)


def identity_embedding(traits: synthfaces.IdentityTraits) -> np.ndarray:
    """Unit-norm (512,) float64 code of one person, the same for all their photos."""
    features = trait_features(traits)
    code = features @ projection(len(features))
    return code / np.linalg.norm(code)


def photo_embedding(traits: synthfaces.IdentityTraits, identity_id: int, photo_id: int, config) -> np.ndarray:
    """The recogniser's unit-norm float32 (512,) embedding of photo `photo_id` of person `identity_id`: the identity
    code plus noise of norm about `config.embedding_noise`, a pure function of (ids, config.seed)."""
    rng = np.random.default_rng([int(config.seed), int(identity_id), int(photo_id), 0xE3B])
    noise = rng.standard_normal(EMBEDDING_DIM) * (config.embedding_noise / np.sqrt(EMBEDDING_DIM))
    embedding = identity_embedding(traits) + noise
    return (embedding / np.linalg.norm(embedding)).astype(np.float32)
