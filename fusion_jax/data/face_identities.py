"""TFDS builder `face_identities`: identity-grouped photo folders -> detected, aligned face records.

Input layout: ``root/<identity>/<photo>`` (one folder per person), plus an optional captions file of
JSON lines ``{"file": "<identity>/<photo>" or "<photo>", "caption": "..."}``; photos without a caption
get `FaceIdentitiesBuildConfig.caption_template`. Every photo is decoded (EXIF orientation, grayscale,
CMYK, 16-bit and alpha handled by `images.read_image`), its largest face detected and aligned, and
stored with the face-record fields of `sources.py`. Corrupt files, photos without a face and identities
left with fewer than two usable photos are skipped and counted in a `BuildSummary`.

The dataset is written in the ArrayRecord format so `FaceIdentitiesSource` reads it by random access
(`tfds` data source), with the identity of every index cached in ``identities.npy`` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fusion_jax.data import images as image_io
from fusion_jax.data.faces import EMBEDDING_DIM, FaceAnalyzer, FaceAnalyzerConfig, align_face
from fusion_jax.data.sources import caption_text

logger = logging.getLogger(__name__)

DATASET_NAME = "face_identities"
IDENTITIES_FILE = "identities.npy"
SUMMARY_FILE = "build_summary.json"


@dataclasses.dataclass(frozen=True)
class FaceIdentitiesBuildConfig:
    """What to read and how to crop when building `face_identities`."""

    # Folder with one sub-folder of photos per identity.
    input_dir: str = ""
    # Optional JSONL captions file ({"file": ..., "caption": ...} per line); None: template only.
    captions_file: Optional[str] = None
    # Caption for photos absent from the captions file; `{identity}` is the identity folder's name.
    caption_template: str = "a photo of a person"
    # Side of the stored aligned reference crop (FlashFace uses 224).
    reference_size: int = 256
    # Extra context around the ArcFace template in the reference crop (see `faces.alignment_template`).
    reference_margin: float = 0.4
    # Photos whose longer side exceeds this are downscaled before detection and storage (0: keep size).
    max_image_side: int = 1024
    # Face detector / embedder settings (model folder, fallback, thresholds).
    analyzer: FaceAnalyzerConfig = FaceAnalyzerConfig()


@dataclasses.dataclass
class BuildSummary:
    """Counts of a build; `to_json()` is the line `train/build_dataset.py` prints last."""

    examples: int = 0
    identities: int = 0
    skipped_corrupt: int = 0
    skipped_no_face: int = 0
    skipped_single_photo_identities: int = 0
    detector: str = ""
    embeddings_available: bool = False
    # Relative paths (or identity names) behind each skip count, for inspection.
    skipped_files: dict = dataclasses.field(default_factory=lambda: {"corrupt": [], "no_face": [], "single_photo_identities": []})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def read_captions(path: str) -> dict[str, str]:
    """Read a JSONL captions file into {file: caption}; errors name the file and line."""
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("caption"), str):
                raise ValueError(f'{path}:{number}: expected {{"file": str, "caption": str}}, got {line.strip()[:200]}')
            captions[entry["file"].replace(os.sep, "/")] = entry["caption"]
    return captions


def list_identity_folders(input_dir: str) -> list[tuple[str, list[str]]]:
    """Sorted (identity name, sorted photo file names) for each sub-folder of `input_dir`."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input_dir {input_dir!r} is not a folder (expected root/<identity>/<photo>)")
    folders = []
    for name in sorted(os.listdir(input_dir)):
        folder = os.path.join(input_dir, name)
        if os.path.isdir(folder):
            photos = sorted(f for f in os.listdir(folder) if image_io.is_photo_file(f) and os.path.isfile(os.path.join(folder, f)))
            folders.append((name, photos))
    return folders


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    longest = max(image.shape[:2])
    if max_side <= 0 or longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class FaceIdentities(tfds.core.GeneratorBasedBuilder):
    """Identity-grouped face photos with aligned crops, boxes, landmarks and ArcFace embeddings."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    # TFDS derives `code_path` through `importlib_resources`, which tensorflow-datasets 4.9.10 does not
    # install; this module's own path is the answer it would compute.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def __init__(self, *, build_config: FaceIdentitiesBuildConfig = FaceIdentitiesBuildConfig(), analyzer: Optional[FaceAnalyzer] = None, **kwargs):
        self.build_config = build_config
        self._analyzer = analyzer
        self.summary = BuildSummary()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.build_config.reference_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "face_crop": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "face_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
                    "embedding": tfds.features.Tensor(shape=(EMBEDDING_DIM,), dtype=np.float32),
                    "has_embedding": np.bool_,
                    "identity": np.int64,
                    "identity_name": tfds.features.Text(),
                    "photo_id": np.int64,
                    "file": tfds.features.Text(),
                    "caption": tfds.features.Text(),
                }
            ),
            description="Photos grouped by identity, with the largest face detected and aligned.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {"train": self._generate_examples()}

    def _analyzer_or_default(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(self.build_config.analyzer)
        return self._analyzer

    def _generate_examples(self):
        config = self.build_config
        analyzer = self._analyzer_or_default()
        captions = read_captions(config.captions_file) if config.captions_file else {}
        summary = self.summary = BuildSummary(detector=analyzer.backend, embeddings_available=analyzer.embeddings_available)
        identity_id = 0
        for identity_name, photos in list_identity_folders(config.input_dir):
            usable = []
            for photo_id, file_name in enumerate(photos):
                relative = f"{identity_name}/{file_name}"
                try:
                    image = _downscale(image_io.read_image(os.path.join(config.input_dir, identity_name, file_name)), config.max_image_side)
                except image_io.CorruptImageError as error:
                    logger.warning("skipping corrupt photo: %s", error)
                    summary.skipped_corrupt += 1
                    summary.skipped_files["corrupt"].append(relative)
                    continue
                face = analyzer.largest_face(image, name=relative, required=False)
                if face is None:
                    summary.skipped_no_face += 1
                    summary.skipped_files["no_face"].append(relative)
                    continue
                caption = captions.get(relative, captions.get(file_name, config.caption_template.format(identity=identity_name)))
                usable.append(
                    {
                        "image": image,
                        "face_crop": align_face(image, face.landmarks, config.reference_size, config.reference_margin),
                        "face_box": face.box.astype(np.float32),
                        "landmarks": face.landmarks.astype(np.float32),
                        "embedding": face.embedding if face.embedding is not None else np.zeros(EMBEDDING_DIM, np.float32),
                        "has_embedding": face.embedding is not None,
                        "photo_id": photo_id,
                        "identity_name": identity_name,
                        "file": relative,
                        "caption": caption,
                    }
                )
            if len(usable) < 2:
                summary.skipped_single_photo_identities += 1
                summary.skipped_files["single_photo_identities"].append(identity_name)
                continue
            for example in usable:
                example["identity"] = identity_id
                summary.examples += 1
                yield example["file"], example
            summary.identities += 1
            identity_id += 1
        if summary.examples == 0:
            raise ValueError(
                f"{config.input_dir}: no identity has two usable photos (corrupt {summary.skipped_corrupt}, "
                f"no face {summary.skipped_no_face}, single-photo identities {summary.skipped_single_photo_identities})"
            )


def dataset_version_dir(data_dir: str) -> str:
    """The folder holding the built dataset's files."""
    return os.path.join(os.path.expanduser(data_dir), DATASET_NAME, str(FaceIdentities.VERSION))


def build_face_identities(data_dir: str, config: FaceIdentitiesBuildConfig, analyzer: Optional[FaceAnalyzer] = None) -> BuildSummary:
    """Build `face_identities` from `config.input_dir` into `data_dir`; returns (and stores) the summary."""
    builder = FaceIdentities(build_config=config, analyzer=analyzer, data_dir=os.path.expanduser(data_dir), file_format="array_record")
    if builder.is_prepared():
        raise FileExistsError(f"{dataset_version_dir(data_dir)} already holds a built dataset; remove it or choose another --data-dir")
    builder.download_and_prepare()
    summary = builder.summary
    version_dir = dataset_version_dir(data_dir)
    np.save(os.path.join(version_dir, IDENTITIES_FILE), _read_identities(version_dir))
    with open(os.path.join(version_dir, SUMMARY_FILE), "w") as handle:
        handle.write(summary.to_json() + "\n")
    return summary


def _data_source(version_dir: str, split: str, skip: tuple[str, ...] = ()):
    """A TFDS ArrayRecord data source; the image features named in `skip` are left undecoded."""
    builder = tfds.builder_from_directory(version_dir)
    decoders = {name: tfds.decode.SkipDecoding() for name in skip} or None
    return builder.as_data_source(split=split, decoders=decoders)


def _read_identities(version_dir: str, split: str = "train") -> np.ndarray:
    source = _data_source(version_dir, split, skip=("image", "face_crop"))
    return np.array([int(source[i]["identity"]) for i in range(len(source))], np.int64)


class FaceIdentitiesSource:
    """Random-access face source over a built `face_identities` dataset (the `sources.FaceSource` protocol)."""

    def __init__(self, data_dir: str, split: str = "train"):
        self.version_dir = dataset_version_dir(data_dir)
        if not os.path.isfile(os.path.join(self.version_dir, "dataset_info.json")):
            raise FileNotFoundError(f"{self.version_dir}: no built face_identities dataset (run train/build_dataset.py)")
        self._source = _data_source(self.version_dir, split)
        self._crop_source = _data_source(self.version_dir, split, skip=("image",))
        cached = os.path.join(self.version_dir, IDENTITIES_FILE)
        self._identities = np.load(cached) if split == "train" and os.path.isfile(cached) else _read_identities(self.version_dir, split)
        if len(self._identities) != len(self._source):
            raise ValueError(f"{cached}: {len(self._identities)} identities for {len(self._source)} examples; rebuild the dataset")

    @property
    def identities(self) -> np.ndarray:
        return self._identities

    def __len__(self) -> int:
        return len(self._source)

    def reference_crop(self, index: int) -> np.ndarray:
        """Only the aligned crop at `index` (the photo is not decoded): what the pipeline's references need."""
        return np.asarray(self._crop_source[int(index)]["face_crop"], np.uint8)

    def __getitem__(self, index: int) -> dict:
        example = self._source[int(index)]
        return {
            "image": np.asarray(example["image"], np.uint8),
            "face_crop": np.asarray(example["face_crop"], np.uint8),
            "face_box": np.asarray(example["face_box"], np.float32),
            "landmarks": np.asarray(example["landmarks"], np.float32),
            "embedding": np.asarray(example["embedding"], np.float32),
            "has_embedding": np.bool_(example["has_embedding"]),
            "identity": np.int64(example["identity"]),
            "photo_id": np.int64(example["photo_id"]),
            "caption": caption_text(example["caption"]),
            "file": caption_text(example["file"]),  # extra field: "<identity>/<photo>" it came from
        }
