"""Figures a person can judge: small images upscaled (nearest neighbour, so no detail is invented), in a grid
with labelled columns and rows, and boxes drawn onto images. PIL only (matplotlib is not a dependency)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_GAP = 4  # pixels between cells
_TEXT = (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H*scale, W*scale, 3), every pixel a scale x scale block."""
    image = np.asarray(image)
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1) if scale > 1 else image


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], colours: Sequence[tuple[int, int, int]],
               width: int = 1) -> np.ndarray:
    """Outlines of pixel boxes (x0, y0, x1, y1) on a copy of `image`, one colour per box."""
    canvas = Image.fromarray(np.asarray(image, np.uint8).copy())
    draw = ImageDraw.Draw(canvas)
    for box, colour in zip(boxes, colours):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(colour), width=width)
    return np.asarray(canvas)


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str], *, scale: int = 4,
                  row_labels: Optional[Sequence[str]] = None, title: str = "", font_size: int = 14) -> Image.Image:
    """A white sheet: `title` on top, `column_labels` over the columns, optional `row_labels` at the left, and each
    cell (uint8 (H, W, 3); widths may differ per column, heights per row are the row's tallest) upscaled `scale`x."""
    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one row with one cell")
    ncols = len(column_labels)
    if any(len(r) != ncols for r in rows):
        raise ValueError(f"every row needs {ncols} cells (one per column label), got {[len(r) for r in rows]}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels has {len(row_labels)} entries for {len(rows)} rows")
    font = _font(font_size)
    cells = [[upscale(c, scale) for c in r] for r in rows]
    col_w = [max(r[j].shape[1] for r in cells) for j in range(ncols)]
    row_h = [max(c.shape[0] for c in r) for r in cells]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        if not text:
            return 0, 0
        x0, y0, x1, y1 = probe.multiline_textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    label_h = max(text_size(t)[1] for t in column_labels) + _GAP
    left = (max(text_size(t)[0] for t in row_labels) + 2 * _GAP) if row_labels else 0
    top = (text_size(title)[1] + 2 * _GAP if title else 0) + label_h + _GAP
    width = left + sum(col_w) + _GAP * (ncols + 1)
    height = top + sum(row_h) + _GAP * (len(rows) + 1)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_GAP, _GAP), title, fill=_TEXT, font=font)
    x = left + _GAP
    for j, label in enumerate(column_labels):
        w, _ = text_size(label)
        draw.multiline_text((x + max(0, (col_w[j] - w) // 2), top - label_h - _GAP // 2), label, fill=_TEXT,
                            font=font, align="center")
        x += col_w[j] + _GAP
    y = top + _GAP
    for i, row in enumerate(cells):
        if row_labels:
            _, h = text_size(row_labels[i])
            draw.multiline_text((_GAP, y + max(0, (row_h[i] - h) // 2)), row_labels[i], fill=_TEXT, font=font)
        x = left + _GAP
        for j, cell in enumerate(row):
            sheet.paste(Image.fromarray(np.asarray(cell, np.uint8)), (x, y))
            x += col_w[j] + _GAP
        y += row_h[i] + _GAP
    return sheet
