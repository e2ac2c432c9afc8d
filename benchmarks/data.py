"""Examples per second of the face training stream, by source and tf.data thread count.

    python benchmarks/data.py [--resolution 256] [--threads 1 2 4] [--batches 12] [--json FILE]

Sources: `memory` (decoded records in RAM: the cost of cropping, resizing, augmenting and batching
alone), `tfds` (a `face_identities` ArrayRecord dataset written here from synthetic photos: adds
reading and JPEG/PNG decoding), `synthfaces` (procedural faces rendered on the fly) and, when
`preencoded` (the TFRecord stream of `fusion_jax.data.preencoded`: latent moments, text and face
embeddings, no images). Photos are synthetic with a known face box, so no face detector runs. The
pre-encoded data is written here by stand-in encoders with Stable Diffusion 1.5's output shapes
(latents 1/8 of the side with 4 channels, text 77 x 768), since only the streaming cost is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from fusion_jax.data.faces import Face  # noqa: E402
from fusion_jax.data.pipeline import PipelineConfig, make_pipeline  # noqa: E402
from fusion_jax.data.sources import InMemoryFaceSource, make_record  # noqa: E402


def synthetic_photo(rng, height, width):
    """A smooth random photo with a bright square "face"; returns (image, box)."""
    small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    import cv2

    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    side = int(min(height, width) * rng.uniform(0.25, 0.5))
    x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    image[y0 : y0 + side, x0 : x0 + side] = 230
    return image, np.array([x0, y0, x0 + side, y0 + side], np.float32)


def landmarks_in_box(box):
    from fusion_jax.data.faces import ARCFACE_TEMPLATE_112

    x0, y0, x1, y1 = box
    return (ARCFACE_TEMPLATE_112 / 112.0 * [x1 - x0, y1 - y0] + [x0, y0]).astype(np.float32)


def memory_source(num_identities, photos_per_identity, height, width, crop_size, seed=0):
    from fusion_jax.data.faces import align_face

    rng = np.random.default_rng(seed)
    records = []
    for identity in range(num_identities):
        for photo in range(photos_per_identity):
            image, box = synthetic_photo(rng, height, width)
            landmarks = landmarks_in_box(box)
            records.append(make_record(image, align_face(image, landmarks, crop_size, 0.4), box, landmarks, identity, photo, f"a photo of person {identity}"))
    return InMemoryFaceSource(records)


class KnownFaceAnalyzer:
    """Stands in for the detector when the face box of a synthetic photo is known (the bright square)."""

    backend = "known-box"
    embeddings_available = False

    def largest_face(self, image, name="<image>", required=True):
        bright = np.all(image >= 229, axis=-1) & np.all(image <= 231, axis=-1)
        ys, xs = np.nonzero(bright)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        return Face(box=box, landmarks=landmarks_in_box(box), score=1.0, embedding=None)


def tfds_source(memory, workdir, crop_size):
    from PIL import Image

    from fusion_jax.data.face_identities import FaceIdentitiesBuildConfig, FaceIdentitiesSource, build_face_identities

    root = os.path.join(workdir, "photos")
    for index in range(len(memory)):
        record = memory[index]
        folder = os.path.join(root, f"person_{int(record['identity']):04d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(record["image"]).save(os.path.join(folder, f"{int(record['photo_id']):03d}.jpg"), quality=92)
    config = FaceIdentitiesBuildConfig(input_dir=root, reference_size=crop_size, max_image_side=0)
    build_face_identities(os.path.join(workdir, "tfds"), config, analyzer=KnownFaceAnalyzer())
    return FaceIdentitiesSource(os.path.join(workdir, "tfds"))


def sd15_shaped_encoders():
    """Parameter-free NNX modules with SD1.5's encoder output shapes (8x8 average pooling; constant text)."""
    import types

    import jax.numpy as jnp
    from flax import nnx

    class PooledVAE(nnx.Module):
        def encode(self, images):
            b, h, w, _ = images.shape
            pooled = images.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
            mean = jnp.concatenate([pooled, pooled[..., :1]], axis=-1)
            return types.SimpleNamespace(mean=mean, logvar=jnp.zeros_like(mean))

    class ConstantText(nnx.Module):
        def __call__(self, input_ids):
            return types.SimpleNamespace(last_hidden_state=jnp.zeros((*input_ids.shape, 768)) + input_ids[..., None] * 1e-3)

    return PooledVAE(), ConstantText(), (lambda texts: np.full((len(texts), 77), 7, np.int32))


def preencoded_folder(memory, workdir, resolution, reference_size):
    from fusion_jax.data.preencoded import PreencodeConfig, preencode_source

    folder = os.path.join(workdir, "preencoded")
    vae, text, tokenize = sd15_shaped_encoders()
    preencode_source(memory, folder, vae, text, tokenize, PreencodeConfig(resolution=resolution, reference_size=reference_size))
    return folder


def measure(iterator, batches, min_seconds, warmup=2):
    """Examples/s over at least `batches` batches and `min_seconds` (so prefetched batches do not dominate)."""
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = done = 0
    while done < batches or time.perf_counter() - start < min_seconds:
        count += len(next(iterator)["identity"])
        done += 1
    seconds = time.perf_counter() - start
    iterator.close()
    return count / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256, help="target side")
    parser.add_argument("--reference-size", type=int, default=224, help="reference crop side")
    parser.add_argument("--num-references", type=int, default=4)
    parser.add_argument("--photo-size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"), help="source photo size")
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--photos-per-identity", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per row")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per row, at least")
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2, 4), help="tf.data loader threads to compare")
    parser.add_argument("--sources", nargs="+", default=("memory", "tfds", "synthfaces", "preencoded"))
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    base = PipelineConfig(
        resolution=args.resolution, num_references=args.num_references, reference_size=args.reference_size,
        batch_size=args.batch_size, prefetch=2, process_index=0, process_count=1,
    )
    height, width = args.photo_size
    sources = {}
    with tempfile.TemporaryDirectory() as workdir:
        memory = memory_source(args.identities, args.photos_per_identity, height, width, args.reference_size)
        if "memory" in args.sources:
            sources["memory"] = memory
        if "tfds" in args.sources:
            sources["tfds"] = tfds_source(memory, workdir, args.reference_size)
        if "synthfaces" in args.sources:
            from fusion_jax.data.synthfaces import SynthFaceConfig, SynthFaces

            sources["synthfaces"] = SynthFaces(
                SynthFaceConfig(image_size=height, crop_size=args.reference_size, num_train_identities=args.identities,
                                num_heldout_identities=0, photos_per_identity=args.photos_per_identity)
            )
        rows = []
        for name, source in sources.items():
            for threads in args.threads:
                config = dataclasses.replace(base, num_parallel_calls=threads)
                rate = measure(make_pipeline(source, config), args.batches, args.min_seconds)
                rows.append({"source": name, "threads": threads, "examples_per_s": rate, "batch_size": args.batch_size,
                             "resolution": args.resolution})
                print(f"{name:10s} threads={threads}: {rate:.1f} examples/s", flush=True)
        if "preencoded" in args.sources:
            from fusion_jax.data.preencoded import PreencodedConfig, PreencodedSource, make_preencoded_pipeline

            stored = PreencodedSource(preencoded_folder(memory, workdir, args.resolution, args.reference_size))
            for threads in args.threads:
                config = PreencodedConfig(num_references=args.num_references, batch_size=args.batch_size,
                                          num_parallel_calls=threads, process_index=0, process_count=1)
                rate = measure(make_preencoded_pipeline(stored, config), args.batches, args.min_seconds)
                print(f"preencoded threads={threads}: {rate:.1f} examples/s", flush=True)
                rows.append({"source": "preencoded", "threads": threads, "examples_per_s": rate, "batch_size": args.batch_size,
                             "resolution": args.resolution})
    print()
    print_table(rows, ["source", "threads", "examples_per_s", "batch_size", "resolution"])
    write_json(args.json, {"benchmark": "data", "cpu_count": os.cpu_count(), "rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
