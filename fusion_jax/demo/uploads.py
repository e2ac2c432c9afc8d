"""Checks of what a demo user uploads, before anything reaches the model: one message per bad photo.

A web page gets whatever a browser sends: a text file named `.png`, a 50 MB panorama, a group photo. Each check
here turns one such case into an `UploadError` whose message names the person and the file and says what was
expected, so the page can show it and the server carries on. The checks, in order (cheap first):

1. the file's size (`UploadLimits.max_megabytes`), read from the file system without opening it;
2. the image header (PIL reads only the header): not an image, or more than `max_megapixels` pixels (a
   decompression bomb would pass the size check);
3. decoding (`fusion_jax.data.images.read_image`: EXIF rotation, any colour mode);
4. faces: none, or more than one face of comparable size (`second_face_ratio` of the largest face's area; a small
   face far behind the subject is ignored, as `references.reference_crop` takes the largest face anyway).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np


class UploadError(ValueError):
    """A bad upload; the message is meant for the page (names the person and the file)."""


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """What the demo accepts per person and per photo."""

    max_people: int = 2  # people (identities) per request
    max_photos: int = 4  # reference photos per person
    max_megabytes: float = 20.0  # file size of one photo
    max_megapixels: float = 40.0  # decoded size of one photo (width x height / 1e6)
    second_face_ratio: float = 0.25  # a second face with at least this fraction of the largest's area is an error

    def __post_init__(self):
        for name in ("max_people", "max_photos"):
            if getattr(self, name) < 1:
                raise ValueError(f"UploadLimits.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_megabytes", "max_megapixels", "second_face_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"UploadLimits.{name} must be > 0, got {getattr(self, name)}")


def display_name(path) -> str:
    """The file name a user recognises (Gradio keeps the uploaded name as the last path component)."""
    return Path(str(path)).name


def check_photo(path, who: str, analyzer, limits: UploadLimits = UploadLimits()) -> np.ndarray:
    """One uploaded photo -> its RGB uint8 array; `UploadError` naming `who` ('person 1') and the file if bad."""
    from PIL import Image, UnidentifiedImageError

    from fusion_jax.data.images import read_image

    name = display_name(path)
    label = f"{who}, photo {name!r}"
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise UploadError(f"{label}: the upload cannot be read ({e.strerror or e})") from None
    megabytes = size / 2**20
    if megabytes > limits.max_megabytes:
        raise UploadError(f"{label}: {megabytes:.1f} MB is over the {limits.max_megabytes:g} MB limit per photo; "
                          "upload a smaller JPEG or PNG")
    if size == 0:
        raise UploadError(f"{label}: the file is empty; expected a JPEG, PNG or WebP photo")
    try:
        with Image.open(path) as im:  # header only
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        kind = "not an image" if isinstance(e, UnidentifiedImageError) else f"not a readable image ({e})"
        raise UploadError(f"{label}: {kind}; expected a JPEG, PNG or WebP photo") from None
    if width * height > limits.max_megapixels * 1e6:
        raise UploadError(f"{label}: {width}x{height} pixels is over the {limits.max_megapixels:g} megapixel limit; "
                          "upload a smaller photo")
    try:
        image = read_image(path)
    except Exception as e:  # CorruptImageError and friends: a truncated file, a bad chunk
        raise UploadError(f"{label}: the image cannot be decoded ({e}); expected a JPEG, PNG or WebP photo") from None
    faces = analyzer.detect(image, with_embeddings=False)
    if not faces:
        raise UploadError(f"{label}: no face found by the {analyzer.backend} detector; upload a photo where this "
                          "person's face is clearly visible (frontal, not too small)")
    rivals = [f for f in faces[1:] if f.area >= limits.second_face_ratio * faces[0].area]
    if rivals:
        raise UploadError(f"{label}: {1 + len(rivals)} faces found; each reference photo must show only this "
                          "person (crop the photo, or give the other person their own photos)")
    return image


def check_people(people, analyzer, limits: UploadLimits = UploadLimits()) -> None:
    """Counts and every photo of `people` (a list of lists of paths, empty lists already dropped)."""
    if len(people) > limits.max_people:
        raise UploadError(f"{len(people)} people given; the demo takes at most {limits.max_people}")
    for k, photos in enumerate(people):
        who = f"person {k + 1}"
        if len(photos) > limits.max_photos:
            raise UploadError(f"{who}: {len(photos)} photos uploaded; give 1 to {limits.max_photos}")
        for path in photos:
            check_photo(path, who, analyzer, limits)


__all__ = ["UploadError", "UploadLimits", "check_people", "check_photo", "display_name"]
