"""CLIP-T (image-prompt) and CLIP-I (image-image) similarity with our CLIP towers and their projections.

Why: the papers' prompt-following column is the cosine similarity of CLIP image and text embeddings (x100).
`--clip DIR` is a local transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14: config.json with
text_config / vision_config, model.safetensors with text_model.* / vision_model.* / text_projection /
visual_projection, the tokenizer files and preprocessor_config.json); nothing is downloaded. The towers are
`fusion_jax.models.clip` modules; images are preprocessed as transformers' CLIPImageProcessor does (shortest
edge resized bicubic with PIL, centre crop, rescale 1/255, normalise by the folder's mean / std).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence


import jax.numpy as jnp
import numpy as np
from flax import nnx

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IGNORED = (r"(^|\.)position_ids$", r"^logit_scale$")


class ClipError(ValueError):
    """A bad --clip folder; the message names the flag and the path."""


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's settings (from preprocessor_config.json)."""

    shortest_edge: int = 224  # resize so the shorter side is this (bicubic)
    crop: tuple[int, int] = (224, 224)  # centre crop (height, width)
    mean: tuple[float, float, float] = _CLIP_MEAN
    std: tuple[float, float, float] = _CLIP_STD

    @classmethod
    def from_folder(cls, folder: Path, image_size: int) -> "ClipPreprocess":
        file = folder / "preprocessor_config.json"
        if not file.is_file():
            return cls(image_size, (image_size, image_size))
        d = json.loads(file.read_text())
        size = d.get("size", image_size)
        edge = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop = d.get("crop_size", image_size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(int(edge), tuple(int(c) for c in crop), tuple(d.get("image_mean", _CLIP_MEAN)),
                   tuple(d.get("image_std", _CLIP_STD)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> (crop_h, crop_w, 3) float32 normalised pixels (NHWC for our vision tower)."""
        from PIL import Image

        h, w = image.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        ch, cw = self.crop
        top, left = int((new_h - ch) / 2), int((new_w - cw) / 2)
        crop = resized[top : top + ch, left : left + cw].astype(np.float32) / 255.0
        return ((crop - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)


class ClipMetric:
    """Text and image embeddings of one CLIPModel folder; CLIP-T and CLIP-I as 100 x cosine similarity."""

    def __init__(self, folder: str | Path, *, flag: str = "--clip"):
        from fusion_jax import weights
        from fusion_jax.models import clip
        from fusion_jax.tokenizer import PromptTokenizer

        folder = Path(folder).expanduser()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ClipError(f"{flag} {folder}: no config.json (expected a transformers CLIPModel folder, e.g. "
                            "openai/clip-vit-large-patch14)")
        raw = json.loads(config_file.read_text())
        if "text_config" not in raw or "vision_config" not in raw:
            raise ClipError(f"{flag} {folder}: config.json is not a full CLIPModel config (needs text_config and "
                            "vision_config: both towers and their projections)")
        text_cfg = clip.CLIPTextConfig.from_dict(raw)
        vision_cfg = clip.CLIPVisionConfig.from_dict(raw)
        if "projection_dim" in raw:
            text_cfg = dataclasses.replace(text_cfg, projection_dim=int(raw["projection_dim"]))
            vision_cfg = dataclasses.replace(vision_cfg, projection_dim=int(raw["projection_dim"]))
        try:
            tensors = weights.read_component_tensors(folder, weights.TRANSFORMERS_WEIGHTS)
        except weights.CheckpointError as e:
            raise ClipError(f"{flag} {folder}: {e}") from e
        text_t = {k: v for k, v in tensors.items() if k.startswith(("text_model.", "text_projection."))}
        vision_t = {k: v for k, v in tensors.items() if k.startswith(("vision_model.", "visual_projection."))}
        other = sorted(set(tensors) - set(text_t) - set(vision_t) - {"logit_scale"})
        if other:
            raise ClipError(f"{flag} {folder}: unexpected weights {other[:5]} (not a CLIPModel checkpoint?)")
        source = f"{flag} {folder}"
        self.text = weights.build_from_tensors(
            lambda: clip.CLIPTextModelWithProjection(text_cfg, rngs=nnx.Rngs(0)), text_t, source=source,
            ignore=_IGNORED)
        self.vision = weights.build_from_tensors(
            lambda: clip.CLIPVisionModelWithProjection(vision_cfg, rngs=nnx.Rngs(0)), vision_t, source=source,
            ignore=_IGNORED)
        try:
            self.tokenizer = PromptTokenizer.from_pretrained(folder, max_length=text_cfg.max_position_embeddings)
        except (FileNotFoundError, OSError) as e:
            raise ClipError(f"{flag} {folder}: no CLIP tokenizer ({e})") from e
        self.preprocess = ClipPreprocess.from_folder(folder, vision_cfg.image_size)
        self.name = f"{folder.name} (CLIP {vision_cfg.hidden_size}-wide ViT/{vision_cfg.patch_size}, " \
                    f"{text_cfg.projection_dim}-d projection)"
        self._text_fn = nnx.jit(lambda m, ids: m(ids).text_embeds)
        self._image_fn = nnx.jit(lambda m, px: m(px).image_embeds)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, P) unit-length projected text embeddings."""
        out = np.asarray(self._text_fn(self.text, jnp.asarray(self.tokenizer(list(prompts)))), np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def image_embeds(self, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """(N, P) unit-length projected image embeddings of RGB uint8 images (any sizes)."""
        pixels = np.stack([self.preprocess(np.asarray(im)) for im in images])
        from fusion_jax.batching import map_padded_batches

        emb = map_padded_batches(lambda x: self._image_fn(self.vision, x), pixels.astype(np.float32), batch_size,
                                 (0, 0))
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def clip_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """100 x row-wise cosine similarity of unit-length embeddings (N, P), (N, P) -> (N,)."""
    return 100.0 * np.sum(np.asarray(a) * np.asarray(b), axis=1)


__all__ = ["ClipError", "ClipMetric", "ClipPreprocess", "clip_similarity"]
