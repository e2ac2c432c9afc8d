"""Test data for the face-data tests: tiny insightface-compatible ONNX models and synthetic photos.

The tiny models have the signatures insightface routes on, so its real loading code runs on them:

- **detector** (SCRFD layout, 9 outputs: scores / box distances / keypoint offsets for strides 8, 16,
  32 with 2 anchors each): a centre-surround template matcher. At stride s it fires on a bright square
  of side 4s (32, 64 or 128 detector pixels) centred on an anchor point of the stride grid with a dark
  surround, and predicts the square as the box and 5 keypoints at the ArcFace template's relative
  positions inside it. So a test knows exactly where the "faces" and their landmarks are.
- **recognition** (ArcFace layout, input (N, 3, 112, 112), one output (N, 512)): global average pool of
  the normalised crop, times a fixed random (3, 512) matrix, plus a bias: a linear function a test can
  recompute with NumPy.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fusion_jax.data.faces import ARCFACE_TEMPLATE_112

STRIDES = (8, 16, 32)
# Bright-square side detected at each stride, in detector pixels.
FACE_SIDE_PER_STRIDE = {s: 4 * s for s in STRIDES}
RECOGNITION_SEED = 1234
_SCORE_GAIN = 20.0
_SCORE_THRESHOLD = 1.5  # centre mean minus surround mean, of normalised pixels in [-1, 1]


def _initializer(name, array):
    return numpy_helper.from_array(np.asarray(array), name=name)


def _template_kernel(stride):
    """Conv weights (2, 3, k, k): anchor 0 = gain * (mean inside square - mean of surround), anchor 1 = 0."""
    radius = FACE_SIDE_PER_STRIDE[stride] // 2
    ring = radius // 4
    size = 2 * (radius + ring)
    inside = np.zeros((size, size), bool)
    inside[ring : ring + 2 * radius, ring : ring + 2 * radius] = True
    kernel = np.where(inside, 1.0 / (inside.sum() * 3), -1.0 / ((~inside).sum() * 3))
    weights = np.zeros((2, 3, size, size), np.float32)
    weights[0] = _SCORE_GAIN * kernel
    return weights, size


def write_tiny_detector(path):
    """Write the SCRFD-like template-matching detector described in the module docstring."""
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    template = ARCFACE_TEMPLATE_112 / 112.0 - 0.5  # keypoints relative to the square, in side units
    for stride in STRIDES:
        weights, size = _template_kernel(stride)
        half = size // 2
        inits += [
            _initializer(f"w{stride}", weights),
            _initializer(f"b{stride}", np.array([-_SCORE_GAIN * _SCORE_THRESHOLD, -30.0], np.float32)),
        ]
        nodes.append(
            helper.make_node("Conv", ["input.1", f"w{stride}", f"b{stride}"], [f"resp{stride}"],
                             strides=[stride, stride], pads=[half, half, half - stride, half - stride])
        )
        nodes.append(helper.make_node("Sigmoid", [f"resp{stride}"], [f"prob{stride}"]))
        # Constant box distances (2 stride units each side) and keypoint offsets, for both anchors.
        side_units = FACE_SIDE_PER_STRIDE[stride] / stride
        box = np.full(4, side_units / 2, np.float32)
        kps = (template * side_units).astype(np.float32).reshape(10)
        const_bias = np.concatenate([box, box, kps, kps]).astype(np.float32)
        inits += [_initializer(f"cw{stride}", np.zeros((28, 2, 1, 1), np.float32)), _initializer(f"cb{stride}", const_bias)]
        nodes.append(helper.make_node("Conv", [f"prob{stride}", f"cw{stride}", f"cb{stride}"], [f"const{stride}"]))
        for part, (lo, hi, width, source) in {
            "score": (0, 2, 1, f"prob{stride}"), "bbox": (0, 8, 4, f"const{stride}"), "kps": (8, 28, 10, f"const{stride}"),
        }.items():
            inits += [
                _initializer(f"{part}_lo{stride}", np.array([lo], np.int64)),
                _initializer(f"{part}_hi{stride}", np.array([hi], np.int64)),
                _initializer(f"{part}_axis{stride}", np.array([1], np.int64)),
                _initializer(f"{part}_shape{stride}", np.array([-1, width], np.int64)),
            ]
            nodes += [
                helper.make_node("Slice", [source, f"{part}_lo{stride}", f"{part}_hi{stride}", f"{part}_axis{stride}"], [f"{part}_sl{stride}"]),
                helper.make_node("Transpose", [f"{part}_sl{stride}"], [f"{part}_t{stride}"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{part}_t{stride}", f"{part}_shape{stride}"], [f"{part}_{stride}"]),
            ]
            outputs[part].append(helper.make_tensor_value_info(f"{part}_{stride}", TensorProto.FLOAT, [None, width]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def recognition_weights():
    rng = np.random.default_rng(RECOGNITION_SEED)
    return rng.normal(size=(3, 512)).astype(np.float32), rng.normal(size=(512,)).astype(np.float32) * 0.1


def write_tiny_recognition(path):
    """Write the linear ArcFace-shaped recognition model described in the module docstring."""
    matrix, bias = recognition_weights()
    nodes = [
        helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "proj_w", "proj_b"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])],
        initializer=[_initializer("proj_w", matrix), _initializer("proj_b", bias)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_tiny_insightface_models(folder) -> str:
    """A model folder like buffalo_l with the tiny detector and recognizer; returns its path."""
    os.makedirs(folder, exist_ok=True)
    write_tiny_detector(os.path.join(folder, "det_tiny.onnx"))
    write_tiny_recognition(os.path.join(folder, "w_tiny.onnx"))
    return str(folder)


def reference_embedding(aligned_crop_rgb: np.ndarray) -> np.ndarray:
    """What the tiny recognizer computes for an aligned 112 RGB crop, in NumPy, L2-normalised."""
    matrix, bias = recognition_weights()
    mean = ((aligned_crop_rgb.astype(np.float64) - 127.5) / 127.5).mean(axis=(0, 1))
    raw = mean @ matrix.astype(np.float64) + bias
    return raw / np.linalg.norm(raw)


def blob_face_landmarks(center, side) -> np.ndarray:
    """Where the tiny detector puts the 5 landmarks of a square face of `side` centred at `center` (x, y)."""
    return np.asarray(center, np.float64) + (ARCFACE_TEMPLATE_112 / 112.0 - 0.5) * side


def draw_blob_face(image: np.ndarray, center, side, color=(255, 255, 255)) -> None:
    """Paint a square "face" of `side` pixels centred at `center` (x, y), in place."""
    cx, cy = center
    half = side // 2
    image[cy - half : cy + half, cx - half : cx + half] = color


def blob_photo(size, faces, background=12, seed=0) -> np.ndarray:
    """A dark (size x size) RGB photo with slight noise and the given [(center, side, color)] faces."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(background, 3, size=(size, size, 3)), 0, 255).astype(np.uint8)
    for center, side, color in faces:
        draw_blob_face(image, center, side, color)
    return image
