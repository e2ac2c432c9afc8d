"""Loaders for the encoders of the token identity methods: CLIP towers for style images, CLIP's ResNet, and the
DALL-E 2 style prior.

Each loader reads a standard checkpoint layout and fills our NNX module through the one generic converter
(`weights.load_state_dict`): every checkpoint key is mapped, deliberately dropped by a rule named here, or reported
in a `CheckpointMismatchError` naming the key and the file.

- `load_clip_resnet`: open_clip / OpenAI CLIP checkpoints of the RN family (keys `visual.conv1.weight`,
  `visual.layer1.0.conv1.weight`, `visual.attnpool.q_proj.weight`, ...) -> `clip_resnet.ModifiedResNet`. The text
  tower's keys in a full CLIP checkpoint are dropped; anything else outside `visual.` is reported.
- `load_clip_vision`: a transformers CLIP folder, either a vision tower (`CLIPVisionModel(WithProjection)`) or a
  full `CLIPModel` (e.g. openai/clip-vit-large-patch14), whose text tower is dropped -> our vision tower with
  `visual_projection` (`image_embeds`) when the checkpoint has one.
- `load_prior` / `load_prior_sampler`: a diffusers `PriorTransformer` folder (`prior/config.json` +
  `diffusion_pytorch_model.safetensors`, Karlo / Kandinsky layout) and its `UnCLIPScheduler` config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax import weights
from fusion_jax.weights import CheckpointError, CheckpointMismatchError

# Keys of a full CLIP checkpoint that belong to the text tower (OpenAI / open_clip names) or are bookkeeping
# scalars of OpenAI's exported state dicts; an image-tower loader drops exactly these.
_CLIP_TEXT_TOWER_KEYS = re.compile(
    r"^(transformer\.|token_embedding\.|positional_embedding$|ln_final\.|text_projection$|logit_scale$|"
    r"logit_bias$|attn_mask$|input_resolution$|context_length$|vocab_size$)"
)
# BatchNorm's update counter: no effect in inference mode
_BATCH_NORM_COUNTER = r"(^|\.)num_batches_tracked$"


def _dtypes(dtype: Any, param_dtype: Any) -> tuple[Any, Any]:
    """Compute dtype, and parameter dtype (the compute dtype when None)."""
    dtype = jnp.dtype(dtype)
    return dtype, jnp.dtype(param_dtype) if param_dtype is not None else dtype


def _read_checkpoint(source: str | os.PathLike | Mapping[str, Any], *, allow_pickle: bool) -> tuple[dict, str]:
    """(tensors, name for messages) from a file or an in-memory state dict."""
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}, "state dict"
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint {path} is not a file (expected .safetensors, or a trusted pickle)")
    return weights.read_tensors(path, allow_pickle=allow_pickle), str(path)


# ----------------------------------------------------------------------------------------------------------
# CLIP ModifiedResNet (RN50 / RN101 ...)
# ----------------------------------------------------------------------------------------------------------


def clip_resnet_tensors(tensors: Mapping[str, Any], *, prefix: str = "visual.", source: str = "checkpoint") -> dict:
    """The image tower's tensors with `prefix` stripped. Keys outside `prefix` must be CLIP text-tower keys
    (dropped); any other key is reported. A bare tower state dict (keys `conv1.weight`, ...) passes unchanged."""
    if prefix and not any(k.startswith(prefix) for k in tensors) and "conv1.weight" in tensors:
        prefix = ""  # the visual module's own state dict
    visual, stray = {}, []
    for key, value in tensors.items():
        if key.startswith(prefix):
            visual[key[len(prefix):]] = value
        elif not _CLIP_TEXT_TOWER_KEYS.search(key):
            stray.append(key)
    if stray:
        raise CheckpointMismatchError(
            f"{source}: keys that are neither under {prefix!r} (the image tower) nor CLIP text-tower keys: "
            f"{', '.join(sorted(stray)[:20])}"
        )
    if not visual:
        raise CheckpointMismatchError(f"{source} has no keys under {prefix!r}: not a CLIP image tower checkpoint")
    return visual


def load_clip_resnet(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: Any = None,
    prefix: str = "visual.",
    head_width: int = 64,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
):
    """An open_clip / OpenAI CLIP RN checkpoint (file or state dict) -> `clip_resnet.ModifiedResNet`.

    Args:
      source: a `.safetensors` file (a pickle only with `allow_pickle=True`), or a state dict of arrays.
      config: a `CLIPResNetConfig`, an open_clip model config dict (`RN101.json`), or None to infer the
        architecture from the tensor shapes.
      head_width: with `config=None`, the attention-pool head width (not stored in checkpoints): heads =
        width * 32 // head_width; 64 is what OpenAI CLIP and open_clip use for every RN model.
      prefix: where the image tower's keys live (`visual.` in full CLIP checkpoints).
    """
    from fusion_jax.models.clip_resnet import CLIPResNetConfig, ModifiedResNet

    tensors, name = _read_checkpoint(source, allow_pickle=allow_pickle)
    visual = clip_resnet_tensors(tensors, prefix=prefix, source=name)
    if config is None:
        try:
            config = CLIPResNetConfig.from_state_dict(visual, prefix="", head_width=head_width)
        except ValueError as e:
            raise CheckpointMismatchError(f"{name}: {e}") from e
    elif isinstance(config, Mapping):
        config = CLIPResNetConfig.from_open_clip(config)
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return weights.build_from_tensors(
        lambda: ModifiedResNet(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        visual, source=f"{name} (image-tower keys under {prefix!r}, named without it)" if prefix else name,
        ignore=(_BATCH_NORM_COUNTER,),
    )


# ----------------------------------------------------------------------------------------------------------
# CLIP vision transformer (ViT) for style images
# ----------------------------------------------------------------------------------------------------------

_CLIP_MODEL_TEXT_KEYS = re.compile(r"^(text_model\.|text_projection\.|logit_scale$|logit_bias$)")
_CLIP_MODEL_VISION_KEYS = ("vision_model.", "visual_projection.")


def load_clip_vision(
    path: str | os.PathLike,
    *,
    subfolder: str = "image_encoder",
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    variant: str | None = None,
):
    """A transformers CLIP folder -> our CLIP vision tower; `model(pixels, output_hidden_states=True)` gives
    `image_embeds` (projected) and `hidden_states[-2]` (the penultimate layer, IP-Adapter Plus' input).

    Accepts a vision tower (`CLIPVisionModel` / `CLIPVisionModelWithProjection`, e.g. an IP-Adapter repo's
    `image_encoder/`) or a full `CLIPModel` (e.g. openai/clip-vit-large-patch14): the latter gives a
    `CLIPVisionModelWithProjection` with the model's `visual_projection` (width: the top-level `projection_dim`),
    and its text tower's keys are dropped.
    """
    from fusion_jax.models import clip

    folder = weights.component_dir(path, subfolder)
    raw = weights.read_config(folder)
    is_full_model = "CLIPModel" in (raw.get("architectures") or ()) or raw.get("model_type") == "clip"
    if not is_full_model:
        return weights.load_vision_encoder(folder, dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle,
                                           variant=variant)
    try:
        config = clip.CLIPVisionConfig.from_dict(raw)
        projection_dim = raw.get("projection_dim", 512)
        config = dataclasses.replace(config, projection_dim=projection_dim)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    tensors = weights.read_component_tensors(folder, weights.TRANSFORMERS_WEIGHTS, variant=variant,
                                             allow_pickle=allow_pickle)
    vision = {k: v for k, v in tensors.items() if k.startswith(_CLIP_MODEL_VISION_KEYS)}
    stray = [k for k in tensors if k not in vision and not _CLIP_MODEL_TEXT_KEYS.search(k)
             and not k.endswith("position_ids")]
    if stray:
        raise CheckpointMismatchError(f"{folder}: CLIPModel keys that belong to neither tower: "
                                      f"{', '.join(sorted(stray)[:20])}")
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return weights.build_from_tensors(
        lambda: clip.CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        vision, source=str(folder), ignore=(r"(^|\.)position_ids$",),
    )


# ----------------------------------------------------------------------------------------------------------
# DALL-E 2 style prior (diffusers PriorTransformer) and its sampler
# ----------------------------------------------------------------------------------------------------------

# a non-persistent buffer of diffusers' PriorTransformer, present in checkpoints saved by old versions
_PRIOR_IGNORED = (r"^causal_attention_mask$",)


def load_prior(
    path: str | os.PathLike,
    *,
    subfolder: str = "prior",
    expected_embedding_dim: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    variant: str | None = None,
):
    """A diffusers PriorTransformer folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a pipeline
    folder / HF cache entry with it under `subfolder` -> `prior.PriorTransformer`.

    `expected_embedding_dim`: the CLIP embedding width the caller's encoders produce (ViT-L/14: 768); a prior of
    another width is an error naming the folder, rather than a shape error deep inside sampling.
    """
    from fusion_jax.models.prior import PriorConfig, PriorTransformer

    folder = weights.component_dir(path, subfolder)
    try:
        config = PriorConfig.from_dict(weights.read_config(folder))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    if expected_embedding_dim is not None:
        widths = {"embedding_dim": config.embedding_dim, "clip_embed_dim": config.output_dim,
                  "embedding_proj_dim": config.text_embed_dim}
        wrong = {k: v for k, v in widths.items() if v != expected_embedding_dim}
        if wrong:
            raise CheckpointError(f"prior {folder} works on CLIP embeddings of width {wrong} but "
                                  f"{expected_embedding_dim} was expected (a prior for another CLIP model?)")
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    tensors = weights.read_component_tensors(folder, weights.DIFFUSERS_WEIGHTS, variant=variant,
                                             allow_pickle=allow_pickle)
    return weights.build_from_tensors(
        lambda: PriorTransformer(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        tensors, source=str(folder), ignore=_PRIOR_IGNORED,
    )


def load_prior_sampler(path: str | os.PathLike, num_inference_steps: int = 25, *,
                       subfolders: tuple[str, ...] = ("prior_scheduler", "scheduler")):
    """The prior's `UnCLIPSampler` from `scheduler_config.json` in `path` itself or the first of `subfolders`
    that has one (Karlo: `prior_scheduler/`, Kandinsky's prior: `scheduler/`)."""
    from fusion_jax.schedulers.unclip import UnCLIPSampler

    root = weights.resolve_model_path(path)
    for candidate in (root, *(root / s for s in subfolders)):
        file = candidate / "scheduler_config.json"
        if file.is_file():
            with open(file) as f:
                config = json.load(f)
            try:
                return UnCLIPSampler.from_diffusers_config(config, num_inference_steps)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{file}: {e}") from e
    raise CheckpointError(f"no scheduler_config.json in {root} or its {', '.join(subfolders)} subfolders")
