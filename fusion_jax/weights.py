"""Load standard diffusers / transformers checkpoints into our NNX modules, and export them back.

Convention that makes one generic converter enough: our modules mirror the PyTorch module tree exactly
(same attribute names, `nnx.List` with the same indices), so checkpoint key `a.b.0.c.weight` names our
parameter `('a', 'b', 0, 'c', <leaf>)`. Leaves differ only in name and layout:

    torch                          ours
    Linear.weight (out, in)        kernel (in, out)
    Conv2d.weight (O, I, kh, kw)   kernel (kh, kw, I, O)
    {Group,Layer}Norm.weight       scale
    Embedding.weight               embedding
    *.bias                         bias
    nn.Parameter `name`            nnx.Param `name` (same layout)

Every checkpoint key is either mapped or reported: missing keys, unexpected keys and shape mismatches raise
`CheckpointMismatchError` naming the keys and the file. Pickled checkpoints (`.bin`, `.ckpt`, `.pt`) are
refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

@dataclasses.dataclass
class Pipeline:
    """The components of a Stable Diffusion pipeline, as `load_pipeline` returns them."""

    unet: nnx.Module  # UNet2DConditionModel
    vae: nnx.Module  # AutoencoderKL
    text_encoder: nnx.Module  # CLIPTextModel
    tokenizer: Any  # host-side tokenizer: list[str] -> int32 (B, L)
    schedule: Any  # fusion_jax.schedulers.NoiseSchedule from scheduler_config.json
    text_encoder_2: Optional[nnx.Module] = None  # SDXL: CLIPTextModelWithProjection (penultimate states + pooled)
    tokenizer_2: Any = None  # SDXL: the second encoder's tokenizer
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zero embeddings (model_index)

    @property
    def two_text_encoders(self) -> bool:
        """SDXL layout: prompts go through both encoders (`sampling.tokenize` gives (B, 2, L) ids)."""
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_MAX_KEYS_IN_MESSAGE = 20


class CheckpointError(ValueError):
    """A checkpoint could not be found, read or trusted."""


class CheckpointMismatchError(CheckpointError):
    """Checkpoint keys or shapes do not match the module built from its config."""


# ----------------------------------------------------------------------------------------------------------
# Key and layout conversion
# ----------------------------------------------------------------------------------------------------------


def _key_to_path(key: str) -> tuple[str | int, ...]:
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def _path_to_key(path: Iterable[Any]) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _param_variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """Our parameters by path; the Variables alias the model's, so setting them updates it in place."""
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_to_ours(tensor: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    """Convert one torch-layout tensor to the layout of our leaf `leaf` of shape `target_shape`."""
    if leaf == "kernel":
        if tensor.ndim == 4 and len(target_shape) == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
            return np.transpose(tensor, (2, 3, 1, 0))
        if tensor.ndim == 4 and len(target_shape) == 2 and tensor.shape[2:] == (1, 1):  # 1x1 conv as Linear
            return tensor[:, :, 0, 0].T
        if tensor.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):  # Linear as 1x1 conv
            return tensor.T[None, None]
        if tensor.ndim == 2:  # Linear (out, in) -> (in, out)
            return tensor.T
    return tensor


def _ours_to_torch(array: np.ndarray, leaf: str) -> tuple[str, np.ndarray]:
    """Convert one of our leaves to its torch name and layout."""
    if leaf == "kernel":
        if array.ndim == 4:
            return "weight", np.transpose(array, (3, 2, 0, 1))
        return "weight", array.T
    if leaf in ("scale", "embedding"):
        return "weight", array
    return leaf, array


def _match(key: str, ours: Mapping[tuple, nnx.Variable]) -> tuple[tuple, str] | None:
    """Find our parameter for checkpoint key `key`; returns (our path, our leaf name)."""
    path = _key_to_path(key)
    if path in ours:  # raw nn.Parameter with the same name (e.g. CLIP's class_embedding)
        return path, str(path[-1])
    prefix, leaf = path[:-1], path[-1]
    candidates = {"bias": ("bias",), "weight": ("kernel", "scale", "embedding")}.get(str(leaf), ())
    for name in candidates:
        if prefix + (name,) in ours:
            return prefix + (name,), name
    return None


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def load_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    *,
    ignore: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    source: str = "checkpoint",
) -> nnx.Module:
    """Copy a torch-named state dict into `model` (in place; also works on an `nnx.eval_shape` model).

    Args:
      model: our module; its parameters decide each tensor's target layout and dtype.
      tensors: checkpoint key -> array, in PyTorch names and layouts.
      ignore: regexes of checkpoint keys to drop silently (e.g. buffers such as `position_ids`).
      allow_missing: regexes of our parameter keys (torch-style names) that may stay as initialised
        (e.g. identity projections that a base checkpoint does not have). Abstract ones are an error.
      source: the file or folder named in error messages.
    Raises:
      CheckpointMismatchError naming every missing, unexpected or mis-shaped key.
    """
    ours = _param_variables(model)
    ignore_res = [re.compile(p) for p in ignore]
    allow_missing_res = [re.compile(p) for p in allow_missing]
    assigned: set[tuple] = set()
    unexpected, mismatched = [], []
    for key, tensor in tensors.items():
        if any(r.search(key) for r in ignore_res):
            continue
        found = _match(key, ours)
        if found is None:
            unexpected.append(key)
            continue
        path, leaf = found
        var = ours[path]
        target = var.get_value()
        array = _torch_to_ours(np.asarray(tensor), leaf, tuple(target.shape))
        if tuple(array.shape) != tuple(target.shape):
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(tensor))} vs model {tuple(target.shape)}")
            continue
        var.set_value(jnp.asarray(array, dtype=target.dtype))
        assigned.add(path)
    missing = []
    for path, var in ours.items():
        if path in assigned:
            continue
        torch_key = _torch_key(path)
        if any(r.search(torch_key) for r in allow_missing_res) and not isinstance(
            var.get_value(), jax.ShapeDtypeStruct
        ):
            continue
        missing.append(torch_key)
    problems = []
    if missing:
        problems.append(f"missing keys (the model has them, the checkpoint does not): {_describe(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected keys (not in the model): {_describe(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {_describe(mismatched)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))
    return model


def _torch_key(path: tuple) -> str:
    name, _ = _ours_to_torch(np.zeros((1,) * (4 if path[-1] == "kernel" else 1)), str(path[-1]))
    return _path_to_key(path[:-1] + (name,))


def torch_keys(model: nnx.Module) -> list[str]:
    """The checkpoint key of every parameter of `model` (works on abstract models too)."""
    return [_torch_key(path) for path in _param_variables(model)]


def state_dict(model: nnx.Module, *, include: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Our parameters as a torch-named, torch-layout state dict (NumPy arrays, model dtype)."""
    out = {}
    for path, var in _param_variables(model).items():
        name, array = _ours_to_torch(np.asarray(var.get_value()), str(path[-1]))
        key = _path_to_key(path[:-1] + (name,))
        if include is None or include(key):
            out[key] = np.ascontiguousarray(array)
    return out


# ----------------------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    return home / "hub"


def _snapshot_of_cache_repo(repo_dir: Path, revision: str = "main") -> Path:
    ref = repo_dir / "refs" / revision
    snapshots = repo_dir / "snapshots"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if (snapshots / revision).is_dir():  # a commit hash given as revision
        return snapshots / revision
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    if not found:
        raise CheckpointError(f"{repo_dir} is a Hugging Face cache entry without any snapshot")
    return found[-1]


def resolve_model_path(path: str | os.PathLike, revision: str = "main") -> Path:
    """Turn a local folder, a Hugging Face cache entry folder, or a repo id found in the local cache into a
    folder. Never downloads."""
    p = Path(path).expanduser()
    if p.exists():
        if p.name.startswith("models--") and (p / "snapshots").is_dir():
            return _snapshot_of_cache_repo(p, revision)
        return p
    text = str(path)
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
        repo_dir = hf_cache_dir() / ("models--" + text.replace("/", "--"))
        if repo_dir.is_dir():
            return _snapshot_of_cache_repo(repo_dir, revision)
        raise CheckpointError(
            f"{text!r} is not a local path and is not in the Hugging Face cache ({repo_dir}); "
            "nothing is downloaded: pass a local folder or populate the cache first"
        )
    raise CheckpointError(f"model path {text!r} does not exist")


def component_dir(path: str | os.PathLike, subfolder: str) -> Path:
    """The folder of one component: `path` itself if it holds a config.json, else `path/subfolder`."""
    root = resolve_model_path(path)
    if root.is_file():
        raise CheckpointError(f"{root} is a file; expected a model folder (single files: see load_single_file)")
    if (root / "config.json").is_file():
        return root
    if (root / subfolder / "config.json").is_file():
        return root / subfolder
    raise CheckpointError(f"no config.json in {root} or {root / subfolder}")


def read_config(folder: Path) -> dict:
    with open(folder / "config.json") as f:
        return json.load(f)


def read_tensors(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read one weights file into NumPy arrays. Safetensors always; pickles only with `allow_pickle=True`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"refusing to unpickle {path}: pickled checkpoints can run arbitrary code. Convert it to "
                "safetensors, or pass allow_pickle=True if you trust the file."
            )
        import torch  # optional dependency, only for trusted pickles

        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in obj.items()}
    raise CheckpointError(f"unknown weights file type {path} (expected .safetensors)")


def find_weights(folder: Path, stem: str, *, variant: str | None = None, allow_pickle: bool = False) -> list[Path]:
    """The weight files of one component: single or sharded safetensors (with optional variant), else a pickle
    (refused unless allowed)."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}{suffix}.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / n for n in names]
    for ext in PICKLE_SUFFIXES:
        pickled = folder / f"{stem}{suffix}{ext}"
        if pickled.is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{folder} has only a pickled checkpoint ({pickled.name}); refusing to unpickle it. Convert "
                    "it to safetensors, or pass allow_pickle=True if you trust the file."
                )
            return [pickled]
    raise CheckpointError(f"no weights named {stem}{suffix}.safetensors in {folder}")


def read_component_tensors(
    folder: Path, stem: str, *, variant: str | None = None, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in find_weights(folder, stem, variant=variant, allow_pickle=allow_pickle):
        tensors.update(read_tensors(file, allow_pickle=allow_pickle))
    return tensors


def build_from_tensors(
    make_model: Callable[[], nnx.Module],
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    ignore: Iterable[str] = (),
) -> nnx.Module:
    """Build a module shape-only (no random init) and fill every parameter from `tensors`."""
    model = nnx.eval_shape(make_model)
    load_state_dict(model, tensors, ignore=ignore, source=source)
    leftover = [
        _path_to_key(path)
        for path, var in nnx.to_flat_state(nnx.state(model))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if leftover:
        raise CheckpointMismatchError(f"{source}: model state not filled from the checkpoint: {_describe(leftover)}")
    return model


def write_component(folder: str | os.PathLike, config: dict, tensors: Mapping[str, np.ndarray], weights_name: str):
    """Write `config.json` and one safetensors file: the diffusers / transformers folder layout."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tmp = folder / (weights_name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / weights_name)  # never leave a half-written weights file under the real name



# ----------------------------------------------------------------------------------------------------------
# Components: UNet, VAE, text encoder, pipeline
# ----------------------------------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
_TEXT_ENCODER_IGNORED = (r"(^|\.)position_ids$",)  # a buffer that older transformers checkpoints saved


def _dtypes(dtype, param_dtype):
    dtype = jnp.dtype(dtype)
    return dtype, jnp.dtype(param_dtype) if param_dtype is not None else dtype


def _load_component(folder: Path, config, model_cls, stem: str, *, dtype, param_dtype, allow_pickle, variant,
                    ignore=(), rename: Callable[[dict], dict] | None = None):
    """Read a component's weights, optionally rename legacy key layouts, and build the module from them."""
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    tensors = read_component_tensors(folder, stem, variant=variant, allow_pickle=allow_pickle)
    if rename is not None:
        tensors = rename(tensors)
    return build_from_tensors(
        lambda: model_cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        tensors,
        source=str(folder),
        ignore=ignore,
    )


def load_unet(path, *, dtype=jnp.float32, param_dtype=None, subfolder: str = "unet", allow_pickle: bool = False,
              variant: str | None = None):
    """A diffusers UNet2DConditionModel folder (or pipeline folder / HF cache entry) -> our UNet."""
    from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig

    folder = component_dir(path, subfolder)
    config = UNetConfig.from_dict(read_config(folder))
    return _load_component(folder, config, UNet2DConditionModel, DIFFUSERS_WEIGHTS, dtype=dtype,
                           param_dtype=param_dtype, allow_pickle=allow_pickle, variant=variant)


def load_vae(path, *, dtype=jnp.float32, param_dtype=None, subfolder: str = "vae", allow_pickle: bool = False,
             variant: str | None = None):
    """A diffusers AutoencoderKL folder (or pipeline folder / HF cache entry) -> our VAE."""
    from fusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, rename_legacy_vae_keys

    folder = component_dir(path, subfolder)
    config = AutoencoderKLConfig.from_dict(read_config(folder))
    return _load_component(folder, config, AutoencoderKL, DIFFUSERS_WEIGHTS, dtype=dtype, param_dtype=param_dtype,
                           allow_pickle=allow_pickle, variant=variant, rename=rename_legacy_vae_keys)


def _load_clip_tower(path, subfolder, tower: str, *, dtype, param_dtype, allow_pickle, variant):
    """A transformers CLIP text or vision tower folder -> our module (with projection if `architectures` says so).

    transformers 5 saves a plain CLIPTextModel / CLIPVisionModel without the `text_model.` / `vision_model.`
    level; Stable Diffusion checkpoints keep it. Both load.
    """
    from fusion_jax.models import clip

    text = tower == "text_model"
    folder = component_dir(path, subfolder)
    raw = read_config(folder)
    config = (clip.CLIPTextConfig if text else clip.CLIPVisionConfig).from_dict(raw)
    with_projection = any("WithProjection" in a for a in raw.get("architectures") or ())
    classes = {(True, False): clip.CLIPTextModel, (True, True): clip.CLIPTextModelWithProjection,
               (False, False): clip.CLIPVisionModel, (False, True): clip.CLIPVisionModelWithProjection}
    return _load_component(folder, config, classes[text, with_projection], TRANSFORMERS_WEIGHTS, dtype=dtype,
                           param_dtype=param_dtype, allow_pickle=allow_pickle, variant=variant,
                           ignore=_TEXT_ENCODER_IGNORED, rename=lambda t: clip.add_tower_prefix(t, tower))


def load_text_encoder(path, *, dtype=jnp.float32, param_dtype=None, subfolder: str = "text_encoder",
                      allow_pickle: bool = False, variant: str | None = None):
    """A transformers CLIPTextModel(WithProjection) folder -> our text encoder (class from `architectures`)."""
    return _load_clip_tower(path, subfolder, "text_model", dtype=dtype, param_dtype=param_dtype,
                            allow_pickle=allow_pickle, variant=variant)


def load_vision_encoder(path, *, dtype=jnp.float32, param_dtype=None, subfolder: str = "image_encoder",
                        allow_pickle: bool = False, variant: str | None = None):
    """A transformers CLIPVisionModel(WithProjection) folder -> our vision tower (FaceStudio's style encoder)."""
    return _load_clip_tower(path, subfolder, "vision_model", dtype=dtype, param_dtype=param_dtype,
                            allow_pickle=allow_pickle, variant=variant)


def load_schedule(path, subfolder: str = "scheduler"):
    """The training noise schedule from `scheduler/scheduler_config.json` (SD 1.x defaults when absent)."""
    from fusion_jax import schedulers

    root = resolve_model_path(path)
    file = root / subfolder / "scheduler_config.json"
    if not file.is_file():
        return schedulers.NoiseSchedule()
    with open(file) as f:
        return schedulers.NoiseSchedule.from_diffusers_config(json.load(f))


def load_pipeline(path, *, dtype=jnp.float32, param_dtype=None, allow_pickle: bool = False,
                  variant: str | None = None) -> Pipeline:
    """A diffusers Stable Diffusion pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL:
    also text_encoder_2/, tokenizer_2/, and model_index.json's force_zeros_for_empty_prompt, default True as in
    diffusers' StableDiffusionXLPipeline)."""
    from fusion_jax.tokenizer import load_tokenizer

    root = resolve_model_path(path)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle, variant=variant)
    second = (root / "text_encoder_2" / "config.json").is_file()
    index = {}
    if (root / "model_index.json").is_file():
        with open(root / "model_index.json") as f:
            index = json.load(f)
    return Pipeline(
        unet=load_unet(root, **kwargs),
        vae=load_vae(root, **kwargs),
        text_encoder=load_text_encoder(root, **kwargs),
        tokenizer=load_tokenizer(root / "tokenizer"),
        schedule=load_schedule(root),
        text_encoder_2=load_text_encoder(root, subfolder="text_encoder_2", **kwargs) if second else None,
        tokenizer_2=load_tokenizer(root, subfolder="tokenizer_2") if second else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", second)),
    )


def _diffusers_config(config, class_name: str) -> dict:
    import importlib.metadata

    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "0.42.0"
    return {"_class_name": class_name, "_diffusers_version": version, **config.to_dict()}


def save_unet(model, path) -> Path:
    """Write a diffusers-format UNet folder (config.json + diffusion_pytorch_model.safetensors) that diffusers'
    `UNet2DConditionModel.from_pretrained` loads.

    Only the parameters of the base UNet are written (found by building an abstract base UNet from the same
    config): identity modules attached on top are not part of diffusers' format and are exported separately.
    """
    from fusion_jax.models.unet import UNet2DConditionModel

    base = nnx.eval_shape(lambda: UNet2DConditionModel(model.config, rngs=nnx.Rngs(0)))
    base_keys = set(torch_keys(base))
    write_component(path, _diffusers_config(model.config, "UNet2DConditionModel"),
                    state_dict(model, include=base_keys.__contains__), DIFFUSERS_WEIGHTS + ".safetensors")
    return Path(path)


def save_vae(model, path) -> Path:
    write_component(path, _diffusers_config(model.config, "AutoencoderKL"), state_dict(model),
                    DIFFUSERS_WEIGHTS + ".safetensors")
    return Path(path)


def save_text_encoder(model, path) -> Path:
    from fusion_jax.models import clip

    arch = "CLIPTextModelWithProjection" if isinstance(model, clip.CLIPTextModelWithProjection) else "CLIPTextModel"
    config = {"architectures": [arch], "model_type": "clip_text_model", **model.config.to_dict()}
    write_component(path, config, state_dict(model), TRANSFORMERS_WEIGHTS + ".safetensors")
    return Path(path)


def save_vision_encoder(model, path) -> Path:
    """Write a transformers CLIPVisionModel(WithProjection) folder (config.json + model.safetensors) that
    `CLIPVisionModelWithProjection.from_pretrained` and `load_vision_encoder` read (the miniature's style tower)."""
    from fusion_jax.models import clip

    arch = "CLIPVisionModelWithProjection" if isinstance(model, clip.CLIPVisionModelWithProjection) \
        else "CLIPVisionModel"
    config = {"architectures": [arch], **model.config.to_dict()}
    write_component(path, config, state_dict(model), TRANSFORMERS_WEIGHTS + ".safetensors")
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Single-file (WebUI / original LDM layout) checkpoints
# ----------------------------------------------------------------------------------------------------------


def load_unet_single_file(file, *, config, dtype=jnp.float32, param_dtype=None, allow_pickle: bool = False):
    """A single-file Stable Diffusion checkpoint (original LDM key layout, as WebUI tools save it) -> our UNet.

    The key renaming is diffusers' own converter (`convert_ldm_unet_checkpoint`, PyTorch); `config` is a local
    diffusers pipeline folder, UNet folder or HF cache entry that supplies the UNet's config.json (nothing is
    downloaded, so it must be given).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig

    file = Path(file)
    raw_config = read_config(component_dir(config, "unet"))
    checkpoint = _read_torch_tensors(file, allow_pickle=allow_pickle)
    converted = convert_ldm_unet_checkpoint(checkpoint, raw_config)
    tensors = {k: v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy() for k, v in converted.items()}
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    config_obj = UNetConfig.from_dict(raw_config)
    return build_from_tensors(
        lambda: UNet2DConditionModel(config_obj, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        tensors,
        source=str(file),
    )


def _read_torch_tensors(file: Path, *, allow_pickle: bool):
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e
    import torch

    arrays = read_tensors(file, allow_pickle=allow_pickle)  # refuses pickles unless allowed
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
