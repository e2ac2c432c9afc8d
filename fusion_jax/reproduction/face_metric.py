"""Face identity metric: detection + alignment (fusion_jax.data.faces) and any insightface ONNX recognizer.

Why: the papers' identity columns are cosine similarities of ArcFace embeddings, each paper with its own
recognizer (FlashFace: ArcFace-R101; PuLID: several), so the recognizer is a file the user names and every table
names it. `--recognizer` is an insightface model folder (buffalo_l, antelopev2, ...) or one recognizer `.onnx`.
Its recognition model is found by insightface's own router (square input >= 112, one output: `ArcFaceONNX`),
never downloaded. Faces are found by the folder's SCRFD detector when it has one (5 keypoints, aligned to the
ArcFace template exactly as insightface does), else by the OpenCV Haar fallback of `fusion_jax.data.faces`
(estimated landmarks: the table says so). The embedding is the recognizer's output of the aligned crop, L2-normed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from fusion_jax.data.faces import FaceAnalyzer, FaceAnalyzerConfig, align_face

logger = logging.getLogger(__name__)


class RecognizerError(ValueError):
    """A bad --recognizer value; the message names the flag and the path."""


@dataclasses.dataclass
class FaceResult:
    """The largest face of one image."""

    box: np.ndarray  # (4,) x0, y0, x1, y1 pixels
    crop: np.ndarray  # (S, S, 3) uint8 aligned crop the recognizer read (S = its input size)
    embedding: np.ndarray  # (D,) float32, unit length


def _route(path: Path, providers):
    from insightface.model_zoo import model_zoo

    return model_zoo.get_model(str(path), providers=list(providers))


def find_models(path: Path, providers=("CPUExecutionProvider",), flag: str = "--recognizer"):
    """(recognizer, detector file or None) of an insightface folder or a single recognizer .onnx."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.onnx"))
    else:
        raise RecognizerError(f"{flag} {path}: no such folder or file (expected an insightface model folder such as "
                              "buffalo_l, or a recognizer .onnx; nothing is downloaded)")
    recognizers, detectors = [], []
    for file in files:
        try:
            model = _route(file, providers)
        except Exception as e:  # not an ONNX model onnxruntime can open
            raise RecognizerError(f"{flag} {file}: cannot open as an ONNX model ({e})") from e
        task = getattr(model, "taskname", None)
        if task == "recognition":
            recognizers.append(model)
        elif task == "detection" and path.is_dir():
            detectors.append(file)
    if not recognizers:
        raise RecognizerError(f"{flag} {path}: no insightface recognition model there (expected an ArcFace-style "
                              f"*.onnx: square input >= 112, one output; found {[f.name for f in files]})")
    if len(recognizers) > 1:
        names = [Path(r.model_file).name for r in recognizers]
        raise RecognizerError(f"{flag} {path}: several recognition models {names}; name one .onnx file")
    return recognizers[0], (detectors[0] if detectors else None)


class FaceMetric:
    """Largest face of an image -> aligned crop and unit-length embedding, or None when no face is found."""

    def __init__(self, recognizer: str | Path, *, providers=("CPUExecutionProvider",), det_thresh: float = 0.5,
                 det_size: tuple[int, int] = (640, 640), flag: str = "--recognizer"):
        self.recognizer, detector_file = find_models(Path(recognizer), providers, flag)
        if detector_file is not None:
            cfg = FaceAnalyzerConfig(model_dir=str(Path(recognizer).expanduser()), backend="insightface",
                                     det_thresh=det_thresh, det_size=tuple(det_size), providers=tuple(providers))
            self.detector_name = f"insightface {detector_file.name}"
        else:
            cfg = FaceAnalyzerConfig(backend="opencv")
            self.detector_name = "OpenCV Haar cascade (estimated landmarks)"
        self.analyzer = FaceAnalyzer(cfg)
        self.input_size = int(self.recognizer.input_size[0])

    @property
    def name(self) -> str:
        """What the table says about the recognizer."""
        return f"{Path(self.recognizer.model_file).name} (insightface ONNX, {self.input_size}px input)"

    def embed_crop(self, crop_rgb: np.ndarray) -> np.ndarray:
        """Unit-length embedding of an aligned RGB uint8 crop of the recognizer's input size."""
        raw = np.asarray(self.recognizer.get_feat(np.ascontiguousarray(crop_rgb[..., ::-1])), np.float32).reshape(-1)
        norm = float(np.linalg.norm(raw))
        if norm == 0:
            raise ValueError(f"{self.name}: all-zero embedding")
        return raw / norm

    def analyze(self, image: np.ndarray) -> Optional[FaceResult]:
        """The largest detected face of an RGB uint8 image, or None."""
        faces = self.analyzer.detect(image, with_embeddings=False)
        if not faces:
            return None
        face = faces[0]
        crop = align_face(image, face.landmarks, size=self.input_size)
        return FaceResult(box=np.asarray(face.box, np.float32), crop=crop, embedding=self.embed_crop(crop))

    def analyze_all(self, image: np.ndarray, limit: int) -> list[FaceResult]:
        """Up to `limit` faces, largest first (two-person images)."""
        out = []
        for face in self.analyzer.detect(image, with_embeddings=False)[:limit]:
            crop = align_face(image, face.landmarks, size=self.input_size)
            out.append(FaceResult(np.asarray(face.box, np.float32), crop, self.embed_crop(crop)))
        return out
