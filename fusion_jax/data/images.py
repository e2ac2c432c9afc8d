"""Decode photo files into RGB uint8 arrays, whatever the file's mode.

Photos come as JPEG/PNG/TIFF/WebP in every colour mode a camera or an editor writes: EXIF-rotated,
grayscale, palette, CMYK, 16-bit, with alpha. Everything downstream (detection, alignment, the
training stream) wants one thing: an (H, W, 3) uint8 RGB array the right way up. Files that cannot
be decoded raise `CorruptImageError`, which names the file and the reason, so a dataset build can
skip and count them.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, os.PathLike]

# File extensions treated as photos when scanning a folder (lower case).
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class CorruptImageError(ValueError):
    """A photo file could not be decoded; the message names the file and the cause."""


def is_photo_file(path: PathLike) -> bool:
    """Whether a file name has one of the photo extensions in `PHOTO_EXTENSIONS`."""
    return os.path.splitext(str(path))[1].lower() in PHOTO_EXTENSIONS


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend an RGBA uint8 array over a white background (transparent pixels become white)."""
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgb * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _high_bit_depth_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a 16-bit (or 32-bit integer / float) single-channel image to uint8."""
    if array.dtype == np.uint16 or (array.dtype.kind in "iu" and array.max(initial=0) > 255):
        scaled = array.astype(np.float64) / 65535.0 * 255.0
    elif array.dtype.kind == "f":
        peak = float(array.max(initial=0.0))
        scaled = array.astype(np.float64) * (255.0 if peak <= 1.0 else 1.0)
    else:
        scaled = array.astype(np.float64)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an (H, W, 3) uint8 RGB array (alpha over white)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _high_bit_depth_to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    if mode != "RGB":
        # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's own conversions are correct for these.
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _decode_16bit_color_png(data: bytes) -> np.ndarray | None:
    """Decode 48/64-bit colour PNGs, which PIL cannot represent, through OpenCV (None if not one)."""
    import cv2

    if not data.startswith(b"\x89PNG"):
        return None
    # IHDR: bit depth at byte 24, colour type at byte 25 (2 = RGB, 6 = RGBA).
    if len(data) < 26 or data[24] != 16 or data[25] not in (2, 6):
        return None
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        return None
    scaled = np.clip(np.rint(decoded.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    if scaled.shape[-1] == 4:
        return _composite_on_white(scaled[..., [2, 1, 0, 3]])
    return np.ascontiguousarray(scaled[..., ::-1])


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB, honouring EXIF orientation.

    Raises `CorruptImageError` naming `name` when the bytes are not a readable image.
    """
    if not data:
        raise CorruptImageError(f"{name}: empty file, expected an encoded image (JPEG, PNG, ...)")
    high_depth = _decode_16bit_color_png(data)
    if high_depth is not None:
        return high_depth
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # forces a full decode, so truncated files fail here
            image = ImageOps.exif_transpose(image)
            array = pil_to_rgb_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{name}: cannot decode image ({type(error).__name__}: {error})") from error
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CorruptImageError(f"{name}: decoded to an empty image of shape {array.shape}")
    return array


def read_image(path: PathLike) -> np.ndarray:
    """Read a photo file as (H, W, 3) uint8 RGB (EXIF orientation applied); `CorruptImageError` if unreadable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CorruptImageError(f"{path}: cannot read file ({error})") from error
    return decode_image_bytes(data, name=str(path))


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG bytes (lossless; used for stored crops)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_centre_crop(path: PathLike, height: int, width: int, what: str = "image") -> np.ndarray:
    """An image file -> (height, width, 3) float32 in [0, 1]: the centre crop of the target aspect ratio, resized
    bicubically (style images, img2img starts). Errors name `what` (the flag or config key) and the file."""
    try:
        array = read_image(path)
    except CorruptImageError as e:
        raise ValueError(f"{what} {path}: cannot load the image ({e})") from None
    h, w = array.shape[:2]
    cw, ch = (w, round(w * height / width)) if w * height <= h * width else (round(h * width / height), h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    img = Image.fromarray(array[y0 : y0 + ch, x0 : x0 + cw])
    return np.asarray(img.resize((width, height), Image.BICUBIC), np.float32) / 255.0
