"""Pre-encoded face data: VAE latent moments, text and face embeddings written once, streamed in training.

`preencode_source` runs the VAE on every photo's target crop (the square crop centred on the face at
training resolution, no augmentation) and on its aligned reference crop, the text encoder on its caption,
and writes per-photo TFRecord shards (float16 moments and embeddings) plus `preencoded.json`,
`identities.npy` and the empty prompt's embedding. `make_preencoded_pipeline` streams training batches
from them with the same sampling plan as the raw pipeline (references = other photos of the target's
identity, padded by duplication; condition dropout; per-host shards; resumable position), so training
runs neither the VAE nor the text encoder. Augmentation is not available in this mode (latents of a
flipped or re-cropped image are not a flip or crop of the latents).

Reading loads the shards into host memory (about 70 KB per photo at 512 px / 224 px references in
float16), which suits datasets up to some 10^5 photos per host.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from fusion_jax.data.faces import EMBEDDING_DIM
from fusion_jax.data.pipeline import (
    PipelineConfig,
    PositionStream,
    SamplingPlan,
    box_mask,
    make_reference,
    make_target,
    reference_crop,
    resolve_process,
)
from fusion_jax.data.sources import FaceSource, caption_text

METADATA_FILE = "preencoded.json"
IDENTITIES_FILE = "identities.npy"
EMPTY_TEXT_FILE = "empty_text_embedding.npy"
# Per-photo array features: name -> metadata key holding its shape.
_ARRAY_FEATURES = ("latent_mean", "latent_logvar", "reference_latent_mean", "reference_latent_logvar", "text_embedding",
                   "face_embedding", "face_box")


@dataclasses.dataclass(frozen=True)
class PreencodeConfig:
    """What to encode and how to store it."""

    # Target crop side (pixels) fed to the VAE; latents are resolution / downscale factor.
    resolution: int = 512
    # Reference crop side (pixels) fed to the VAE (FlashFace: 224 -> 28x28 latents).
    reference_size: int = 224
    # Photos per encoder call.
    batch_size: int = 8
    # Photos per TFRecord shard.
    photos_per_shard: int = 1024
    # Storage dtype of moments and embeddings ("float16" or "float32").
    storage_dtype: str = "float16"

    def __post_init__(self):
        if self.storage_dtype not in ("float16", "float32"):
            raise ValueError(f"PreencodeConfig.storage_dtype: expected 'float16' or 'float32', got {self.storage_dtype!r}")
        for name in ("resolution", "reference_size", "batch_size", "photos_per_shard"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PreencodeConfig.{name}: expected > 0, got {getattr(self, name)}")


def _jitted_encoders(vae, text_encoder):
    """jit-compiled (images -> (mean, logvar)) and (ids -> last hidden state) over split NNX modules."""
    import jax
    from flax import nnx

    vae_graph, vae_state = nnx.split(vae)
    text_graph, text_state = nnx.split(text_encoder)

    @jax.jit
    def encode_images(state, images):
        posterior = nnx.merge(vae_graph, state).encode(images)
        return posterior.mean, posterior.logvar

    @jax.jit
    def encode_text(state, input_ids):
        return nnx.merge(text_graph, state)(input_ids).last_hidden_state

    return (lambda images: encode_images(vae_state, images)), (lambda ids: encode_text(text_state, ids))


def _float_feature_bytes(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(np.asarray(array, np.float32).astype(dtype)).tobytes()


def preencode_source(
    source: FaceSource,
    out_dir: str,
    vae,
    text_encoder,
    tokenize: Callable[[list[str]], np.ndarray],
    config: PreencodeConfig = PreencodeConfig(),
) -> dict:
    """Encode every photo of `source` into TFRecord shards under `out_dir`; returns the metadata dict."""
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, METADATA_FILE)):
        raise FileExistsError(f"{out_dir} already holds pre-encoded data ({METADATA_FILE}); choose an empty folder")
    encode_images, encode_text = _jitted_encoders(vae, text_encoder)
    # Deterministic target crops: centred on the face, no flip or colour change.
    crop_config = PipelineConfig(resolution=config.resolution, reference_size=config.reference_size, random_crop=False,
                                 flip=False, color_jitter=0.0, process_index=0, process_count=1)
    shapes: dict[str, list[int]] = {}
    shard_files, writer = [], None
    for start in range(0, len(source), config.batch_size):
        indices = range(start, min(start + config.batch_size, len(source)))
        records = [source[i] for i in indices]
        targets, boxes = zip(*(make_target(r, crop_config, np.random.default_rng(0)) for r in records))
        references = [make_reference(reference_crop(source, i), crop_config, np.random.default_rng(0)) for i in indices]
        to_unit = lambda images: np.stack(images).astype(np.float32) / 127.5 - 1.0  # noqa: E731
        latent_mean, latent_logvar = (np.asarray(a) for a in encode_images(to_unit(targets)))
        ref_mean, ref_logvar = (np.asarray(a) for a in encode_images(to_unit(references)))
        captions = [caption_text(r["caption"]) for r in records]
        text = np.asarray(encode_text(np.asarray(tokenize(captions), np.int32)))
        for row, (index, record) in enumerate(zip(indices, records)):
            if index % config.photos_per_shard == 0:
                if writer is not None:
                    writer.close()
                shard_files.append(f"preencoded-{len(shard_files):05d}.tfrecord")
                writer = tf.io.TFRecordWriter(os.path.join(out_dir, shard_files[-1]))
            arrays = {
                "latent_mean": latent_mean[row], "latent_logvar": latent_logvar[row],
                "reference_latent_mean": ref_mean[row], "reference_latent_logvar": ref_logvar[row],
                "text_embedding": text[row], "face_embedding": np.asarray(record["embedding"], np.float32),
                "face_box": boxes[row],
            }
            for name, value in arrays.items():
                shapes.setdefault(name, list(np.shape(value)))
            feature = {
                name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[_float_feature_bytes(v, config.storage_dtype)]))
                for name, v in arrays.items()
            }
            feature["caption"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[captions[row].encode("utf-8")]))
            for name in ("identity", "photo_id", "has_embedding"):
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record[name])]))
            feature["index"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[index]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    if writer is not None:
        writer.close()
    np.save(os.path.join(out_dir, IDENTITIES_FILE), np.asarray(source.identities, np.int64))
    empty = np.asarray(encode_text(np.asarray(tokenize([""]), np.int32)))[0]
    np.save(os.path.join(out_dir, EMPTY_TEXT_FILE), empty.astype(np.float32))
    metadata = {"photos": len(source), "shards": shard_files, "shapes": shapes, "storage_dtype": config.storage_dtype,
                "resolution": config.resolution, "reference_size": config.reference_size}
    with open(os.path.join(out_dir, METADATA_FILE), "w") as handle:
        json.dump(metadata, handle, indent=1)
    return metadata


class PreencodedSource:
    """The pre-encoded photos in host memory, by source index (arrays float32, scalars int64)."""

    def __init__(self, folder: str):
        import tensorflow as tf

        path = os.path.join(folder, METADATA_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no {METADATA_FILE} (run train/preencode.py first)")
        with open(path) as handle:
            self.metadata = json.load(handle)
        self.identities = np.load(os.path.join(folder, IDENTITIES_FILE))
        self.empty_text_embedding = np.load(os.path.join(folder, EMPTY_TEXT_FILE))
        count, dtype = self.metadata["photos"], np.dtype(self.metadata["storage_dtype"])
        spec = {name: tf.io.FixedLenFeature([], tf.string) for name in (*_ARRAY_FEATURES, "caption")}
        spec.update({name: tf.io.FixedLenFeature([], tf.int64) for name in ("identity", "photo_id", "has_embedding", "index")})
        self.arrays = {name: np.zeros([count, *self.metadata["shapes"][name]], np.float32) for name in _ARRAY_FEATURES}
        self.scalars = {name: np.zeros(count, np.int64) for name in ("photo_id", "has_embedding")}
        self.captions = [""] * count
        files = [os.path.join(folder, f) for f in self.metadata["shards"]]
        seen = 0
        for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
            example = tf.io.parse_single_example(serialized, spec)
            index = int(example["index"])
            for name in _ARRAY_FEATURES:
                raw = np.frombuffer(example[name].numpy(), dtype)
                self.arrays[name][index] = raw.reshape(self.metadata["shapes"][name])
            for name in self.scalars:
                self.scalars[name][index] = int(example[name])
            if int(example["identity"]) != self.identities[index]:
                raise ValueError(f"{folder}: photo {index} has identity {int(example['identity'])} in the shards, "
                                 f"{self.identities[index]} in {IDENTITIES_FILE}")
            self.captions[index] = example["caption"].numpy().decode("utf-8")
            seen += 1
        if seen != count:
            raise ValueError(f"{folder}: {seen} photos in the shards, {METADATA_FILE} says {count}")

    def __len__(self) -> int:
        return len(self.identities)


@dataclasses.dataclass(frozen=True)
class PreencodedConfig:
    """Sampling and batching of the pre-encoded stream (the raw pipeline's fields that apply)."""

    # References per example (1-4), padded by duplication.
    num_references: int = 4
    # Draw 1..num_references distinct references per example (uniformly), padded to num_references.
    vary_references: bool = False
    # Probability of flagging the caption as dropped (its embedding is then the empty prompt's).
    p_drop_text: float = 0.1
    # Probability of flagging references and face mask as dropped.
    p_drop_reference: float = 0.1
    # Seed of the stream.
    seed: int = 0
    # Examples per batch on this host.
    batch_size: int = 8
    # tf.data loader threads (-1: tuned by tf.data).
    num_parallel_calls: int = 2
    # Batches prepared ahead (-1: tuned by tf.data).
    prefetch: int = 2
    # Host index / count override (None: from JAX).
    process_index: Optional[int] = None
    process_count: Optional[int] = None

    def __post_init__(self):
        if not 1 <= self.num_references <= 4:
            raise ValueError(f"PreencodedConfig.num_references: expected 1-4, got {self.num_references}")
        if self.batch_size <= 0:
            raise ValueError(f"PreencodedConfig.batch_size: expected > 0, got {self.batch_size}")


class PreencodedBatchIterator(PositionStream):
    """Host batches from pre-encoded photos.

    Fields: `latent_mean`, `latent_logvar` float32 (B, h, w, c) (sample latents in the train step);
    `reference_latent_mean`, `reference_latent_logvar` (B, N, hr, wr, c); `text_embedding` (B, L, D)
    (the empty prompt's where `drop_text`); `reference_face_embedding` (B, N, 512) and
    `reference_has_embedding` bool (B, N); `face_mask` float32 (B, h, w, 1) at latent resolution;
    `caption`; `drop_text`, `drop_reference`; `identity`; `num_real_references`; `source_index`,
    `reference_source_index`.
    """

    def __init__(self, source: PreencodedSource, config: PreencodedConfig, state: Optional[dict] = None):
        self.source, self.config = source, config
        plan = SamplingPlan(source.identities, config.seed, *resolve_process(config.process_index, config.process_count))
        super().__init__(plan, config.batch_size, config.num_parallel_calls, config.prefetch, state)

    def fields(self):
        shapes, N = self.source.metadata["shapes"], self.config.num_references
        latent, reference = tuple(shapes["latent_mean"]), tuple(shapes["reference_latent_mean"])
        return [
            ("latent_mean", "float32", latent), ("latent_logvar", "float32", latent),
            ("reference_latent_mean", "float32", (N, *reference)), ("reference_latent_logvar", "float32", (N, *reference)),
            ("text_embedding", "float32", tuple(shapes["text_embedding"])),
            ("reference_face_embedding", "float32", (N, EMBEDDING_DIM)), ("reference_has_embedding", "bool", (N,)),
            ("face_mask", "float32", (latent[0], latent[1], 1)), ("caption", "string", ()),
            ("drop_text", "bool", ()), ("drop_reference", "bool", ()), ("identity", "int64", ()),
            ("num_real_references", "int32", ()), ("source_index", "int64", ()), ("reference_source_index", "int64", (N,)),
        ]

    def load_example(self, position: int) -> tuple:
        config, arrays = self.config, self.source.arrays
        _, target, refs, num_real, rng = self.plan.draw(position, config.num_references, config.vary_references)
        drop_text = rng.random() < config.p_drop_text
        drop_reference = rng.random() < config.p_drop_reference
        latent_size = arrays["latent_mean"].shape[1]
        box = arrays["face_box"][target] * (latent_size / self.source.metadata["resolution"])
        text = self.source.empty_text_embedding if drop_text else arrays["text_embedding"][target]
        return (
            arrays["latent_mean"][target], arrays["latent_logvar"][target],
            arrays["reference_latent_mean"][refs], arrays["reference_latent_logvar"][refs],
            np.asarray(text, np.float32), arrays["face_embedding"][refs], self.source.scalars["has_embedding"][refs].astype(bool),
            box_mask(box, latent_size), self.source.captions[target].encode("utf-8"), np.bool_(drop_text),
            np.bool_(drop_reference), np.int64(self.source.identities[target]), np.int32(num_real), np.int64(target), refs,
        )

    def finish_batch(self, batch: dict) -> dict:
        batch["caption"] = np.array([c.decode("utf-8") for c in batch["caption"]], dtype=str)
        return batch


def make_preencoded_pipeline(folder_or_source, config: PreencodedConfig, state: Optional[dict] = None) -> PreencodedBatchIterator:
    """The pre-encoded training stream from a `preencode_source` folder (or a loaded `PreencodedSource`)."""
    source = folder_or_source if isinstance(folder_or_source, PreencodedSource) else PreencodedSource(folder_or_source)
    return PreencodedBatchIterator(source, config, state)
