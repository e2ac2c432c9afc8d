"""The face-record contract shared by every face data source, and small helpers around it.

A **face record** is one photo of one person, as a dict of NumPy values:

=================  =====================  =========================================================
key                type / shape           meaning
=================  =====================  =========================================================
``image``          uint8 (H, W, 3)        the photo, RGB
``face_crop``      uint8 (S, S, 3)        the largest face aligned to the (margin-widened) template
``face_box``       float32 (4,)           [x0, y0, x1, y1] pixels of ``image`` (largest face)
``landmarks``      float32 (5, 2)         eyes, nose, mouth corners (x, y) pixels of ``image``
``embedding``      float32 (512,)         L2-normalised ArcFace embedding (zeros when unavailable)
``has_embedding``  bool                   whether ``embedding`` is real
``identity``       int64                  person id
``photo_id``       int64                  photo id, unique within the identity
``caption``        str                    text describing the photo
=================  =====================  =========================================================

A **random-access face source** offers ``__len__()``, ``__getitem__(i) -> record`` and ``identities``
(an int64 array (len,), the identity of each index, readable without decoding any image), so the
pipeline can group photos by person cheaply. Optionally, ``reference_crop(i) -> uint8 (S, S, 3)`` returns
only the aligned crop (without decoding or rendering the photo); the pipeline uses it for references when
present, else ``source[i]["face_crop"]``. Sources: the `face_identities` TFDS builder
(`face_identities.FaceIdentitiesSource`), TFDS `celeb_a` (`celeba.CelebASource`), `synthfaces`, and
`InMemoryFaceSource` below.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from fusion_jax.data.faces import EMBEDDING_DIM

# The keys of a face record, in a fixed order.
RECORD_KEYS = ("image", "face_crop", "face_box", "landmarks", "embedding", "has_embedding", "identity", "photo_id", "caption")


@runtime_checkable
class FaceSource(Protocol):
    """Random access to face records; see the module docstring for the record layout."""

    @property
    def identities(self) -> np.ndarray:  # int64 (len,)
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


def make_record(
    image: np.ndarray,
    face_crop: np.ndarray,
    face_box: np.ndarray,
    landmarks: np.ndarray,
    identity: int,
    photo_id: int,
    caption: str,
    embedding: np.ndarray | None = None,
) -> dict:
    """Build a face record with the contract's dtypes (embedding None -> zeros, has_embedding False)."""
    has_embedding = embedding is not None
    return {
        "image": np.asarray(image, np.uint8),
        "face_crop": np.asarray(face_crop, np.uint8),
        "face_box": np.asarray(face_box, np.float32).reshape(4),
        "landmarks": np.asarray(landmarks, np.float32).reshape(5, 2),
        "embedding": np.asarray(embedding, np.float32).reshape(EMBEDDING_DIM) if has_embedding else np.zeros(EMBEDDING_DIM, np.float32),
        "has_embedding": np.bool_(has_embedding),
        "identity": np.int64(identity),
        "photo_id": np.int64(photo_id),
        "caption": str(caption),
    }


def validate_record(record: Mapping, where: str = "record") -> None:
    """Raise ValueError naming `where` and the field when a record breaks the contract."""
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}; a face record has {list(RECORD_KEYS)}")

    def check(key, dtype, shape_ok, expected):
        value = np.asarray(record[key])
        if value.dtype != dtype or not shape_ok(value.shape):
            raise ValueError(f"{where}: field {key!r} is {value.dtype} {value.shape}, expected {expected}")

    check("image", np.uint8, lambda s: len(s) == 3 and s[-1] == 3 and s[0] > 0 and s[1] > 0, "uint8 (H, W, 3)")
    check("face_crop", np.uint8, lambda s: len(s) == 3 and s[0] == s[1] and s[-1] == 3, "uint8 (S, S, 3)")
    check("face_box", np.float32, lambda s: s == (4,), "float32 (4,)")
    check("landmarks", np.float32, lambda s: s == (5, 2), "float32 (5, 2)")
    check("embedding", np.float32, lambda s: s == (EMBEDDING_DIM,), f"float32 ({EMBEDDING_DIM},)")
    check("has_embedding", np.bool_, lambda s: s == (), "bool scalar")
    check("identity", np.int64, lambda s: s == (), "int64 scalar")
    check("photo_id", np.int64, lambda s: s == (), "int64 scalar")
    if not isinstance(record["caption"], (str, bytes, np.str_, np.bytes_)):
        raise ValueError(f"{where}: field 'caption' is {type(record['caption']).__name__}, expected str")


def caption_text(value) -> str:
    """A caption as `str` (TFDS returns text features as bytes)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray):
        return caption_text(value.item())
    return str(value)


def photos_by_identity(identities: np.ndarray) -> dict[int, np.ndarray]:
    """Map each identity to the sorted source indices of its photos."""
    identities = np.asarray(identities, np.int64)
    order = np.argsort(identities, kind="stable")
    sorted_ids = identities[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(sorted_ids)]
    return {int(sorted_ids[s]): np.sort(order[s:e]) for s, e in zip(starts, ends)}


class InMemoryFaceSource:
    """A face source over a list of records held in memory (tests, small experiments)."""

    def __init__(self, records: Sequence[dict]):
        for i, record in enumerate(records):
            validate_record(record, where=f"InMemoryFaceSource record {i}")
        self._records = list(records)
        self._identities = np.array([int(r["identity"]) for r in self._records], np.int64)

    @property
    def identities(self) -> np.ndarray:
        return self._identities

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[int(index)]
