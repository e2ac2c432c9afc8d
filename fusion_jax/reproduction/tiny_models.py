"""Tiny random metric models (`--metric-models tiny`): every reproduction path runs offline, numbers MEANINGLESS.

Written in the same layouts as the real ones, so the real loaders read them:
- `recognizer/tiny_recognizer.onnx`: an ArcFace-shaped ONNX model (input (N, 3, 112, 112), one 64-d output:
  a random 8x8 stride-8 conv, ReLU, a random linear map) that insightface routes as a recognizer. The folder has no
  detector, so faces are found by the OpenCV Haar fallback (which does find real faces).
- `clip/`: a transformers CLIPModel folder (config.json with text_config / vision_config, model.safetensors,
  the project's tiny CLIP tokenizer, preprocessor_config.json) of 2-layer, 32-wide random towers.
- `inception.safetensors`: the FID Inception topology with every width divided by 16, random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MEANINGLESS = "MEANINGLESS: tiny random metric models (--metric-models tiny); these numbers test the code path only"
TINY_INCEPTION_DIVISOR = 16


def _write_recognizer(path: Path, seed: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = (rng.standard_normal((4, 3, 8, 8)) / np.sqrt(3 * 64)).astype(np.float32)
    proj = (rng.standard_normal((4 * 14 * 14, 64)) / np.sqrt(4 * 14 * 14)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(64)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "proj_w", "proj_b"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_random_recognizer",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 64])],
        initializer=[numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(proj, "proj_w"),
                     numpy_helper.from_array(bias, "proj_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _write_clip(folder: Path, seed: int) -> None:
    import dataclasses

    from flax import nnx

    from fusion_jax import tiny, weights
    from fusion_jax.models import clip

    projection = 16
    text_cfg = dataclasses.replace(tiny.tiny_text_encoder_config(), projection_dim=projection)
    vision_cfg = clip.CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=projection,
                                       num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = tiny.randomize_params(nnx.eval_shape(lambda: clip.CLIPTextModelWithProjection(text_cfg,
                                                                                         rngs=nnx.Rngs(0))), seed)
    vision = tiny.randomize_params(nnx.eval_shape(lambda: clip.CLIPVisionModelWithProjection(vision_cfg,
                                                                                             rngs=nnx.Rngs(0))),
                                   seed + 1)
    tensors = {**weights.state_dict(text), **weights.state_dict(vision), "logit_scale": np.float32([2.6592])}
    config = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": projection,
              "text_config": text_cfg.to_dict(), "vision_config": vision_cfg.to_dict()}
    weights.write_component(folder, config, tensors, "model.safetensors")
    tiny.write_tiny_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))


def _write_inception(path: Path, seed: int) -> None:
    from flax import nnx
    from safetensors.numpy import save_file

    from fusion_jax import tiny, weights
    from fusion_jax.models import inception

    cfg = inception.InceptionConfig(width_divisor=TINY_INCEPTION_DIVISOR)
    model = tiny.randomize_params(nnx.eval_shape(lambda: inception.FIDInceptionV3(cfg, rngs=nnx.Rngs(0))), seed)
    tensors = weights.state_dict(model)
    for key in tensors:  # He-scaled convs (ReLU halves the variance per layer) and BatchNorm at unit statistics
        if key.endswith("conv.weight"):
            tensors[key] = tensors[key] * np.float32(np.sqrt(2.0))
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            tensors[key] = np.ones_like(tensors[key])
        elif key.endswith("running_mean"):
            tensors[key] = np.zeros_like(tensors[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))


def write_tiny_metric_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write (once; reused when present) the tiny models under `folder`; returns their paths by role."""
    folder = Path(folder)
    paths = {"recognizer": folder / "recognizer", "clip": folder / "clip",
             "inception": folder / "inception.safetensors"}
    if not (paths["recognizer"] / "tiny_recognizer.onnx").is_file():
        _write_recognizer(paths["recognizer"] / "tiny_recognizer.onnx", seed)
    if not (paths["clip"] / "model.safetensors").is_file():
        _write_clip(paths["clip"], seed + 10)
    if not paths["inception"].is_file():
        _write_inception(paths["inception"], seed + 20)
    (folder / "README.txt").write_text(MEANINGLESS + "\n")
    return paths
