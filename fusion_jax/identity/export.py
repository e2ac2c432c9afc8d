"""Exported identity models, one format for every method.

    OUT/unet/                          the base UNet as a diffusers UNet2DConditionModel folder (LoRA merged)
    OUT/identity/<method>.safetensors  the method's own trained tensors (torch-style names)
    OUT/identity/identity_config.json  {"format", "method", "config" (its section), "keys", "unet_config", ...}

`export_identity` writes it from an identity model; `load_identity_model` reads it back onto our UNet through
the method named in the JSON (or a given one). Exports of the first Face Fusion format
(`identity_modules.safetensors`, key "fusion") are still read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flax import nnx

from fusion_jax.identity import base

IDENTITY_DIR = "identity"
IDENTITY_CONFIG = "identity_config.json"
IDENTITY_FORMAT = "fusion_jax.identity/2"
_LEGACY_FORMAT = "fusion_jax.face_fusion.identity_modules/1"  # Face Fusion exports before the method interface
_LEGACY_WEIGHTS = "identity_modules.safetensors"
_LORA_A = re.compile(r"\.lora\.lora_a$")


def weights_file(method_name: str) -> str:
    """File name of a method's tensors inside OUT/identity/."""
    return f"{method_name}.safetensors"


def merged_base_state_dict(unet: nnx.Module) -> dict[str, np.ndarray]:
    """The base UNet's torch-style state dict, LoRA adapters merged into their kernels (W + A B)."""
    from fusion_jax import weights
    from fusion_jax.models.unet import UNet2DConditionModel

    sd = weights.state_dict(unet)
    base_model = nnx.eval_shape(lambda: UNet2DConditionModel(unet.config, rngs=nnx.Rngs(0)))
    base_keys = set(weights.torch_keys(base_model))
    for key in [k for k in sd if _LORA_A.search(k)]:
        prefix = key[: -len("lora.lora_a")]
        delta = sd[key].astype(np.float32) @ sd[prefix + "lora.lora_b"].astype(np.float32)  # (in, out)
        weight = sd[prefix + "weight"]
        sd[prefix + "weight"] = (weight.astype(np.float32) + delta.T).astype(weight.dtype)
    return {k: v for k, v in sd.items() if k in base_keys}


def config_dict(cfg: Any) -> Optional[dict]:
    """A method config as JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg))) if cfg is not None else None


def config_from_dict(method: base.IdentityMethod, raw: Optional[dict]):
    """The method's config from `config_dict` output (lists back to tuples where the field is a tuple)."""
    from fusion_jax.config import from_dict

    return from_dict(method.config_class, dict(raw or {}), f"{IDENTITY_CONFIG}: config")


def export_identity(model: nnx.Module, method: Optional[base.IdentityMethod], cfg: Any, out: str | os.PathLike,
                    extra: Optional[dict] = None) -> Path:
    """Writes OUT/unet (the base UNet, LoRA merged) and, with a method, OUT/identity/{<method>.safetensors,
    identity_config.json}. Files are written to temporary names and renamed, so a killed export leaves no
    half-written file under the final name."""
    from safetensors.numpy import save_file

    from fusion_jax import weights

    out = Path(out)
    unet = method.base_unet(model) if method is not None else model
    weights.write_component(out / "unet", weights._diffusers_config(unet.config, "UNet2DConditionModel"),
                            merged_base_state_dict(unet), weights.DIFFUSERS_WEIGHTS + ".safetensors")
    if method is None:
        return out
    tensors = method.export_tensors(model, cfg)
    folder = out / IDENTITY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": IDENTITY_FORMAT, "method": method.name, "config": config_dict(cfg), "keys": sorted(tensors),
            "unet_config": unet.config.to_dict(), **(extra or {})}
    tmp = folder / (weights_file(method.name) + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / weights_file(method.name))
    tmp_meta = folder / (IDENTITY_CONFIG + ".tmp")
    with open(tmp_meta, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp_meta, folder / IDENTITY_CONFIG)
    return out


def identity_folder(path: str | os.PathLike) -> Optional[Path]:
    """OUT/identity for an export folder OUT or OUT/identity itself; None when neither holds identity_config.json."""
    path = Path(path)
    for folder in (path / IDENTITY_DIR, path):
        if (folder / IDENTITY_CONFIG).is_file():
            return folder
    return None


def read_identity_config(path: str | os.PathLike) -> dict:
    """The export's identity_config.json, normalised to the current format ({"method", "config", ...})."""
    folder = identity_folder(path)
    if folder is None:
        raise ValueError(f"{path}: no {IDENTITY_DIR}/{IDENTITY_CONFIG} (expected a folder written by train/export.py)")
    with open(folder / IDENTITY_CONFIG) as f:
        meta = json.load(f)
    fmt = meta.get("format")
    if fmt == _LEGACY_FORMAT:
        meta = {**meta, "method": "face_fusion", "config": meta.get("fusion"), "weights": _LEGACY_WEIGHTS}
    elif fmt != IDENTITY_FORMAT:
        raise ValueError(f"{folder / IDENTITY_CONFIG}: format {fmt!r}, expected {IDENTITY_FORMAT!r}")
    meta.setdefault("weights", weights_file(meta.get("method", "")))
    meta["folder"] = str(folder)
    return meta


def load_identity_tensors(unet: nnx.Module, path: str | os.PathLike, method: Optional[base.IdentityMethod] = None
                          ) -> tuple[nnx.Module, base.IdentityMethod, Any]:
    """Attaches the exported method's modules to `unet` and fills them; returns (model, method, cfg). With
    `method`, the export must be of that method."""
    from fusion_jax.weights import read_tensors

    meta = read_identity_config(path)
    exported = base.get(meta["method"], what=f"{meta['folder']}/{IDENTITY_CONFIG}: method")
    if method is not None and method.name != exported.name:
        raise ValueError(f"{meta['folder']}: an export of identity method {exported.name!r}, not {method.name!r}")
    cfg = config_from_dict(exported, meta["config"])
    file = Path(meta["folder"]) / meta["weights"]
    model = exported.load_tensors(unet, cfg, read_tensors(file), str(file))
    return model, exported, cfg


def load_identity_model(export_dir: str | os.PathLike, method: Optional[base.IdentityMethod] = None, **kwargs):
    """An exported model -> (identity model, method, cfg): OUT/unet loaded as our UNet, then its identity modules
    (method None when the export has no identity/ folder). `kwargs` go to `weights.load_unet` (dtype...)."""
    from fusion_jax import weights

    export_dir = Path(export_dir)
    unet = (weights.load_unet(export_dir / "unet", subfolder="", **kwargs)
            if (export_dir / "unet" / "config.json").is_file() else weights.load_unet(export_dir, **kwargs))
    if identity_folder(export_dir) is None:
        return unet, None, None
    return load_identity_tensors(unet, export_dir, method)


__all__ = ["IDENTITY_DIR", "IDENTITY_CONFIG", "IDENTITY_FORMAT", "weights_file", "merged_base_state_dict",
           "export_identity", "identity_folder", "read_identity_config", "load_identity_tensors",
           "load_identity_model", "config_dict", "config_from_dict"]
