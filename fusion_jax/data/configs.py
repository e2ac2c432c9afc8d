"""Config sections of the data modules, as plain dataclasses (no OpenCV, PIL or TensorFlow imports), so that the
config layer can type-check `data.pipeline.*` / `data.synthfaces.*` without importing the data code.
`fusion_jax.data.pipeline.PipelineConfig` and `fusion_jax.data.synthfaces.SynthFaceConfig` are the same classes."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How training examples are drawn, augmented, batched and sharded."""

    # Side of the square target image (pixels).
    resolution: int = 512
    # References per example (0-4); fewer available photos are padded by duplication. 0: none are drawn or
    # rendered (a text-to-image stream; identity objectives need >= 1).
    num_references: int = 4
    # Draw the number of distinct references uniformly from 1..num_references per example (then padded to
    # num_references by repetition): trains a model to use one photo as well as several. False: as many distinct
    # photos as the identity has, up to num_references.
    vary_references: bool = False
    # Side of each square reference crop (pixels); source crops are resized to it.
    reference_size: int = 224
    # Probability of flagging the caption as dropped (text-free guidance term).
    p_drop_text: float = 0.1
    # Probability of flagging the references (and face mask) as dropped.
    p_drop_reference: float = 0.1
    # Horizontal flip with probability 0.5 (targets; references too when augment_references).
    flip: bool = True
    # Random square crop of the target (else the square crop centred on the face).
    random_crop: bool = True
    # Smallest random crop side, as a fraction of the photo's shorter side.
    min_crop_fraction: float = 0.8
    # Colour jitter strength: brightness/contrast/saturation factors drawn in [1 - j, 1 + j]; 0 disables.
    color_jitter: float = 0.1
    # Apply flip and colour jitter to reference crops as well (each independently).
    augment_references: bool = True
    # Seed of the whole stream (order, references, dropout, augmentation).
    seed: int = 0
    # Examples per batch on this host.
    batch_size: int = 8
    # Parallel example loaders (tf.data map threads); -1 lets tf.data tune it.
    num_parallel_calls: int = 4
    # Batches prepared ahead; -1 lets tf.data tune it.
    prefetch: int = 2
    # Host index / count for sharding; None: jax.process_index() / jax.process_count().
    process_index: Optional[int] = None
    process_count: Optional[int] = None
    # Optional tokenizer: list of B captions -> int array (B, L); adds `input_ids` to batches.
    tokenize: Optional[Callable[[list[str]], np.ndarray]] = None

    def __post_init__(self):
        checks = [
            (0 <= self.num_references <= 4, "num_references", "0-4"),
            (self.resolution > 0, "resolution", "> 0"),
            (self.reference_size > 0, "reference_size", "> 0"),
            (0.0 <= self.p_drop_text <= 1.0, "p_drop_text", "in [0, 1]"),
            (0.0 <= self.p_drop_reference <= 1.0, "p_drop_reference", "in [0, 1]"),
            (0.0 < self.min_crop_fraction <= 1.0, "min_crop_fraction", "in (0, 1]"),
            (0.0 <= self.color_jitter < 1.0, "color_jitter", "in [0, 1)"),
            (self.batch_size > 0, "batch_size", "> 0"),
            (self.num_parallel_calls == -1 or self.num_parallel_calls > 0, "num_parallel_calls", "> 0 or -1"),
            (self.prefetch == -1 or self.prefetch >= 0, "prefetch", ">= 0 or -1"),
            ((self.process_index is None) == (self.process_count is None), "process_index/process_count", "both set or both None"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ValueError(f"PipelineConfig.{field}: expected {expected}, got {getattr(self, field.split('/')[0])!r}")
        if self.process_count is not None and not 0 <= self.process_index < self.process_count:
            raise ValueError(f"PipelineConfig.process_index: expected 0 <= index < {self.process_count}, got {self.process_index}")


@dataclasses.dataclass(frozen=True)
class SynthFaceConfig:
    """Size and content of a synthetic face dataset."""

    image_size: int = 64  # output image side (pixels), e.g. 64 or 128
    crop_size: int = 0  # side of the aligned face crop (pixels); 0 = image_size
    num_train_identities: int = 2000  # identities 0 .. n-1 form the train split
    num_heldout_identities: int = 200  # the next ones form the held-out split
    photos_per_identity: int = 16  # photos per identity in the random-access source
    seed: int = 0  # dataset seed: traits and photos are pure functions of (ids, seed)
    supersample: int = 2  # draw at this multiple of the size, then box-filter down (antialiasing)
    crop_extent: float = 2.7  # crop side in face units (head half-height = 1; covers hair and chin)
    # records carry a recognition embedding (the ArcFace stand-in of `synth_recognition`: a fixed projection of
    # the person's traits plus per-photo noise), for the methods that read one; False = zeros, has_embedding False
    recognition_embedding: bool = False
    embedding_noise: float = 0.5  # norm of the per-photo noise added to the unit identity embedding
    # probability that a photo's caption leaves its background unstated (drawn once per photo, so a photo keeps
    # its caption): real captions leave out much of what a photo shows; the image and `attributes` keep it
    caption_background_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        if not isinstance(self.crop_size, int) or (self.crop_size != 0 and self.crop_size < 8):
            raise ValueError(f"crop_size must be 0 (= image_size) or an int >= 8, got {self.crop_size!r}")
        for name in ("num_train_identities", "num_heldout_identities", "photos_per_identity"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.photos_per_identity < 1:
            raise ValueError(f"photos_per_identity must be >= 1, got {self.photos_per_identity}")
        if not isinstance(self.supersample, int) or self.supersample < 1:
            raise ValueError(f"supersample must be an int >= 1, got {self.supersample!r}")
        if not self.crop_extent > 0:
            raise ValueError(f"crop_extent must be > 0, got {self.crop_extent!r}")
        if not self.embedding_noise >= 0:
            raise ValueError(f"embedding_noise must be >= 0, got {self.embedding_noise!r}")
        if not 0.0 <= self.caption_background_dropout <= 1.0:
            raise ValueError(f"caption_background_dropout must be in [0, 1], got {self.caption_background_dropout!r}")

    @property
    def face_crop_size(self) -> int:
        return self.crop_size or self.image_size
