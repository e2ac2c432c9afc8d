"""The detail reader of the synthetic world: which distinctive mark (none, mole, scar, tattoo) a face carries.

Why: FlashFace's claim is that reference feature maps keep small details a single identity token loses. Every
synthfaces identity has one fixed mark (`IdentityTraits.mark_kind`, at a fixed place on the face); a small
classifier trained on real photos reads it back, so "detail accuracy" = the fraction of generated images whose
read mark is the conditioning person's. The reader's accuracy on real held-out photos (in its report) is the
ceiling any generator can reach, and chance is the share of the commonest kind (mole, about 0.3).

Measured at the miniature's 32 px (`DetailReaderSetup()`, 600 steps): held-out accuracy 0.265 against a majority
class of 0.285 (train batches reached 0.57, so it memorises the training people's marks and reads no mark on a
new face): a mole or a scar is a pixel or less there, so the claim is not testable at 32 px. The reader is kept
for larger synthfaces renders (`SynthFaceConfig.image_size`), where the marks span several pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import numpy as np
from flax import nnx

from fusion_jax import synth_metrics as sm
from fusion_jax.data import synthfaces

DETAIL_KINDS = synthfaces.MARK_KINDS  # the classes, in this order
DETAIL_FILE = "detail_reader.safetensors"
DETAIL_REPORT = "detail_reader.json"


@dataclasses.dataclass(frozen=True)
class DetailReaderSetup:
    """Data and model of the detail reader (about half a minute on 2 CPU cores)."""

    train_identities: int = 600  # train-split identities (each has one mark kind)
    train_photos: int = 8  # photos of each
    eval_identities: int = 200  # held-out identities for the accuracy
    eval_photos: int = 2
    net: sm.ConvNetConfig = sm.ConvNetConfig(input_size=32, widths=(32, 64, 128), center_crop=0.7,
                                             out_features=len(DETAIL_KINDS))  # the face region only
    train: sm.TrainConfig = sm.TrainConfig(steps=600, max_shift=2)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def mark_labels(identity_ids: np.ndarray, faces: synthfaces.SynthFaceConfig) -> np.ndarray:
    """(N,) index into DETAIL_KINDS of each identity's mark."""
    return np.array([DETAIL_KINDS.index(synthfaces.sample_identity(int(i), faces.seed).mark_kind)
                     for i in np.asarray(identity_ids)], np.int64)


class DetailReader:
    """images (N, H, W, 3) uint8 or [0, 1] floats -> (N,) index into DETAIL_KINDS."""

    KIND = "synthface_detail_reader"

    def __init__(self, net: sm.ConvNet, info: Optional[dict[str, Any]] = None):
        import jax
        import jax.numpy as jnp

        self.net, self.info = net, dict(info or {})
        graphdef, state = nnx.split(net)
        apply = jax.jit(lambda s, images: jnp.argmax(nnx.merge(graphdef, s)(images), axis=-1))
        self._apply = lambda images: apply(state, images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return sm._batched_apply(self._apply, sm._as_uint8_range(images)).astype(np.int64)

    def save(self, path: str) -> None:
        sm._save_nets(path, self.KIND, {"net": self.net}, self.info)

    @classmethod
    def load(cls, path: str) -> "DetailReader":
        nets, info = sm._load_nets(path, cls.KIND)
        return cls(nets["net"], info)


def detail_accuracy(reader: DetailReader, generated: np.ndarray, identity_ids: np.ndarray,
                    faces: synthfaces.SynthFaceConfig = synthfaces.SynthFaceConfig()) -> np.ndarray:
    """Per generated image: 1.0 where the read mark is the mark of the person it was conditioned on."""
    return (reader(generated) == mark_labels(identity_ids, faces)).astype(np.float64)


def train_detail_reader(images: np.ndarray, labels: np.ndarray, setup: DetailReaderSetup = DetailReaderSetup(),
                        log=None) -> DetailReader:
    import jax.numpy as jnp
    import optax

    def loss_fn(model, x, y):
        logits = model(x)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                jnp.mean(jnp.argmax(logits, -1) == y))

    model = sm.build_under_jit(lambda: sm.ConvNet(setup.net, rngs=nnx.Rngs(setup.train.seed)))
    net, batch_accuracy = sm.fit_classifier(model, loss_fn, sm._as_uint8_range(images), labels.astype(np.int32),
                                            setup.train, log)
    return DetailReader(net, {"train_batch_accuracy": batch_accuracy})


def prepare_detail_reader(out_dir: str, setup: DetailReaderSetup = DetailReaderSetup(),
                          faces: synthfaces.SynthFaceConfig = synthfaces.SynthFaceConfig(),
                          log=print) -> DetailReader:
    """The reader cached in OUT_DIR (same setup), or trained on train identities and checked on held-out ones."""
    weights_path, report_path = os.path.join(out_dir, DETAIL_FILE), os.path.join(out_dir, DETAIL_REPORT)
    if os.path.exists(weights_path) and os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
        if report.get("setup") == json.loads(setup.to_json()):
            reader = DetailReader.load(weights_path)
            reader.info.update(report)
            return reader
    start = time.perf_counter()
    train_ids = synthfaces.split_identity_ids(faces, "train")[: setup.train_identities]
    test_ids = synthfaces.split_identity_ids(faces, "heldout")[: setup.eval_identities]
    images, identities, _ = sm.render_photos(faces, train_ids, np.arange(setup.train_photos))
    reader = train_detail_reader(images, mark_labels(identities, faces), setup, log)
    test_images, test_identities, _ = sm.render_photos(faces, test_ids, 100 + np.arange(setup.eval_photos))
    accuracy = float(detail_accuracy(reader, test_images, test_identities, faces).mean())
    labels = mark_labels(test_identities, faces)
    report = {"setup": json.loads(setup.to_json()), "heldout_accuracy": accuracy,
              "chance": float(np.bincount(labels, minlength=len(DETAIL_KINDS)).max() / len(labels)),
              "train_s": time.perf_counter() - start}
    if log:
        log(f"detail reader (mark kind): held-out accuracy {accuracy:.3f} (majority class {report['chance']:.3f}; "
            f"{report['train_s']:.0f}s)")
    os.makedirs(out_dir, exist_ok=True)
    reader.save(weights_path)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    reader.info.update(report)
    return reader
