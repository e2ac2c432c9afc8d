"""The demo page's request handlers, as plain functions of the page's values (testable without a browser).

Each handler turns what the page sends (strings, numbers, uploaded file paths, the drawing canvas) into an engine
call and returns what the page shows. Every failure a user can cause becomes a message in the status box (never
an exception reaching Gradio), so one bad request leaves the server and the session as they were; anything
unexpected is reported the same way, with its type, and logged with its traceback.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import numpy as np

from fusion_jax.demo.engine import DemoEngine, DemoError, GenerationRequest, PersonRequest
from fusion_jax.demo.uploads import UploadError

logger = logging.getLogger(__name__)

ERROR_PREFIX = "**Error:** "
MAX_HISTORY = 24  # results kept in a session's gallery (newest first)


def error_message(error: BaseException) -> str:
    """The status text for a failed request."""
    if isinstance(error, (UploadError, DemoError)):
        return ERROR_PREFIX + str(error)
    logger.exception("demo request failed", exc_info=error)
    return ERROR_PREFIX + f"internal error ({type(error).__name__}: {error}); the server keeps running"


def _paths(files) -> list[str]:
    """Gradio File values (None, a path, a list of paths or of objects with .name) -> list of paths."""
    if not files:
        return []
    if isinstance(files, (str, bytes)) or hasattr(files, "name"):
        files = [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


def people_from_values(people_values: Sequence[tuple]) -> list[PersonRequest]:
    """[(files, box text, strength)] per person slot -> PersonRequests (slots without photos are dropped; a box or
    strength typed for a person without photos is ignored)."""
    people = []
    for files, box, strength in people_values:
        photos = _paths(files)
        if photos:
            people.append(PersonRequest(photos=photos, box=box or "", strength=float(strength)))
    return people


def preview(engine: DemoEngine, method: Optional[str], people_values: Sequence[tuple]) -> tuple[list, str]:
    """Uploads -> (aligned crops for the crop gallery, status text): what the detector found, before generating."""
    people = people_from_values(people_values)
    if not people:
        return [], "Upload 1-4 photos per person (or none, for text-to-image)."
    try:
        _, ref_set, _, _, _, records = engine.prepare_references(people, method)
    except Exception as e:  # noqa: BLE001 - every failure becomes a message
        return [], error_message(e)
    crops = engine.crop_gallery(ref_set, records)
    counts = ", ".join(f"person {k + 1}: {len(p.photos)} photo(s)" for k, p in enumerate(people))
    return crops, f"Faces found ({engine.analyzer.backend} detector): {counts}. The aligned crops are shown below."


def generate(engine: DemoEngine, history: Optional[list], prompt: str, negative_prompt: str, method: Optional[str],
             steps, seed, guidance, reference_guidance, guidance_form: str, scheduler: str,
             people_values: Sequence[tuple]) -> tuple[list, list, list, str]:
    """One Generate click -> (new history, results gallery, crop gallery, status text).

    On failure the history and gallery stay as they were and the status box says why."""
    history = list(history or [])
    try:
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt or "", method=method or None, steps=_number(steps, "steps"),
            seed=_number(seed, "seed"), guidance=_number(guidance, "guidance"),
            reference_guidance=_number(reference_guidance, "reference guidance"),
            guidance_form=guidance_form or "disentangled", scheduler=scheduler or "ddim",
            people=people_from_values(people_values))
        start = time.perf_counter()
        result = engine.generate(request)
        seconds = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - every failure becomes a message
        return history, history, [], error_message(e)
    caption = f"seed {result.settings['seed']}: {prompt[:48]}"
    history = [(str(result.path), caption)] + history[: MAX_HISTORY - 1]
    status = (f"Generated {result.path.name} ({result.settings['width']}x{result.settings['height']}, "
              f"{result.settings['steps']} steps, {seconds:.1f} s; the first request of a new shape or setting "
              "compiles). Its settings are stored in the PNG (text chunk `fusion_jax`).")
    if result.crops:
        status += f" Identity method: {result.settings['identity_method']}."
        if not engine.identity_trained():
            status += " The identity modules are UNTRAINED (no --identity-weights): no likeness is expected."
    return history, history, result.crops, status


def _number(value: Any, name: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DemoError(f"{name} is empty")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None


def box_from_drawing(editor_value) -> Optional[str]:
    """The bounding box of what was drawn on the canvas, as 'x0,y0,x1,y1' fractions (None when nothing is drawn).

    `editor_value` is Gradio's ImageEditor value: a dict with 'layers' (RGBA arrays, the strokes) and 'background'
    (or 'composite'), all the canvas size. The strokes of every layer count."""
    if not isinstance(editor_value, dict):
        return None
    layers = [np.asarray(layer) for layer in editor_value.get("layers") or [] if layer is not None]
    layers = [layer for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not layers:
        return None
    drawn = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        if layer.shape[:2] == drawn.shape:
            drawn |= layer[..., 3] > 0
    if not drawn.any():
        return None
    h, w = drawn.shape
    ys, xs = np.nonzero(drawn)
    box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    return ",".join(f"{v:.3f}" for v in box)


__all__ = ["ERROR_PREFIX", "box_from_drawing", "error_message", "generate", "people_from_values", "preview"]
