"""Reference photos for identity-conditioned generation: command-line values -> aligned crops, per identity.

- `parse_reference(value)`: `[ID:]PATH` -> (identity index, path); `group_references` -> one list of paths per
  identity 0..K-1 (several photos of one person are concatenated by the model).
- `parse_box(value)`, `check_boxes(...)`: `x0,y0,x1,y1` pixel boxes of each identity's region in the generated
  image; `parse_strengths` / `strengths_per_identity`: one strength or one per identity.
- `reference_crop(image, analyzer, name, size, margin)`: the largest face of a photo aligned to the ArcFace
  template (widened by `margin`, as the training data's `face_crop`), `NoFaceError` naming the photo if none.
- `reference_set(groups, analyzer, size, margin)`: the crops of all identities as one (K, N, S, S, 3) array in
  [-1, 1] plus a (K, N) validity mask (identities with fewer photos are padded, the padding is never attended).

Errors are `ReferenceError` (a ValueError) whose message starts with the command-line flag it is about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

_ID_PREFIX = re.compile(r"^(\d+):(.+)$")
DEFAULT_MARGIN = 0.4  # the training data's reference crop margin (data/celeba.py, data/face_identities.py)


class ReferenceError(ValueError):
    """A bad reference / identity argument; the message names the flag (or the photo)."""


def parse_reference(value: str, flag: str = "--reference") -> tuple[int, Path]:
    """`[ID:]PATH` -> (ID, PATH); ID is a 0-based identity index, 0 when absent."""
    if not value:
        raise ReferenceError(f"{flag}: empty value; expected [ID:]PATH")
    m = _ID_PREFIX.match(value)
    if m:
        return int(m.group(1)), Path(m.group(2))
    return 0, Path(value)


def group_references(values: Sequence[str], flag: str = "--reference") -> list[list[Path]]:
    """`[ID:]PATH` values -> per-identity path lists, identities 0..K-1 (each must have at least one photo)."""
    groups: dict[int, list[Path]] = {}
    for value in values:
        k, path = parse_reference(value, flag)
        groups.setdefault(k, []).append(path)
    if not groups:
        return []
    missing = sorted(set(range(max(groups) + 1)) - set(groups))
    if missing:
        raise ReferenceError(f"{flag}: identity indices must be 0..K-1 without gaps; no photo for identity "
                             f"{missing} (got identities {sorted(groups)})")
    return [groups[k] for k in range(len(groups))]


def parse_box(value: str, flag: str = "--identity-box") -> tuple[float, float, float, float]:
    """`x0,y0,x1,y1` (pixels) -> a tuple of 4 floats."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise ReferenceError(f"{flag}: expected x0,y0,x1,y1 in pixels, got {value!r}")
    return box  # type: ignore[return-value]


def check_boxes(boxes: Sequence[Sequence[float]], num_ids: int, height: int | None = None, width: int | None = None,
                flag: str = "--identity-box", ref_flag: str = "--reference") -> np.ndarray | None:
    """Validate per-identity boxes against the identity count and (given its size) the image; returns (K, 4)
    float64 or None."""
    if not boxes:
        if num_ids > 1:
            raise ReferenceError(f"{flag}: {num_ids} identities given with {ref_flag} ID:PATH but no boxes; give one "
                                 f"{flag} x0,y0,x1,y1 per identity (in order 0..{num_ids - 1})")
        return None
    if num_ids == 0:
        raise ReferenceError(f"{flag}: boxes given without any {ref_flag}")
    if len(boxes) > num_ids:
        raise ReferenceError(f"{flag}: {len(boxes)} identity boxes but only {num_ids} reference set(s) "
                             f"({ref_flag} ID:PATH, ID 0..{num_ids - 1})")
    if len(boxes) < num_ids:
        raise ReferenceError(f"{flag}: {len(boxes)} identity box(es) for {num_ids} identities; give one per identity")
    arr = np.asarray(boxes, np.float64).reshape(len(boxes), 4)
    if height is None or width is None:
        return arr
    for k, (x0, y0, x1, y1) in enumerate(arr):
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ReferenceError(f"{flag} #{k} ({x0:g},{y0:g},{x1:g},{y1:g}) is not a box inside the {width}x{height} "
                                 "generated image (need 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    return arr


def parse_strengths(values: Sequence[str] | None, flag: str = "--reference-strength") -> list[float]:
    """Repeated and/or comma-separated strengths -> floats (each >= 0)."""
    out = []
    for value in values or []:
        for part in str(value).split(","):
            try:
                s = float(part)
            except ValueError:
                raise ReferenceError(f"{flag}: {part!r} is not a number") from None
            if not np.isfinite(s) or s < 0:
                raise ReferenceError(f"{flag}: strengths must be finite and >= 0, got {part!r}")
            out.append(s)
    return out


def strengths_per_identity(strengths: Sequence[float], num_ids: int, default: float,
                           flag: str = "--reference-strength") -> np.ndarray:
    """None / one value (all identities) / one per identity -> (K,) float32."""
    if not strengths:
        return np.full((num_ids,), default, np.float32)
    if len(strengths) == 1:
        return np.full((num_ids,), strengths[0], np.float32)
    if len(strengths) != num_ids:
        raise ReferenceError(f"{flag}: {len(strengths)} values for {num_ids} identities; give one value or one per "
                             "identity")
    return np.asarray(strengths, np.float32)


def reference_crop(image: np.ndarray, analyzer, name: str, size: int, margin: float = DEFAULT_MARGIN):
    """Largest face of an RGB uint8 photo -> ((size, size, 3) uint8 aligned crop, the `Face`)."""
    from fusion_jax.data.faces import align_face

    face = analyzer.largest_face(image, name=name, required=True)
    return align_face(image, face.landmarks, size, margin), face


@dataclass
class ReferenceSet:
    """Aligned reference crops of K identities (N = the most photos any identity has)."""

    crops: np.ndarray  # (K, N, S, S, 3) float32 in [-1, 1]; padding slots repeat the identity's last crop
    valid: np.ndarray  # (K, N) bool, False for padding
    records: list[dict] = field(default_factory=list)  # per photo: identity, index, path, face box, detector
    # (K, N, D) float32 ArcFace embeddings of the crops' faces (padding slots repeat the identity's last one);
    # None when the detector gives no embeddings (the OpenCV fallback, or no recognition model)
    embeddings: Optional[np.ndarray] = None

    @property
    def num_ids(self) -> int:
        return self.crops.shape[0]

    def uint8_crops(self) -> list[tuple[int, int, np.ndarray]]:
        """(identity, index, uint8 crop) of every real (non-padding) reference."""
        out = []
        for k in range(self.crops.shape[0]):
            for n in range(self.crops.shape[1]):
                if self.valid[k, n]:
                    out.append((k, n, np.round((self.crops[k, n] + 1) * 127.5).astype(np.uint8)))
        return out


def reference_set(groups: Sequence[Sequence[Path]], analyzer, size: int, margin: float = DEFAULT_MARGIN,
                  flag: str = "--reference") -> ReferenceSet:
    """Per-identity photo paths -> `ReferenceSet`. Unreadable photos and photos without a face raise errors
    naming the flag and the file."""
    from fusion_jax.data.faces import NoFaceError
    from fusion_jax.data.images import read_image

    if not groups:
        raise ReferenceError(f"{flag}: no reference photos")
    if size <= 0:
        raise ReferenceError(f"reference crop size must be positive, got {size}")
    per_id: list[list[np.ndarray]] = []
    per_id_embeddings: list[list[Optional[np.ndarray]]] = []
    records = []
    for k, paths in enumerate(groups):
        crops, embeddings = [], []
        for n, path in enumerate(paths):
            try:
                image = read_image(path)
            except Exception as e:  # CorruptImageError / OSError: name the flag and file
                raise ReferenceError(f"{flag} {path}: cannot read the photo ({e})") from e
            try:
                crop, face = reference_crop(image, analyzer, str(path), size, margin)
            except NoFaceError as e:
                raise ReferenceError(f"{flag} {path}: no face found in the photo ({e})") from e
            crops.append(crop)
            embeddings.append(None if face.embedding is None else np.asarray(face.embedding, np.float32))
            records.append({"identity": k, "index": n, "path": str(path),
                            "face_box": [round(float(v), 1) for v in face.box], "detector": analyzer.backend})
        per_id.append(crops)
        per_id_embeddings.append(embeddings)
    n_max = max(len(c) for c in per_id)
    out = np.zeros((len(per_id), n_max, size, size, 3), np.float32)
    valid = np.zeros((len(per_id), n_max), bool)
    for k, crops in enumerate(per_id):
        for n in range(n_max):
            out[k, n] = crops[min(n, len(crops) - 1)].astype(np.float32) / 127.5 - 1.0
            valid[k, n] = n < len(crops)
    found = [e for es in per_id_embeddings for e in es]
    embeddings = None
    if found and all(e is not None for e in found):
        embeddings = np.stack([np.stack([es[min(n, len(es) - 1)] for n in range(n_max)]) for es in per_id_embeddings])
    return ReferenceSet(out, valid, records, embeddings)


__all__ = [
    "DEFAULT_MARGIN", "ReferenceError", "ReferenceSet", "check_boxes", "group_references", "parse_box",
    "parse_reference", "parse_strengths", "reference_crop", "reference_set", "strengths_per_identity",
]
