"""The networks of an experiment: base pipeline loading, inline UNet presets, the identity method's modules, and
which parameters train.

The train model is `TrainModel(unet, vae, text_encoder)`, where `unet` is the identity model (the UNet with the
method's modules, or the method's wrapper around it; the plain UNet for text-to-image). The trainable selector
only ever picks params under `unet`, so the frozen VAE and text encoder get no gradients, optimizer state or EMA;
they are part of the train state's `frozen` collection and therefore written with every checkpoint (about 0.5 GB
in float32 for SD 1.5's VAE + CLIP-L, against 3.4 GB for its UNet): checkpoints stay self-contained (export and
resume need nothing but the workdir), at that cost. Use `model.latents: preencoded` to train without them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
import jax
from flax import nnx

from fusion_jax import precision
from fusion_jax.config import ConfigError, ExperimentConfig
from fusion_jax.identity import base as identity_base
from fusion_jax.models.unet import UNetConfig, set_attention_kernel, set_remat
from fusion_jax.schedulers import NoiseSchedule
from fusion_jax.tiny import tiny_pipeline_dir

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SD_VAE_SCALE = 0.18215  # SD 1.x latent scaling factor (presets have no VAE)
PRESET_VAE_FACTOR = 8  # presets stand for SD-shaped models: pixels / 8 = latent side
TEXT_TO_IMAGE = "text_to_image"  # objective.name of the plain denoising loss (no identity method)


def _sd15_unet() -> UNetConfig:
    return UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def _mid_unet() -> UNetConfig:
    return UNetConfig(
        sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=1, norm_num_groups=32,
        cross_attention_dim=256, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def _tiny_unet() -> UNetConfig:
    from fusion_jax.tiny import tiny_unet_config

    return tiny_unet_config(cross_attention_dim=32)


# Inline UNet presets (`model.unet_preset`): random init, no VAE / text encoder; for throughput runs.
UNET_PRESETS: dict[str, Callable[[], UNetConfig]] = {"tiny": _tiny_unet, "mid": _mid_unet, "sd15": _sd15_unet}


def identity_method(config: ExperimentConfig) -> Optional[identity_base.IdentityMethod]:
    """The objective's identity method, or None for text-to-image."""
    name = config.objective.name
    return None if name == TEXT_TO_IMAGE else identity_base.get(name, what="objective.name")


class TrainModel(nnx.Module):
    """What the train step sees: the identity model / UNet (trained) and the frozen encoders (None with a preset
    or pre-encoded latents)."""

    def __init__(self, unet: nnx.Module, vae: Optional[nnx.Module] = None, text_encoder: Optional[nnx.Module] = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder


@dataclasses.dataclass
class LoadedPipeline:
    """Host copies of a pipeline's components (graphdef + numpy state), merged anew for each trace."""

    unet: tuple
    vae: Optional[tuple]
    text_encoder: Optional[tuple]
    tokenizer: Any
    schedule: NoiseSchedule


def _host_split(module: nnx.Module) -> tuple:
    graphdef, state = nnx.split(module)
    return graphdef, jax.tree.map(np.asarray, state)


def pipeline_path(config: ExperimentConfig) -> str:
    m = config.model
    return str(tiny_pipeline_dir(m.tiny_cache_dir)) if m.pipeline == "tiny" else m.pipeline


def load_pipeline(config: ExperimentConfig) -> LoadedPipeline:
    """The base pipeline's UNet, VAE and (unless latents are pre-encoded) text encoder + tokenizer, on the host."""
    from fusion_jax import weights

    m = config.model
    path = pipeline_path(config)
    kw = dict(dtype=precision.compute_dtype(config.train.compute_dtype), param_dtype=DTYPES[config.train.param_dtype])
    unet = weights.load_unet(path, **kw)
    need_encoders = m.latents != "preencoded"
    vae = weights.load_vae(path, **kw)  # small; its config (scaling factor, downscale) is needed in every mode
    text_encoder = weights.load_text_encoder(path, **kw) if need_encoders else None
    tokenizer = None
    if need_encoders:
        from fusion_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(weights.resolve_model_path(path) / "tokenizer")
    return LoadedPipeline(_host_split(unet), _host_split(vae) if need_encoders else None,
                          _host_split(text_encoder) if text_encoder is not None else None, tokenizer,
                          weights.load_schedule(path))


def prepare_unet(unet: nnx.Module, config: ExperimentConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Attention kernel, remat, then the identity method's modules: returns the model the loss calls."""
    m = config.model
    set_attention_kernel(unet, m.attention_kernel, m.query_chunk_size)
    set_remat(unet, config.train.remat)  # the named jax.checkpoint policy on every resnet / transformer block
    method = identity_method(config)
    if method is None:
        return unet
    cfg = identity_base.method_config(config, method)
    model = method.attach(unet, cfg, trainable=config.train.trainable, rngs=rngs)
    return method.prepare_model(model, cfg)  # frozen encoders the config names by folder


def preset_owner(preset: str) -> Optional[identity_base.IdentityMethod]:
    """The registered method that defines `train.trainable` preset `preset`, if any."""
    for name in identity_base.names():
        method = identity_base.get(name)
        if preset in method.trainable_presets:
            return method
    return None


def check_trainable(config: ExperimentConfig) -> None:
    """A method preset in `train.trainable` must belong to the objective's method (ConfigError naming both)."""
    sel, method = config.train.trainable, identity_method(config)
    owner = preset_owner(sel)
    if sel == "all" or owner is None:
        return
    if method is None or sel not in method.trainable_presets:
        raise ConfigError(f"train.trainable={sel!r} selects {owner.display_name or owner.name} modules, but "
                          f"objective.name={config.objective.name!r} attaches none (use 'all', a regex, or one of "
                          f"{list(method.trainable_presets) if method else []})")


def trainable_selector(config: ExperimentConfig) -> Callable[[Any, Any], bool]:
    """`train.trainable` -> an nnx filter over `TrainModel` paths that only ever selects identity-model params:
    'all', a preset of the objective's method, or a regex over the param path."""
    from fusion_jax.training.state import trainable_filter as regex_filter

    sel, method = config.train.trainable, identity_method(config)
    if method is not None and sel in method.trainable_presets:
        inner = method.trainable_filter(sel, identity_base.method_config(config, method))
    else:
        inner = regex_filter(sel)
    if isinstance(inner, type):
        kind = inner
        inner = lambda path, value: isinstance(value, kind)  # noqa: E731

    def selected(path, value) -> bool:
        return len(path) > 1 and path[0] == "unet" and bool(inner(path[1:], value))

    return selected


def identity_init_arrays(config: ExperimentConfig, method: identity_base.IdentityMethod, base_unet: nnx.Module
                         ) -> dict[tuple, np.ndarray]:
    """`model.identity_init`: the export's trained modules as {param path in the identity model: host array}.

    The method's own loader (`load_tensors`, which knows its file's names) attaches and fills them on
    `base_unet` (a host copy of the base UNet, consumed); the params it added are the ones returned. The train
    model's factory places them after `prepare_unet` (`assign_identity_init`), inside the init jit.
    """
    from fusion_jax import weights
    from fusion_jax.identity import export as identity_export

    path = config.model.identity_init
    try:
        meta = identity_export.read_identity_config(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.identity_init={path!r}: {err}") from None
    if meta["method"] != method.name:
        raise ConfigError(f"model.identity_init={path!r} is an export of identity method {meta['method']!r}, but "
                          f"objective.name={config.objective.name!r} trains {method.name!r}")
    cfg = identity_export.config_from_dict(method, meta["config"])
    file = os.path.join(meta["folder"], meta["weights"])
    base_ids = {id(var) for _, var in nnx.to_flat_state(nnx.state(base_unet, nnx.Param))}
    loaded = method.load_tensors(base_unet, cfg, weights.read_tensors(file), file)
    return {tuple(p): np.asarray(var.get_value()) for p, var in nnx.to_flat_state(nnx.state(loaded, nnx.Param))
            if id(var) not in base_ids}


def assign_identity_init(model: nnx.Module, arrays: dict[tuple, Any], source: str) -> None:
    """Places `identity_init_arrays` output in the identity model `model` (in place), checking every path and
    shape: the run's method config must build the same modules as the export's (ConfigError naming `source`)."""
    ours = {tuple(p): var for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing = [p for p in arrays if p not in ours]
    wrong = [f"{'/'.join(map(str, p))}: export {np.shape(a)} vs model {tuple(ours[p].get_value().shape)}"
             for p, a in arrays.items() if p in ours and tuple(np.shape(a)) != tuple(ours[p].get_value().shape)]
    if missing or wrong:
        shown = ["/".join(map(str, p)) for p in missing[:5]] + wrong[:5]
        raise ConfigError(f"model.identity_init={source!r}: the export's modules do not match the ones this run's "
                          f"config attaches ({len(missing)} not in the model, {len(wrong)} of another shape: "
                          f"{shown})")
    for p, array in arrays.items():
        dtype = ours[p].get_value().dtype
        # the trainer first builds the model from ShapeDtypeStructs (its abstract state), then under the init jit
        ours[p].set_value(jax.ShapeDtypeStruct(array.shape, dtype) if isinstance(array, jax.ShapeDtypeStruct)
                          else jnp.asarray(array, dtype=dtype))
