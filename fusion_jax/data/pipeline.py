"""The tf.data training stream: (target photo, references of the same person, face mask, caption) batches.

Any random-access face source (`sources.FaceSource`) feeds it. Order and randomness are stateless:

- Targets are the photos whose identity has at least two photos (others are references only).
- Epoch `e` visits them in the permutation drawn from (seed, e); host `p` of `P` takes every P-th
  entry of that permutation, cut to the same count on every host (the at most P-1 left over rotate
  with the permutation from epoch to epoch), so hosts see disjoint shards of equal length.
- Example `k` of a host's stream is position `k % per_host` of epoch `k // per_host`, and all its
  random choices (references, condition dropout, augmentation) come from a generator seeded with
  (seed, epoch, target index). So the stream position `k` is the whole iterator state: restoring it
  in a fresh pipeline reproduces the following batches exactly, whatever the thread count.

References are the aligned face crops of *other* photos of the target's identity: min(N, available)
distinct photos, padded to N by repeating them (as FlashFace does), `num_real_references` says how
many are distinct. Dropout flags are only flags: images are left intact, and the text-encoder ids (when
a tokenizer is given) are those of the empty prompt for dropped captions.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import weakref
from typing import Callable, Iterator, Optional, Sequence

import cv2
import numpy as np

from fusion_jax.data.configs import PipelineConfig
from fusion_jax.data.faces import EMBEDDING_DIM
from fusion_jax.data.sources import FaceSource, caption_text, photos_by_identity

# Salt mixed into every per-example seed, so pipeline draws never coincide with other users of `seed`.
_EXAMPLE_SALT = 0x5EED_FACE


# ----------------------------------------------------------------------------------------------------
# Sampling plan: which target and which references, from (seed, epoch, index) only


class SamplingPlan:
    """Deterministic map from a host stream position to (target index, reference indices, rng)."""

    def __init__(self, identities: np.ndarray, seed: int, process_index: int, process_count: int):
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.photos = photos_by_identity(identities)
        self.identities = np.asarray(identities, np.int64)
        self.targets = np.array(sorted(i for ids in self.photos.values() if len(ids) >= 2 for i in ids), np.int64)
        self.per_host = len(self.targets) // self.process_count
        if self.per_host == 0:
            raise ValueError(
                f"no training targets for {self.process_count} host(s): {len(self.targets)} photos belong to identities "
                f"with two or more photos (of {len(self.identities)} photos, {len(self.photos)} identities)"
            )

    @functools.lru_cache(maxsize=4)
    def host_order(self, epoch: int) -> np.ndarray:
        """This host's target indices for one epoch."""
        permutation = np.random.default_rng([self.seed, epoch, _EXAMPLE_SALT]).permutation(len(self.targets))
        return self.targets[permutation[self.process_index :: self.process_count][: self.per_host]]

    def example_rng(self, epoch: int, target: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, int(target), _EXAMPLE_SALT])

    def draw(self, position: int, num_references: int, vary: bool = False):
        """(epoch, target index, reference indices (N,), number of distinct references, rng) at `position`.

        `vary`: the number of distinct references is drawn uniformly from 1..N per example (then padded to N by
        repetition), so a model trained on N slots also sees 1, 2, ... distinct photos."""
        epoch, offset = divmod(int(position), self.per_host)
        target = int(self.host_order(epoch)[offset])
        rng = self.example_rng(epoch, target)
        others = self.photos[int(self.identities[target])]
        others = others[others != target]
        wanted = int(rng.integers(1, num_references + 1)) if vary and num_references > 0 else num_references
        chosen = rng.choice(others, size=min(wanted, len(others)), replace=False)
        padded = np.resize(chosen, num_references)  # repeats the distinct ones cyclically
        return epoch, target, padded.astype(np.int64), len(chosen), rng


# ----------------------------------------------------------------------------------------------------
# Per-example image work (NumPy / OpenCV, run inside tf.data threads)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors drawn in [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    pixels = image.astype(np.float32)
    gray = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    pixels = gray[..., None] + (pixels - gray[..., None]) * saturation
    pixels = (pixels - gray.mean()) * contrast + gray.mean()
    return np.clip(pixels * brightness, 0, 255).astype(np.uint8)


def square_crop_window(image_shape, box, fraction: float, rng: Optional[np.random.Generator]) -> tuple[int, int, int]:
    """(x0, y0, side) of a square crop of `fraction` of the shorter side that keeps `box` inside if it fits.

    With `rng` None the crop is centred on the box (clamped to the photo); else uniform over the
    positions that keep the box inside (all positions when the box is larger than the crop).
    """
    height, width = image_shape[:2]
    side = max(1, int(round(min(height, width) * fraction)))
    starts = []
    for low_edge, high_edge, extent in ((box[0], box[2], width), (box[1], box[3], height)):
        lo, hi = int(np.ceil(high_edge)) - side, int(np.floor(low_edge))
        lo, hi = max(0, lo), min(extent - side, hi)
        if lo > hi:
            lo, hi = 0, extent - side
        if rng is None:
            centre = int(round((low_edge + high_edge) / 2 - side / 2))
            starts.append(int(np.clip(centre, lo, hi)))
        else:
            starts.append(int(rng.integers(lo, hi + 1)))
    return starts[0], starts[1], side


def box_mask(box: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 1) float32 mask: 1 at pixels whose centre lies inside box [x0, y0, x1, y1]."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    inside_x = (centres >= box[0]) & (centres < box[2])
    inside_y = (centres >= box[1]) & (centres < box[3])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)[..., None]


def make_target(record: dict, config: PipelineConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Crop, resize, flip and colour-jitter a record's photo; returns (uint8 (R, R, 3), face box (4,) in it)."""
    image, box = record["image"], np.asarray(record["face_box"], np.float64)
    fraction = rng.uniform(config.min_crop_fraction, 1.0) if config.random_crop else 1.0
    x0, y0, side = square_crop_window(image.shape, box, fraction, rng if config.random_crop else None)
    target = _resize(image[y0 : y0 + side, x0 : x0 + side], config.resolution)
    scale = config.resolution / side
    box = np.clip((box - [x0, y0, x0, y0]) * scale, 0, config.resolution)
    if config.flip and rng.random() < 0.5:
        target = target[:, ::-1]
        box = np.array([config.resolution - box[2], box[1], config.resolution - box[0], box[3]])
    if config.color_jitter > 0:
        target = _color_jitter(target, rng, config.color_jitter)
    return np.ascontiguousarray(target), box.astype(np.float32)


def make_reference(crop: np.ndarray, config: PipelineConfig, rng: np.random.Generator) -> np.ndarray:
    """Resize one aligned face crop to `reference_size`, with optional flip and colour jitter."""
    crop = _resize(np.asarray(crop, np.uint8), config.reference_size)
    if config.augment_references:
        if config.flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        if config.color_jitter > 0:
            crop = _color_jitter(crop, rng, config.color_jitter)
    return np.ascontiguousarray(crop)


def record_embedding(record: dict) -> tuple[np.ndarray, np.bool_]:
    """A record's stored ArcFace embedding (512,) float32 and whether it has one (built datasets store it when the
    builder had the recognition model; sources without one give zeros, the 'no face' input of the token methods)."""
    emb = record.get("embedding")
    if emb is None or not bool(record.get("has_embedding", True)):
        return np.zeros(EMBEDDING_DIM, np.float32), np.bool_(False)
    emb = np.asarray(emb, np.float32)
    if emb.shape != (EMBEDDING_DIM,):
        raise ValueError(f"record embedding has shape {emb.shape}, expected ({EMBEDDING_DIM},)")
    return emb, np.bool_(True)


def reference_crop(source: FaceSource, index: int) -> np.ndarray:
    """A source's aligned crop at `index`, through its cheap `reference_crop` method when it has one."""
    getter = getattr(source, "reference_crop", None)
    return getter(int(index)) if getter is not None else source[int(index)]["face_crop"]


# ----------------------------------------------------------------------------------------------------
# The stream


# Live iterators, closed at interpreter exit: a tf.data iterator whose loader threads are still calling
# into Python while the interpreter shuts down aborts the process ("terminate called ...").
_LIVE_ITERATORS: "weakref.WeakSet[PositionStream]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()


def resolve_process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    """The (index, count) of this host: the given override, else JAX's."""
    if process_index is None:
        import jax

        return jax.process_index(), jax.process_count()
    return int(process_index), int(process_count)


class PositionStream:
    """A tf.data stream of batches over host stream positions, whose state is the next position.

    Subclasses give `fields()` (name, tf dtype name, shape) per example, `load_example(position)`
    (a tuple in that order, NumPy, run in tf.data threads) and optionally `finish_batch`.
    uint8 fields named in `unit_range_fields` become float32 in [-1, 1] after batching.
    """

    unit_range_fields: tuple[str, ...] = ()

    def __init__(self, plan: SamplingPlan, batch_size: int, num_parallel_calls: int, prefetch: int,
                 state: Optional[dict] = None):
        self.plan, self.batch_size = plan, batch_size
        self.num_parallel_calls, self.prefetch = num_parallel_calls, prefetch
        self._next_example = 0
        self._iterator = None
        self.set_state(state or {"next_example": 0})
        _LIVE_ITERATORS.add(self)

    # -- subclass interface
    def fields(self) -> list[tuple[str, str, tuple]]:
        raise NotImplementedError

    def load_example(self, position: int) -> tuple:
        raise NotImplementedError

    def finish_batch(self, batch: dict) -> dict:
        return batch

    # -- state
    @property
    def examples_per_epoch(self) -> int:
        """Targets this host sees per epoch."""
        return self.plan.per_host

    def get_state(self) -> dict:
        """The stream position as a dict of ints (store it with the training checkpoint)."""
        return {"next_example": int(self._next_example), "seed": self.plan.seed,
                "process_index": self.plan.process_index, "process_count": self.plan.process_count}

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state()` result: the next batch starts at its `next_example`."""
        if "next_example" not in state:
            raise ValueError(f"iterator state {state!r} has no 'next_example'")
        for key, current in (("seed", self.plan.seed), ("process_count", self.plan.process_count)):
            if key in state and int(state[key]) != int(current):
                raise ValueError(f"iterator state was saved with {key}={state[key]}, this pipeline has {key}={current}")
        self._next_example = int(state["next_example"])
        self._iterator = None  # rebuilt lazily from the new position

    def close(self) -> None:
        """Stop the background loaders (also done at exit); iterating again restarts them."""
        self._iterator = None

    # -- tf.data
    def _build_dataset(self, start: int):
        import tensorflow as tf

        specs = self.fields()
        tf_types = [tf.as_dtype(dtype) for _, dtype, _ in specs]

        def load(position):
            values = tf.numpy_function(lambda k: self.load_example(int(k)), [position], tf_types, stateful=False)
            out = {}
            for (name, _, shape), value in zip(specs, values):
                value.set_shape(shape)
                out[name] = value
            return out

        def to_unit_range(batch):
            batch = dict(batch)
            for name in self.unit_range_fields:
                batch[name] = tf.cast(batch[name], tf.float32) / 127.5 - 1.0
            return batch

        parallel = tf.data.AUTOTUNE if self.num_parallel_calls == -1 else self.num_parallel_calls
        dataset = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
        dataset = dataset.map(load, num_parallel_calls=parallel, deterministic=True)
        dataset = dataset.batch(self.batch_size, drop_remainder=True)
        if self.unit_range_fields:
            dataset = dataset.map(to_unit_range, num_parallel_calls=2, deterministic=True)
        if self.prefetch != 0:
            dataset = dataset.prefetch(tf.data.AUTOTUNE if self.prefetch == -1 else self.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        if self.num_parallel_calls > 0:
            options.threading.private_threadpool_size = max(2, self.num_parallel_calls)
        return dataset.with_options(options)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._build_dataset(self._next_example).as_numpy_iterator())
        batch = self.finish_batch(next(self._iterator))
        self._next_example += self.batch_size
        return batch


def tokenize_captions(tokenize: Callable[[list[str]], np.ndarray], captions: np.ndarray, drop_text: np.ndarray) -> np.ndarray:
    """int32 (B, L) token ids of the captions, with the empty prompt where the text is dropped."""
    texts = ["" if dropped else str(text) for text, dropped in zip(captions, drop_text)]
    input_ids = np.asarray(tokenize(texts))
    if input_ids.ndim != 2 or input_ids.shape[0] != len(texts):
        raise ValueError(f"PipelineConfig.tokenize returned shape {input_ids.shape}, expected ({len(texts)}, L)")
    return input_ids.astype(np.int32)


class FaceBatchIterator(PositionStream):
    """Iterator of host batches (dicts of NumPy arrays) with a checkpointable position.

    Batch fields: `target` float32 (B, R, R, 3) in [-1, 1]; `references` float32 (B, N, S, S, 3) in
    [-1, 1]; `face_mask` float32 (B, R, R, 1); `masked_target` float32 (B, R, R, 3) in [-1, 1] (the target with
    its face box filled with mid-grey: FaceStudio's style input); `face_embedding` float32 (B, 512) (the target
    photo's stored ArcFace embedding, zeros where the source has none) and `has_face_embedding` bool (B,);
    `caption` str (B,); `input_ids` int32 (B, L) with a
    tokenizer; `drop_text`, `drop_reference` bool (B,); `identity` int64 (B,); `num_real_references`
    int32 (B,); `source_index` int64 (B,) and `reference_source_index` int64 (B, N) (source indices of
    the target and the references, for inspection).
    """

    unit_range_fields = ("target", "references", "masked_target")

    def __init__(self, source: FaceSource, config: PipelineConfig, state: Optional[dict] = None):
        self.source, self.config = source, config
        plan = SamplingPlan(source.identities, config.seed, *resolve_process(config.process_index, config.process_count))
        super().__init__(plan, config.batch_size, config.num_parallel_calls, config.prefetch, state)

    def fields(self):
        R, S, N = self.config.resolution, self.config.reference_size, self.config.num_references
        return [
            ("target", "uint8", (R, R, 3)), ("references", "uint8", (N, S, S, 3)), ("face_mask", "float32", (R, R, 1)),
            ("caption", "string", ()), ("drop_text", "bool", ()), ("drop_reference", "bool", ()),
            ("identity", "int64", ()), ("num_real_references", "int32", ()), ("source_index", "int64", ()),
            ("reference_source_index", "int64", (N,)),
            ("masked_target", "uint8", (R, R, 3)), ("face_embedding", "float32", (EMBEDDING_DIM,)),
            ("has_face_embedding", "bool", ()),
        ]

    def load_example(self, position: int) -> tuple:
        """All per-example fields at host stream `position` (NumPy; runs inside tf.data threads)."""
        config = self.config
        _, target_index, reference_indices, num_real, rng = self.plan.draw(position, config.num_references,
                                                                           config.vary_references)
        record = self.source[target_index]
        drop_text = rng.random() < config.p_drop_text
        drop_reference = rng.random() < config.p_drop_reference
        target, box = make_target(record, config, rng)
        mask = box_mask(box, config.resolution)
        masked_target = np.where(mask > 0.5, np.uint8(128), target)  # 128 -> 0.004 in [-1, 1]
        embedding, has_embedding = record_embedding(record)
        crops = {int(i): reference_crop(self.source, i) for i in np.unique(reference_indices)}
        references = (np.stack([make_reference(crops[int(i)], config, rng) for i in reference_indices])
                      if len(reference_indices) else np.zeros((0, config.reference_size, config.reference_size, 3),
                                                              np.uint8))
        return (
            target, references, mask, caption_text(record["caption"]).encode("utf-8"),
            np.bool_(drop_text), np.bool_(drop_reference), np.int64(record["identity"]), np.int32(num_real),
            np.int64(target_index), reference_indices, masked_target, embedding, has_embedding,
        )

    def finish_batch(self, batch: dict) -> dict:
        batch["caption"] = np.array([c.decode("utf-8") for c in batch["caption"]], dtype=str)
        if self.config.tokenize is not None:
            batch["input_ids"] = tokenize_captions(self.config.tokenize, batch["caption"], batch["drop_text"])
        return batch


def make_pipeline(source: FaceSource, config: PipelineConfig, state: Optional[dict] = None) -> FaceBatchIterator:
    """The training stream over `source`; pass a saved `get_state()` as `state` to resume."""
    return FaceBatchIterator(source, config, state)


# ----------------------------------------------------------------------------------------------------
# Host batch -> global device arrays


def make_global_batch(host_batch: dict, mesh, batch_axes: Sequence[str] = ("data",)) -> dict:
    """Turn a host batch into global `jax.Array`s sharded over `batch_axes` of `mesh` (leading dim).

    Every host passes its own batch; the global batch is the concatenation over hosts in process order
    (`jax.make_array_from_process_local_data`). Text fields (`caption`) stay host-side NumPy arrays.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(batch_axes)
    missing = [axis for axis in axes if axis not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch_axes {missing} are not axes of the mesh {mesh.axis_names}")
    spec_axis = axes[0] if len(axes) == 1 else axes
    result = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "USO":
            result[name] = value
            continue
        sharding = NamedSharding(mesh, PartitionSpec(spec_axis, *([None] * (value.ndim - 1))))
        result[name] = jax.make_array_from_process_local_data(sharding, value)
    return result
