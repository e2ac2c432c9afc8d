"""Small helpers shared by the command-line entry points: resolving `--model`, writing PNGs and grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PNG_SETTINGS_KEY = "fusion_jax"


def load_pipeline_arg(model: str, dtype: str = "float32"):
    """`--model` value -> loaded pipeline; `tiny` writes (once) and loads the project's tiny random pipeline.
    `dtype` 'auto' is the backend's compute dtype (`fusion_jax.precision`); the weights are loaded in it."""
    import jax.numpy as jnp

    from fusion_jax import precision, weights

    dtype = precision.resolve_compute_dtype(dtype)

    if model == "tiny":
        from fusion_jax.tiny import tiny_pipeline_dir

        model = str(tiny_pipeline_dir())
    return weights.load_pipeline(model, dtype=jnp.dtype(dtype))


def save_png(path: Path, image: np.ndarray, settings: dict[str, Any]) -> None:
    """Write an (H, W, 3) uint8 image with its generation settings as JSON in the PNG text chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_SETTINGS_KEY, json.dumps(settings, default=str, sort_keys=True))
    Image.fromarray(np.asarray(image, np.uint8)).save(path, pnginfo=info)


def read_png_settings(path: Path) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text[PNG_SETTINGS_KEY])


def make_grid(images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images row-major with a white gap."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    h, w, c = np.asarray(images[0]).shape
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_grid(path: Path, images: Sequence[np.ndarray], columns: int | None = None) -> None:
    from PIL import Image

    Image.fromarray(make_grid(images, columns)).save(path)


def attach_identity_modules(pipeline, identity_weights: str | Path | None, dtype: str = "float32",
                            method_cfg=None, flag: str = "--identity-weights", method: str | None = None):
    """Give the pipeline's UNet an identity method's modules; returns (pipeline, method, cfg, trained).

    With `identity_weights` (a `train/export.py` folder, or its `identity/` subfolder): the exported UNet (when the
    folder has `unet/`, so LoRA / fully trained runs come back whole) with the exported method's modules, checked
    to have the pipeline UNet's architecture; `method` (a name), when given, must be the exported one. Without:
    fresh, untrained modules of `method` (default: the default method) from `method_cfg` (default: its defaults).
    """
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from fusion_jax import precision
    from fusion_jax.identity import base as identity_base
    from fusion_jax.identity import export as identity_export
    from fusion_jax.models.unet import UNet2DConditionModel

    dtype = precision.resolve_compute_dtype(dtype)

    try:
        chosen = identity_base.get(method, what="--method") if method is not None else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if identity_weights is None:
        chosen = chosen or identity_base.default_method()
        cfg = method_cfg if method_cfg is not None else chosen.config_class()
        model = chosen.attach(pipeline.unet, cfg)
        return dataclasses.replace(pipeline, unet=model), chosen, cfg, False
    folder = identity_export.identity_folder(identity_weights)
    if folder is None:
        raise SystemExit(f"{flag} {identity_weights}: no {identity_export.IDENTITY_DIR}/{identity_export.IDENTITY_CONFIG}"
                         " there (expected a folder written by train/export.py)")
    root = folder.parent if folder.name == identity_export.IDENTITY_DIR else folder
    try:
        if (root / "unet" / "config.json").is_file():
            model, exported, cfg = identity_export.load_identity_model(root, chosen, dtype=jnp.dtype(dtype))
            # what the method makes of --model's UNet (e.g. FlashFace widens conv_in) must be the exported UNet
            expected = nnx.eval_shape(lambda: exported.attach(UNet2DConditionModel(pipeline.unet.config,
                                                                                   rngs=nnx.Rngs(0)), cfg))
            base, ours = exported.base_unet(expected).config.to_dict(), exported.base_unet(model).config.to_dict()
            if base != ours:
                diff = sorted(k for k in set(base) | set(ours) if base.get(k) != ours.get(k))
                raise SystemExit(f"{flag} {identity_weights}: the exported UNet differs from --model's UNet in "
                                 f"{diff[:8]}; export and base model must match")
        else:
            model, exported, cfg = identity_export.load_identity_tensors(pipeline.unet, root, chosen)
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"{flag} {identity_weights}: cannot load the identity modules ({e})") from e
    return dataclasses.replace(pipeline, unet=model), exported, cfg, True
