"""The miniature's style tower: the CLIP image encoder FaceStudio's style branch reads (`facestudio.style_encoder`).

FaceStudio embeds its style image with CLIP's image tower and, in its text branch, the prompt with CLIP's text tower
(through a prior, or directly: `facestudio.text_branch=direct`), and blends the two with `alpha`. The blend means
something only when both embeddings live in one space. The miniature's text encoder is random and frozen, so its
style tower is trained here to meet it: a small CLIP ViT whose `image_embeds` are pulled, by CLIP's symmetric
contrastive loss, towards the pooled text state (`identity.facestudio.pooled_text`, the direct branch's own
embedding) of each photo's caption. The text side stays frozen (locked, as in LiT, but the other tower).

The images are FaceStudio's style input in training: synthfaces training photos with the face box filled with
mid-grey (the stream's `masked_target`), so what the tower can see is the background (colour and pattern). Photos
whose captions are identical are positives of each other (soft targets), not negatives.

The tower is written as a transformers `CLIPVisionModelWithProjection` folder (config.json + model.safetensors)
and loads like any CLIP tower; `training.json` beside it records the command's settings, time and the tower's
background retrieval accuracy on held-out photos (the figure that says it reads what it should).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fusion_jax import saved_settings
from fusion_jax.data import synthfaces
from fusion_jax.data.configs import PipelineConfig, SynthFaceConfig

STYLE_ATTRIBUTES = ("background_colour", "background_pattern")  # what a face-masked photo shows


@dataclasses.dataclass(frozen=True)
class StyleTowerConfig:
    """Size and training of the miniature style tower."""

    hidden_size: int = 64  # ViT width
    layers: int = 2  # transformer layers
    heads: int = 4  # attention heads
    patch_size: int = 4  # patch side in pixels (32 px photos: 8 x 8 patches + the class token)
    steps: int = 1000  # training steps
    batch_size: int = 64  # photos per step (the contrastive loss's negatives)
    lr: float = 1e-3  # peak AdamW learning rate (cosine decay after 50 warmup steps)
    eval_photos: int = 256  # held-out photos for the retrieval accuracy in training.json
    seed: int = 0  # tower initialisation, photo order


def tower_config(cfg: StyleTowerConfig, image_size: int, text_width: int):
    from fusion_jax.models import clip

    return clip.CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
                                 projection_dim=text_width, num_hidden_layers=cfg.layers,
                                 num_attention_heads=cfg.heads, image_size=image_size, patch_size=cfg.patch_size)


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                     same_caption: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy between L2-normalised image and text embeddings (B, D) at temperature
    exp(logit_scale); the target of each row is uniform over the columns whose caption equals its own
    (`same_caption` (B, B) bool, True on the diagonal)."""
    img = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    txt = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    logits = jnp.exp(logit_scale) * img @ txt.T
    same = same_caption.astype(jnp.float32)
    rows = optax.softmax_cross_entropy(logits, same / jnp.sum(same, axis=-1, keepdims=True))
    cols = optax.softmax_cross_entropy(logits.T, same.T / jnp.sum(same.T, axis=-1, keepdims=True))
    return 0.5 * (jnp.mean(rows) + jnp.mean(cols))


class _Contrastive(nnx.Module):
    """The tower and CLIP's learned temperature (initialised at 1/0.07)."""

    def __init__(self, tower):
        self.tower = tower
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))


def _masked_photos(faces: SynthFaceConfig, split: str, count: int, seed: int):
    """`count` photos of a split with their face boxes mid-grey (uint8 (count, H, W, 3)), captions, labels."""
    from fusion_jax.data.pipeline import box_mask

    source = synthfaces.SynthFaces(faces, split)
    rng = np.random.default_rng(seed)
    images, captions, labels = [], [], []
    for i in rng.choice(len(source), size=count, replace=False):
        record = source[int(i)]
        mask = box_mask(np.asarray(record["face_box"]), record["image"].shape[0])
        images.append(np.where(mask > 0.5, np.uint8(128), record["image"]))
        captions.append(str(record["caption"]))
        labels.append(record["attribute_labels"])
    return np.stack(images), captions, np.stack(labels)


def background_captions() -> tuple[list[str], np.ndarray]:
    """One caption per (background colour, pattern) with a neutral face looking at the camera, and the (colour,
    pattern) class pairs they state (the retrieval candidates)."""
    captions, pairs = [], []
    for c, colour in enumerate(synthfaces.BACKGROUND_COLOURS):
        for p, pattern in enumerate(synthfaces.BACKGROUND_PATTERNS):
            attrs = synthfaces.PromptAttributes(expression="neutral", gaze="camera", background_colour=colour,
                                                background_pattern=pattern)
            captions.append(synthfaces.build_caption(attrs))
            pairs.append((c, p))
    return captions, np.asarray(pairs)


def retrieval_accuracy(tower, text_encoder, tokenizer, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 retrieval of each masked photo's background among the 24 background captions: colour, pattern and
    both right (chance 1/6, 1/4, 1/24)."""
    from fusion_jax.identity.facestudio import clip_pixels, pooled_text

    captions, pairs = background_captions()
    ids = jnp.asarray(tokenizer(captions), jnp.int32)
    text = pooled_text(text_encoder(ids).last_hidden_state, ids)
    img = tower(clip_pixels(images.astype(np.float32) / 127.5 - 1.0, tower.config.image_size)).image_embeds
    sims = (img / jnp.linalg.norm(img, axis=-1, keepdims=True)) @ (text / jnp.linalg.norm(text, axis=-1,
                                                                                           keepdims=True)).T
    best = pairs[np.asarray(jnp.argmax(sims, axis=-1))]
    a = [synthfaces.ATTRIBUTE_NAMES.index(n) for n in STYLE_ATTRIBUTES]
    colour, pattern = best[:, 0] == labels[:, a[0]], best[:, 1] == labels[:, a[1]]
    return {"colour": float(colour.mean()), "pattern": float(pattern.mean()), "both": float((colour & pattern).mean())}


def _settings(cfg: StyleTowerConfig, faces: SynthFaceConfig, pipeline_dir: str) -> dict[str, Any]:
    return {"tower": dataclasses.asdict(cfg), "synthfaces": dataclasses.asdict(faces),
            "text_encoder": os.path.abspath(os.path.join(pipeline_dir, "text_encoder"))}


def _same_settings(saved: Any, wanted: dict[str, Any]) -> bool:
    """Whether a saved tower's settings are `wanted` (SynthFaceConfig fields added since: their defaults)."""
    if not isinstance(saved, dict) or set(saved) != set(wanted):
        return False
    return (saved_settings.matches(saved["tower"], StyleTowerConfig(**wanted["tower"]))
            and saved_settings.matches(saved["synthfaces"], SynthFaceConfig(**wanted["synthfaces"]))
            and saved["text_encoder"] == wanted["text_encoder"])


def train_style_tower(out_dir: str | os.PathLike, pipeline_dir: str | os.PathLike, faces: SynthFaceConfig,
                      cfg: StyleTowerConfig = StyleTowerConfig(), log: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    """Train the style tower against `pipeline_dir`'s frozen text encoder and write it to `out_dir`; a folder
    that already holds a tower trained with the same settings is reused (its training.json is returned)."""
    from fusion_jax import weights
    from fusion_jax.data.pipeline import make_pipeline
    from fusion_jax.identity.facestudio import clip_pixels, pooled_text
    from fusion_jax.models import clip
    from fusion_jax.tokenizer import load_tokenizer

    out_dir, pipeline_dir = Path(out_dir), Path(pipeline_dir)
    record_path = out_dir / "training.json"
    settings = _settings(cfg, faces, str(pipeline_dir))
    if record_path.is_file() and (out_dir / "model.safetensors").is_file():
        record = json.loads(record_path.read_text())
        if _same_settings(record.get("settings"), settings):
            log(f"style tower: reusing {out_dir}")
            return record
        raise ValueError(f"{out_dir} holds a style tower trained with other settings; use another folder or "
                         "remove it")
    start = time.perf_counter()
    text_encoder = weights.load_text_encoder(pipeline_dir)
    tokenizer = load_tokenizer(pipeline_dir / "tokenizer")
    text_width = text_encoder.config.hidden_size
    tower = clip.CLIPVisionModelWithProjection(tower_config(cfg, faces.image_size, text_width),
                                               rngs=nnx.Rngs(cfg.seed))
    model = _Contrastive(tower)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(50, cfg.steps // 2), cfg.steps, cfg.lr * 0.1)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
    text_graph, text_state = nnx.split(text_encoder)

    @nnx.jit
    def step(model, optimizer, masked, ids, same):
        text_model = nnx.merge(text_graph, text_state)
        text = jax.lax.stop_gradient(pooled_text(text_model(ids).last_hidden_state, ids))
        pixels = clip_pixels(masked, model.tower.config.image_size)

        def loss_fn(m):
            return contrastive_loss(m.tower(pixels).image_embeds, text, m.logit_scale[...], same)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    stream = make_pipeline(synthfaces.SynthFaces(faces, "train"), PipelineConfig(
        resolution=faces.image_size, num_references=0, p_drop_text=0.0, p_drop_reference=0.0, flip=False,
        random_crop=False, color_jitter=0.0, augment_references=False, seed=cfg.seed, batch_size=cfg.batch_size,
        num_parallel_calls=2, tokenize=tokenizer))
    losses = []
    for i in range(cfg.steps):
        batch = next(stream)
        captions = np.asarray(batch["caption"])
        same = jnp.asarray(captions[:, None] == captions[None, :])
        losses.append(step(model, optimizer, jnp.asarray(batch["masked_target"]), jnp.asarray(batch["input_ids"]),
                           same))
        if (i + 1) % max(1, cfg.steps // 5) == 0:
            log(f"  style tower step {i + 1}/{cfg.steps}: contrastive loss {float(losses[-1]):.3f}")
    train_s = time.perf_counter() - start
    images, _, labels = _masked_photos(faces, "heldout", min(cfg.eval_photos, faces.num_heldout_identities
                                                             * faces.photos_per_identity), cfg.seed)
    accuracy = retrieval_accuracy(tower, text_encoder, tokenizer, images, labels)
    weights.save_vision_encoder(tower, out_dir)
    record = {"settings": settings, "seconds": train_s, "steps": cfg.steps,
              "first_loss": float(losses[0]), "final_loss": float(np.mean([float(x) for x in losses[-20:]])),
              "heldout_background_retrieval": accuracy,
              "retrieval_chance": {"colour": 1 / 6, "pattern": 1 / 4, "both": 1 / 24}}
    record_path.write_text(json.dumps(record, indent=2))
    log(f"style tower: {cfg.steps} steps in {train_s:.0f} s, held-out background retrieval colour "
        f"{accuracy['colour']:.3f} / pattern {accuracy['pattern']:.3f} / both {accuracy['both']:.3f} (chance "
        f"0.167 / 0.250 / 0.042)")
    return record


__all__ = ["StyleTowerConfig", "STYLE_ATTRIBUTES", "contrastive_loss", "train_style_tower", "retrieval_accuracy",
           "background_captions", "tower_config"]
