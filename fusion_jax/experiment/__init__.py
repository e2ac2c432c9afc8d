"""The real model in the trainer: `ExperimentConfig` -> model factory, loss, batch iterator (and export).

    exp = build_experiment(config)          # validates first: errors name the config key, nothing compiled
    train(config, exp.model_factory, exp.loss_fn, exp.batch_iterator_factory, trainable=exp.trainable)

One module per job:
- `models`: `model` section -> a base SD pipeline folder (`model.pipeline`; 'tiny' = the project's tiny random
  pipeline, written once to a cache folder) or an inline random UNet preset (`model.unet_preset`); the identity
  method named by `objective.name` attaches its modules; `train.trainable` -> which params train ('all', a preset
  of the method such as Face Fusion's 'identity' / 'identity+lora', or a regex over param paths).
- `losses`: model inputs per `model.latents` (`vae` | `preencoded` | `pixel`) and the objective (`text_to_image`
  or the identity method's loss).
- `batches`: `data.source` (`synthetic` | `synthfaces` | `folder` | `preencoded`) -> host batch iterators.
- `restore`: a run's checkpoint back as a model (`restore_run`) and its export (`export_model`).
Nothing here names an identity method: they are reached through `fusion_jax.identity.base`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np
from flax import nnx

from fusion_jax import precision
from fusion_jax.config import ConfigError, ExperimentConfig
from fusion_jax.experiment.batches import (
    IMAGE_KEYS,
    PREENCODED_KEYS,
    DeviceBatches,
    SyntheticFaceBatches,
    check_batch_source,
    make_batch_iterator_factory,
)
from fusion_jax.experiment.losses import make_loss, text_to_image_loss
from fusion_jax.experiment.models import (
    DTYPES,
    PRESET_VAE_FACTOR,
    SD_VAE_SCALE,
    TEXT_TO_IMAGE,
    UNET_PRESETS,
    TrainModel,
    assign_identity_init,
    check_trainable,
    identity_init_arrays,
    identity_method,
    load_pipeline,
    pipeline_path,
    prepare_unet,
    trainable_selector,
)
from fusion_jax.experiment.restore import (
    IDENTITY_CONFIG,
    IDENTITY_DIR,
    IDENTITY_WEIGHTS,
    RestoredRun,
    export_face_fusion,
    export_model,
    load_face_fusion_unet,
    load_identity_modules,
    merged_base_state_dict,
    restore_run,
)
from fusion_jax.models.pixels import fold_factor
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from fusion_jax.schedulers import NoiseSchedule
from fusion_jax.tiny import tiny_pipeline_dir


def check_config(config: ExperimentConfig) -> None:
    """Every cross-section problem, as a ConfigError naming the keys; cheap (reads no weights)."""
    m, d, o = config.model, config.data, config.objective
    if m.unet_preset is not None:
        if m.unet_preset not in UNET_PRESETS:
            raise ConfigError(f"model.unet_preset={m.unet_preset!r}: expected one of {sorted(UNET_PRESETS)} or null")
        if m.latents != "preencoded" or d.source != "synthetic":
            raise ConfigError(f"model.unet_preset={m.unet_preset!r} has no VAE or text encoder: it needs "
                              f"model.latents=preencoded and data.source=synthetic (got {m.latents!r}, {d.source!r})")
    elif not m.pipeline:
        raise ConfigError("model.pipeline: set a pipeline folder / repo id, or 'tiny'")
    elif m.pipeline != "tiny" and not os.path.exists(m.pipeline) and "/" not in m.pipeline:
        raise ConfigError(f"model.pipeline={m.pipeline!r}: no such folder (and not a repo id)")
    if d.source == "preencoded" and m.latents != "preencoded":
        raise ConfigError(f"data.source=preencoded needs model.latents=preencoded, got {m.latents!r}")
    if m.latents == "preencoded" and d.source not in ("preencoded", "synthetic"):
        raise ConfigError(f"model.latents=preencoded needs data.source preencoded or synthetic, got {d.source!r}")
    if d.source in ("folder", "preencoded"):
        if not d.path:
            raise ConfigError(f"data.source={d.source}: set data.path to the dataset folder")
        if not os.path.isdir(d.path):
            raise ConfigError(f"data.path={d.path!r}: no such folder (data.source={d.source})")
    if not 0.0 <= o.text_dropout <= 1.0:
        raise ConfigError(f"objective.text_dropout={o.text_dropout}: must be in [0, 1]")
    method = identity_method(config)
    if method is not None and d.pipeline.num_references < 1:
        raise ConfigError(f"data.pipeline.num_references=0: objective.name={o.name!r} needs reference photos (>= 1)")
    check_trainable(config)
    check_batch_source(config, method)
    if m.identity_init:
        if method is None:
            raise ConfigError(f"model.identity_init={m.identity_init!r}: objective.name={o.name!r} attaches no "
                              "identity modules to initialise")
        if m.unet_preset is not None:
            raise ConfigError("model.identity_init needs model.pipeline (the export's base UNet), not unet_preset")
        if not os.path.exists(m.identity_init):
            raise ConfigError(f"model.identity_init={m.identity_init!r}: no such folder")
    if config.mesh and (d.pipeline.resolution <= 0 or d.pipeline.reference_size <= 0):
        raise ConfigError("data.pipeline.resolution / reference_size must be positive")


@dataclasses.dataclass
class Experiment:
    """The pieces `fusion_jax.training.train` takes, built from one config."""

    config: ExperimentConfig
    model_factory: Callable[[nnx.Rngs], TrainModel]
    loss_fn: Callable
    batch_iterator_factory: Callable[[ExperimentConfig], Any]
    trainable: Callable[[Any, Any], bool]
    unet_config: UNetConfig
    schedule: NoiseSchedule
    tokenizer: Any = None
    pretrained: Any = None  # loaded base weights (host arrays) for `model_factory(rngs, pretrained)`; None = none


def build_experiment(config: ExperimentConfig) -> Experiment:
    """Validates `config`, reads the base weights to host memory (no device work) and returns the factories."""
    check_config(config)
    m, d = config.model, config.data
    dtype, param_dtype = precision.compute_dtype(config.train.compute_dtype), DTYPES[config.train.param_dtype]
    method = identity_method(config)
    loaded = None
    if m.unet_preset is not None:
        unet_config = UNET_PRESETS[m.unet_preset]()
        schedule, tokenizer = NoiseSchedule(), None
        vae_factor, latent_scale = PRESET_VAE_FACTOR, (SD_VAE_SCALE, 0.0)
        text_dim = unet_config.cross_attention_dims()[0]
        empty_ids, empty_text = None, np.zeros((m.text_length, text_dim), np.float32)
    else:
        from fusion_jax import weights

        loaded = load_pipeline(config)
        vae_module = nnx.merge(*loaded.vae) if loaded.vae is not None else None
        unet_config = nnx.merge(*loaded.unet).config
        vae_config = vae_module.config if vae_module is not None else weights.load_vae(pipeline_path(config)).config
        vae_factor = vae_config.downscale_factor
        latent_scale = (float(vae_config.scaling_factor), float(vae_config.shift_factor or 0.0))
        schedule, tokenizer = loaded.schedule, loaded.tokenizer
        empty_ids = tokenizer([""])[0] if tokenizer is not None else None
        empty_text = None
        if d.source == "preencoded":
            from fusion_jax.data.preencoded import PreencodedSource

            empty_text = np.asarray(PreencodedSource(d.path).empty_text_embedding, np.float32)
            if empty_text.ndim == 3:
                empty_text = empty_text[0]
        elif m.latents == "preencoded":  # synthetic pre-encoded batches
            empty_text = np.zeros((m.text_length, unet_config.cross_attention_dims()[0]), np.float32)
    pixel_fold = 1
    if m.latents == "pixel":  # 3 channels, or 3 f^2 for pixels folded f x f (models/pixels.py)
        try:
            pixel_fold = fold_factor(unet_config.in_channels)
        except ValueError as err:
            raise ConfigError(f"model.latents=pixel: {err}") from None

    # The loaded weights travel as an argument of the trainer's init jit (`pretrained`), not as constants
    # captured by this closure: at Stable Diffusion size those would be gigabytes baked into the program.
    pretrained = None if loaded is None else {
        name: getattr(loaded, name)[1] for name in ("unet", "vae", "text_encoder") if getattr(loaded, name)}
    # model.identity_init: the export's modules travel the same way, keyed by their param path in the identity
    # model (strings: pytree keys must sort), placed after the method attaches its modules.
    identity_paths: dict[str, tuple] = {}
    if m.identity_init:
        arrays = identity_init_arrays(config, method, nnx.merge(*loaded.unet))
        identity_paths = {"/".join(map(str, p)): p for p in arrays}
        pretrained["identity"] = {key: arrays[p] for key, p in identity_paths.items()}

    def model_factory(rngs: nnx.Rngs, weights_in: Any = None) -> TrainModel:
        if loaded is None:
            unet = UNet2DConditionModel(unet_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            vae = text_encoder = None
        else:
            states = weights_in if weights_in is not None else pretrained

            def merged(name):
                return nnx.merge(getattr(loaded, name)[0], states[name]) if name in states else None

            unet, vae, text_encoder = merged("unet"), merged("vae"), merged("text_encoder")
        model = TrainModel(prepare_unet(unet, config, rngs), vae, text_encoder)
        if identity_paths:
            assign_identity_init(model.unet, {p: states["identity"][key] for key, p in identity_paths.items()},
                                 m.identity_init)
        return model

    loss_fn = make_loss(config, schedule=schedule, empty_ids=empty_ids, empty_text_emb=empty_text,
                        latent_scale=latent_scale, pixel_fold=pixel_fold)
    vocab = 1
    if loaded is not None and loaded.text_encoder is not None:
        vocab = nnx.merge(*loaded.text_encoder).config.vocab_size
    batch_iterator_factory = make_batch_iterator_factory(config, method, tokenizer=tokenizer, vae_factor=vae_factor,
                                                         unet_config=unet_config, vocab=vocab)
    return Experiment(config, model_factory, loss_fn, batch_iterator_factory, trainable_selector(config),
                      unet_config, schedule, tokenizer, pretrained)


def run(config: ExperimentConfig, workdir: Optional[str] = None):
    """Builds the experiment and trains it (`fusion_jax.training.train`); returns its TrainResult."""
    from fusion_jax.parallel import maybe_initialize_distributed
    from fusion_jax.training import train

    maybe_initialize_distributed(config.distributed)  # a multi-process run starts it before any device work
    exp = build_experiment(config)
    return train(config, exp.model_factory, exp.loss_fn, exp.batch_iterator_factory, workdir,
                 trainable=exp.trainable, pretrained=exp.pretrained)


__all__ = [
    "Experiment", "TrainModel", "UNET_PRESETS", "build_experiment", "check_config", "export_model",
    "export_face_fusion", "load_face_fusion_unet", "load_identity_modules", "make_loss", "restore_run",
    "RestoredRun", "run", "tiny_pipeline_dir", "trainable_selector", "identity_method", "text_to_image_loss",
    "IMAGE_KEYS", "PREENCODED_KEYS", "DeviceBatches", "SyntheticFaceBatches", "IDENTITY_DIR", "IDENTITY_CONFIG",
    "IDENTITY_WEIGHTS", "merged_base_state_dict", "TEXT_TO_IMAGE",
]
