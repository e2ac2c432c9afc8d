"""Real-photo evaluation data: FOLDER/<identity>/<photo> -> references and held-out targets per identity.

FlashFace's protocol: for each identity, K photos are the references the method is conditioned on and another
photo of the same person (never shown to the method) is the target of SimTarget. Photos are taken in name order;
the first K photos with a detected face are the references and the last `num_targets` the targets. Photos without
a detectable face and identities with too few usable photos are not silently dropped: `DataPlan` lists them by
name and the report prints them. The face analysis of each photo (box, aligned crop, embedding) is cached under
OUT/data/ so a rerun reads it back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """Unusable --data folder; the message names the folder and what was expected."""


@dataclasses.dataclass
class PhotoFace:
    """Face analysis of one data photo (cached)."""

    path: str  # relative to the data folder: identity/photo
    has_face: bool
    box: Optional[list[float]] = None  # x0, y0, x1, y1 of the largest face
    embedding: Optional[np.ndarray] = None  # (D,) unit-length recognizer embedding
    crop: Optional[str] = None  # aligned face crop, relative to OUT


@dataclasses.dataclass
class IdentitySplit:
    """One person's references and held-out targets (paths relative to the data folder)."""

    name: str
    references: list[str]
    targets: list[str]


@dataclasses.dataclass
class DataPlan:
    """What the harness evaluates and what it could not use (reported by name)."""

    identities: list[IdentitySplit]
    faceless: list[str]  # photos where no face was detected
    too_few: dict[str, int]  # identity -> usable photos, when fewer than references + targets
    unreadable: dict[str, str]  # photo -> error

    def usable_photos(self) -> list[str]:
        return [p for s in self.identities for p in s.references + s.targets]


def scan_folder(folder: Path, flag: str = "--data") -> dict[str, list[str]]:
    """identity -> sorted photo paths (relative) of FOLDER/<identity>/<photo>."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder (expected FOLDER/<identity>/<photo>)")
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = sorted(f"{sub.name}/{f.name}" for f in sub.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if photos:
            out[sub.name] = photos
    if not out:
        raise DataError(f"{flag} {folder}: no identity folders with photos (expected FOLDER/<identity>/<photo> "
                        f"with {', '.join(IMAGE_SUFFIXES)} files)")
    return out


def analyze_photos(folder: Path, photos: list[str], face_metric, cache_dir: Path, progress: bool = True):
    """Face analysis of every photo, cached per photo in cache_dir (OUT/data). Returns (faces, unreadable, new)."""
    from PIL import Image
    from tqdm import tqdm

    from fusion_jax.data.images import read_image

    faces: dict[str, PhotoFace] = {}
    unreadable: dict[str, str] = {}
    new = 0
    for rel in tqdm(photos, desc="data photos", unit="photo", disable=not progress):
        record = cache_dir / "faces" / (rel + ".json")
        if record.is_file():
            d = json.loads(record.read_text())
            if d.get("unreadable"):
                unreadable[rel] = d["unreadable"]
                continue
            emb = np.asarray(d["embedding"], np.float32) if d.get("embedding") is not None else None
            faces[rel] = PhotoFace(rel, d["has_face"], d.get("box"), emb, d.get("crop"))
            continue
        record.parent.mkdir(parents=True, exist_ok=True)
        new += 1
        try:
            image = read_image(Path(folder) / rel)
        except Exception as e:  # corrupt / unsupported file: named in the report, not fatal
            unreadable[rel] = str(e)
            record.write_text(json.dumps({"unreadable": str(e)}))
            continue
        result = face_metric.analyze(image)
        if result is None:
            face = PhotoFace(rel, False)
        else:
            crop_rel = f"data/crops/{rel}.png"
            (cache_dir / "crops" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(result.crop).save(cache_dir / "crops" / (rel + ".png"))
            face = PhotoFace(rel, True, [round(float(v), 1) for v in result.box], result.embedding, crop_rel)
        record.write_text(json.dumps({"has_face": face.has_face, "box": face.box, "crop": face.crop,
                                      "embedding": None if face.embedding is None else face.embedding.tolist()}))
        faces[rel] = face
    return faces, unreadable, new


def plan(photos_by_identity: dict[str, list[str]], faces: dict[str, PhotoFace], unreadable: dict[str, str],
         num_references: int, num_targets: int, folder: Path, flag: str = "--data") -> DataPlan:
    """Split each identity's usable photos into references (first K) and targets (last T)."""
    identities, faceless, too_few = [], [], {}
    for name, photos in photos_by_identity.items():
        usable = [p for p in photos if p in faces and faces[p].has_face]
        faceless += [p for p in photos if p in faces and not faces[p].has_face]
        if len(usable) < num_references + num_targets:
            too_few[name] = len(usable)
            continue
        identities.append(IdentitySplit(name, usable[:num_references], usable[-num_targets:]))
    if not identities:
        details = "; ".join(f"{k}: {v} usable photo(s)" for k, v in too_few.items())
        raise DataError(f"{flag} {folder}: no usable identity: each needs {num_references + num_targets} photos with a "
                        f"detectable face ({num_references} references + {num_targets} held-out) ({details}"
                        + (f"; no face in {faceless}" if faceless else "") + ")")
    return DataPlan(identities, faceless, too_few, unreadable)
