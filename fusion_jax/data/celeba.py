"""TFDS `celeb_a` as a random-access face source (the `sources.FaceSource` protocol).

celeb_a's aligned photos (218 x 178) come with 5 landmarks and an identity label per photo
(`identity/Identity_No`), so no detector is needed: the face box and the aligned reference crop are
derived from the given landmarks. ArcFace embeddings are computed on the fly when a `FaceAnalyzer`
with embeddings is given, else they are zeros with `has_embedding` False. TFDS cannot download
celeb_a here (it comes from Google Drive): prepare it once where it can, then point `data_dir` at it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from fusion_jax.data.faces import FaceAnalyzer, align_face, box_from_landmarks
from fusion_jax.data.sources import make_record

# celeb_a landmark feature names, in face-record landmark order (left eye, right eye, nose, mouth corners).
CELEBA_LANDMARK_KEYS = (
    ("lefteye_x", "lefteye_y"),
    ("righteye_x", "righteye_y"),
    ("nose_x", "nose_y"),
    ("leftmouth_x", "leftmouth_y"),
    ("rightmouth_x", "rightmouth_y"),
)


def celeba_landmarks(example: dict) -> np.ndarray:
    """The (5, 2) float32 landmarks of one celeb_a example; KeyError names a missing field."""
    marks = example["landmarks"]
    try:
        return np.array([[marks[x], marks[y]] for x, y in CELEBA_LANDMARK_KEYS], np.float32)
    except KeyError as error:
        raise KeyError(f"celeb_a example has no landmark field {error}; expected {CELEBA_LANDMARK_KEYS}") from error


def celeba_identity(example: dict) -> int:
    """The identity number of one celeb_a example (feature `identity/Identity_No`)."""
    return int(np.asarray(example["identity"]["Identity_No"]))


class CelebASource:
    """Face records from celeb_a examples (any random-access sequence of them, e.g. a TFDS data source)."""

    def __init__(
        self,
        examples: Sequence[dict],
        reference_size: int = 256,
        reference_margin: float = 0.4,
        caption: str = "a photo of a person",
        analyzer: Optional[FaceAnalyzer] = None,
        identities: Optional[np.ndarray] = None,
    ):
        """`examples`: celeb_a examples; `identities`: their identity numbers when already known
        (else read once from `examples`); other fields: as `FaceIdentitiesBuildConfig`."""
        self._examples = examples
        self.reference_size = reference_size
        self.reference_margin = reference_margin
        self.caption = caption
        self.analyzer = analyzer if analyzer is not None and analyzer.embeddings_available else None
        if identities is None:
            identities = np.array([celeba_identity(examples[i]) for i in range(len(examples))], np.int64)
        self._identities = np.asarray(identities, np.int64)
        if self._identities.shape != (len(examples),):
            raise ValueError(f"identities has shape {self._identities.shape}, expected ({len(examples)},)")

    @classmethod
    def from_tfds(cls, data_dir: Optional[str] = None, split: str = "train", **kwargs) -> "CelebASource":
        """Open a prepared TFDS celeb_a (ArrayRecord) by random access; identities read without decoding images."""
        import tensorflow_datasets as tfds

        builder = tfds.builder("celeb_a", data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"celeb_a is not prepared under {builder.data_dir}; prepare it (file_format='array_record') where "
                "Google Drive is reachable and copy it there"
            )
        light = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        identities = np.array([celeba_identity(light[i]) for i in range(len(light))], np.int64)
        return cls(builder.as_data_source(split=split), identities=identities, **kwargs)

    @property
    def identities(self) -> np.ndarray:
        return self._identities

    def __len__(self) -> int:
        return len(self._identities)

    def __getitem__(self, index: int) -> dict:
        example = self._examples[int(index)]
        image = np.asarray(example["image"], np.uint8)
        landmarks = celeba_landmarks(example)
        embedding = self.analyzer.embed(image, landmarks) if self.analyzer is not None else None
        return make_record(
            image=image,
            face_crop=align_face(image, landmarks, self.reference_size, self.reference_margin),
            face_box=box_from_landmarks(landmarks, image.shape),
            landmarks=landmarks,
            identity=int(self._identities[int(index)]),
            photo_id=int(index),
            caption=self.caption,
            embedding=embedding,
        )
