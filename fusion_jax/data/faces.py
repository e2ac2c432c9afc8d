"""Face detection with 5-point landmarks, alignment to the ArcFace template, ArcFace embeddings.

Two backends behind one `FaceAnalyzer`:

- **insightface** (SCRFD detector with keypoints + ArcFace recognition), read from a local model folder
  (`~/.insightface/models/buffalo_l` by default). The folder is passed to insightface as a directory, so
  its model-zoo download code is never reached; a missing folder is never downloaded.
- **opencv** fallback: the Haar cascade that ships inside OpenCV 4.x (`cv2.data.haarcascades`). It keeps
  detection and cropping working when no insightface models are installed; landmarks are estimated
  (eye cascade inside the face box when it finds both eyes, template proportions otherwise) and
  embeddings are unavailable (`FaceAnalyzer.embeddings_available` is False, with a logged reason).

Images at this API are RGB uint8 (H, W, 3); insightface works in BGR internally and is fed BGR here.
Alignment is our own closed-form similarity fit (Umeyama) + `cv2.warpAffine`; at size 112 without a
margin it reproduces insightface's `face_align.norm_crop`.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Optional

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# The ArcFace 5-point template in a 112x112 crop: left eye, right eye, nose tip, left/right mouth corner
# (x, y pixels; "left" is the image-left point). Public constant of insightface's face_align.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

# Embedding width of the ArcFace models in buffalo_l (and of the face record contract).
EMBEDDING_DIM = 512

DEFAULT_MODEL_DIR = os.path.join("~", ".insightface", "models", "buffalo_l")

_HAAR_FACE_FILE = "haarcascade_frontalface_default.xml"
_HAAR_EYE_FILE = "haarcascade_eye.xml"

# Landmark positions relative to a Haar face box (x, y as fractions of width, height), used when the
# eye cascade does not find both eyes. Chosen so that aligning a Haar box of a frontal face gives about
# the same crop as the ArcFace template.
_HAAR_RELATIVE_LANDMARKS = np.array(
    [[0.32, 0.40], [0.68, 0.40], [0.50, 0.58], [0.36, 0.76], [0.64, 0.76]], dtype=np.float64
)


class NoFaceError(ValueError):
    """No face was detected in an image; the message names the image."""


@dataclasses.dataclass(frozen=True)
class FaceAnalyzerConfig:
    """Where the face models are and how detection runs."""

    # Folder with insightface ONNX models (detector with keypoints + ArcFace recognition); `~` expanded.
    model_dir: str = DEFAULT_MODEL_DIR
    # "auto": insightface when model_dir has a detector, else the OpenCV fallback; or force one of
    # "insightface" (error if the models are missing) / "opencv".
    backend: str = "auto"
    # Detector input size (width, height); photos are letterboxed into it.
    det_size: tuple[int, int] = (640, 640)
    # Minimum detector score for a face.
    det_thresh: float = 0.5
    # onnxruntime execution providers for the insightface models.
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Haar fallback: image pyramid scale step, neighbour votes, smallest face side as a fraction of
    # the image's shorter side.
    haar_scale_factor: float = 1.1
    haar_min_neighbors: int = 5
    haar_min_face_fraction: float = 0.08

    def __post_init__(self):
        if self.backend not in ("auto", "insightface", "opencv"):
            raise ValueError(f"FaceAnalyzerConfig.backend: expected 'auto', 'insightface' or 'opencv', got {self.backend!r}")
        if len(self.det_size) != 2 or min(self.det_size) <= 0:
            raise ValueError(f"FaceAnalyzerConfig.det_size: expected (width, height) > 0, got {self.det_size!r}")


@dataclasses.dataclass
class Face:
    """One detected face in image pixel coordinates."""

    box: np.ndarray  # float32 (4,) [x0, y0, x1, y1]
    landmarks: np.ndarray  # float32 (5, 2) eyes, nose, mouth corners (x, y)
    score: float  # detector confidence (Haar: neighbour votes)
    embedding: Optional[np.ndarray] = None  # float32 (512,) L2-normalised ArcFace embedding, or None

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


# ----------------------------------------------------------------------------------------------------
# Alignment


def alignment_template(size: int, margin: float = 0.0) -> np.ndarray:
    """The ArcFace landmark template for a `size` x `size` crop, zoomed out by `margin`.

    `margin` 0 is the ArcFace crop itself (scaled from 112 to `size`); `margin` m shrinks the template
    about the crop centre by 1 / (1 + m), so the crop shows m more of the surroundings on each scale
    (reference crops for the UNet keep hair and chin: e.g. size 256, margin 0.4).
    """
    if size <= 0:
        raise ValueError(f"alignment size must be positive, got {size}")
    if margin < 0:
        raise ValueError(f"alignment margin must be >= 0, got {margin}")
    unit = ARCFACE_TEMPLATE_112 / 112.0
    unit = 0.5 + (unit - 0.5) / (1.0 + margin)
    return unit * float(size)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping `source` to `target`.

    Umeyama's closed form on (K, 2) point sets; returns the 2x3 matrix for `cv2.warpAffine`.
    """
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2:
        raise ValueError(f"similarity_transform needs two (K, 2) point sets, got {source.shape} and {target.shape}")
    src_mean, dst_mean = source.mean(0), target.mean(0)
    src_c, dst_c = source - src_mean, target - dst_mean
    covariance = dst_c.T @ src_c / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    reflection = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        reflection[1, 1] = -1.0
    rotation = u @ reflection @ vt
    src_var = (src_c**2).sum() / len(source)
    scale = (singular * np.diag(reflection)).sum() / src_var if src_var > 0 else 1.0
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112, margin: float = 0.0) -> np.ndarray:
    """Warp `image` so the 5 `landmarks` land on the ArcFace template of a `size` crop with `margin`.

    Returns a (size, size, C) crop of the same dtype; pixels outside the photo are black.
    """
    matrix = similarity_transform(np.asarray(landmarks, np.float64), alignment_template(size, margin))
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def box_from_landmarks(landmarks: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """A face box [x0, y0, x1, y1] implied by 5 landmarks (the ArcFace crop, margin 0), clipped to the image.

    Used where a source gives landmarks but no box (celeb_a).
    """
    matrix = similarity_transform(alignment_template(112), np.asarray(landmarks, np.float64))
    corners = np.array([[0, 0, 1], [112, 0, 1], [0, 112, 1], [112, 112, 1]], np.float64) @ matrix.T
    height, width = image_shape[:2]
    x0, y0 = np.clip(corners.min(0), 0, [width, height])
    x1, y1 = np.clip(corners.max(0), 0, [width, height])
    return np.array([x0, y0, x1, y1], np.float32)


# ----------------------------------------------------------------------------------------------------
# Backends


def find_insightface_models(model_dir: str) -> list[str]:
    """The ONNX files in an insightface model folder (empty when the folder does not exist)."""
    folder = os.path.expanduser(model_dir)
    return sorted(glob.glob(os.path.join(folder, "*.onnx"))) if os.path.isdir(folder) else []


class _InsightfaceBackend:
    """SCRFD detection + ArcFace recognition through insightface's own loading code, offline."""

    name = "insightface"

    def __init__(self, config: FaceAnalyzerConfig):
        from insightface.app import FaceAnalysis

        folder = os.path.abspath(os.path.expanduser(config.model_dir))
        # A directory `name` makes FaceAnalysis read that folder directly (no model-zoo download).
        app = FaceAnalysis(name=folder, allowed_modules=["detection", "recognition"], providers=list(config.providers))
        app.prepare(ctx_id=-1, det_thresh=config.det_thresh, det_size=tuple(config.det_size))
        self.detector = app.det_model
        self.recognizer = app.models.get("recognition")
        self.model_dir = folder
        if self.recognizer is None:
            self.unavailable_reason = f"no ArcFace recognition model in {folder}: embeddings unavailable"
        else:
            self.unavailable_reason = ""

    def detect(self, image_rgb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])
        boxes, keypoints = self.detector.detect(bgr)
        if keypoints is None:
            raise RuntimeError(f"the detector in {self.model_dir} gives no keypoints; a 5-point SCRFD model is needed")
        return [(boxes[i, :4], keypoints[i], float(boxes[i, 4])) for i in range(boxes.shape[0])]

    def embed(self, image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        size = int(self.recognizer.input_size[0])
        crop_bgr = np.ascontiguousarray(align_face(image_rgb, landmarks, size=size)[..., ::-1])
        return np.asarray(self.recognizer.get_feat(crop_bgr), np.float32).reshape(-1)


class _HaarBackend:
    """OpenCV 4.x Haar cascades: face boxes, eye-refined estimated landmarks, no embeddings."""

    name = "opencv"

    def __init__(self, config: FaceAnalyzerConfig, reason: str):
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise RuntimeError(
                "OpenCV has no Haar cascades (OpenCV 5 removed them): install opencv-python<5, "
                f"or put insightface models in {config.model_dir}"
            )
        self.face_cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, _HAAR_FACE_FILE))
        self.eye_cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, _HAAR_EYE_FILE))
        if self.face_cascade.empty():
            raise RuntimeError(f"cannot load {_HAAR_FACE_FILE} from {cv2.data.haarcascades}")
        self.config = config
        self.unavailable_reason = reason

    def _landmarks(self, gray: np.ndarray, box: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = box
        width, height = x1 - x0, y1 - y0
        landmarks = _HAAR_RELATIVE_LANDMARKS * [width, height] + [x0, y0]
        if self.eye_cascade.empty():
            return landmarks
        upper = gray[int(y0) : int(y0 + 0.6 * height), int(x0) : int(x1)]
        eyes = self.eye_cascade.detectMultiScale(upper, 1.1, 5, minSize=(max(4, int(width * 0.12)),) * 2)
        if len(eyes) < 2:
            return landmarks
        eyes = sorted(eyes, key=lambda e: -e[2] * e[3])[:2]
        centres = sorted(([ex + ew / 2 + x0, ey + eh / 2 + y0] for ex, ey, ew, eh in eyes), key=lambda c: c[0])
        left, right = np.array(centres, np.float64)
        if right[0] - left[0] < 0.2 * width:  # two hits on one eye
            return landmarks
        # Move the template so its eyes sit on the detected eyes (similarity fit on the eye pair).
        matrix = similarity_transform(landmarks[:2], np.stack([left, right]))
        return np.concatenate([landmarks, np.ones((5, 1))], axis=1) @ matrix.T

    def detect(self, image_rgb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
        gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY))
        min_side = max(16, int(self.config.haar_min_face_fraction * min(gray.shape)))
        rects, votes = self.face_cascade.detectMultiScale2(
            gray, scaleFactor=self.config.haar_scale_factor, minNeighbors=self.config.haar_min_neighbors,
            minSize=(min_side, min_side),
        )
        results = []
        for (x, y, w, h), vote in zip(rects, np.asarray(votes).reshape(-1)):
            box = np.array([x, y, x + w, y + h], np.float64)
            results.append((box, self._landmarks(gray, box), float(vote)))
        return results

    def embed(self, image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        raise RuntimeError(self.unavailable_reason)


# ----------------------------------------------------------------------------------------------------
# Public analyzer


class FaceAnalyzer:
    """Detects faces (largest first) with landmarks and, when models allow, ArcFace embeddings."""

    def __init__(self, config: FaceAnalyzerConfig = FaceAnalyzerConfig()):
        self.config = config
        models = find_insightface_models(config.model_dir)
        if config.backend == "insightface" and not models:
            raise FileNotFoundError(
                f"FaceAnalyzerConfig.model_dir={config.model_dir!r}: no insightface *.onnx models there "
                "(expected e.g. buffalo_l's det_10g.onnx and w600k_r50.onnx; nothing is downloaded)"
            )
        if config.backend != "opencv" and models:
            self._backend = _InsightfaceBackend(config)
        else:
            reason = (
                "OpenCV Haar fallback selected: ArcFace embeddings unavailable"
                if config.backend == "opencv"
                else f"no insightface models in {config.model_dir!r}: using the OpenCV Haar fallback; "
                "ArcFace embeddings unavailable (install buffalo_l there to get them)"
            )
            logger.warning(reason)
            self._backend = _HaarBackend(config, reason)

    @property
    def backend(self) -> str:
        """Which backend runs: "insightface" or "opencv"."""
        return self._backend.name

    @property
    def embeddings_available(self) -> bool:
        return not self._backend.unavailable_reason

    @property
    def embeddings_unavailable_reason(self) -> str:
        """Empty when embeddings are available; else why not."""
        return self._backend.unavailable_reason

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """L2-normalised ArcFace embedding (512,) of the face at `landmarks` in an RGB uint8 image."""
        raw = self._backend.embed(_check_rgb(image), landmarks)
        if raw.shape != (EMBEDDING_DIM,):
            raise ValueError(f"recognition model gives an embedding of shape {raw.shape}, expected ({EMBEDDING_DIM},)")
        norm = float(np.linalg.norm(raw))
        return (raw / norm if norm > 0 else raw).astype(np.float32)

    def detect(self, image: np.ndarray, with_embeddings: bool = True) -> list[Face]:
        """All faces in an RGB uint8 (H, W, 3) image, largest box first (embeddings when available)."""
        image = _check_rgb(image)
        faces = [
            Face(box=np.asarray(box, np.float32), landmarks=np.asarray(landmarks, np.float32).reshape(5, 2), score=score)
            for box, landmarks, score in self._backend.detect(image)
        ]
        faces.sort(key=lambda face: -face.area)
        if with_embeddings and self.embeddings_available:
            for face in faces:
                face.embedding = self.embed(image, face.landmarks)
        return faces

    def largest_face(self, image: np.ndarray, name: str = "<image>", required: bool = True) -> Optional[Face]:
        """The largest face, with embedding when available; `NoFaceError` naming `name` (or None) if none."""
        faces = self.detect(image, with_embeddings=False)
        if not faces:
            if required:
                raise NoFaceError(f"{name}: no face detected by the {self.backend} detector")
            return None
        face = faces[0]
        if self.embeddings_available:
            face.embedding = self.embed(image, face.landmarks)
        return face


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image
