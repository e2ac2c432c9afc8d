"""Small helpers shared by the command-line entry points: resolving `--model`, writing PNGs and grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TINY_PIPELINE_DIR = Path("~/.cache/fusion_jax/tiny-pipeline").expanduser()
PNG_SETTINGS_KEY = "fusion_jax"


def load_pipeline_arg(model: str, dtype: str = "float32"):
    """`--model` value -> loaded pipeline; `tiny` writes (once) and loads the project's tiny random pipeline."""
    import jax.numpy as jnp

    from fusion_jax import weights

    if model == "tiny":
        from fusion_jax import tiny

        if not (TINY_PIPELINE_DIR / "model_index.json").is_file():
            tiny.write_tiny_pipeline(TINY_PIPELINE_DIR)
        model = str(TINY_PIPELINE_DIR)
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
