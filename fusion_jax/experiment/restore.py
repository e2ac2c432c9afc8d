"""A training run back as a model (`restore_run`), and its export in the identity format of
`fusion_jax.identity.export` (`export_model`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from flax import nnx

from fusion_jax.config import ConfigError, ExperimentConfig
from fusion_jax.identity import base as identity_base
from fusion_jax.identity import export as identity_export
from fusion_jax.identity.export import IDENTITY_CONFIG, IDENTITY_DIR, merged_base_state_dict

# Older names, kept for callers of the Face Fusion-only export: the weights file of a Face Fusion export.
IDENTITY_WEIGHTS = identity_export.weights_file("face_fusion")


@dataclasses.dataclass
class RestoredRun:
    """A training run's model as of one checkpoint (see `restore_run`)."""

    model: Any  # TrainModel: params (or EMA params) of the checkpoint merged into the model
    config: ExperimentConfig  # the run's resolved config (WORKDIR/config.yaml)
    step: int  # the checkpoint's step
    used_ema: bool  # True when the EMA params were asked for and the run kept an EMA


def restore_run(workdir: str, step: Optional[int] = None, use_ema: bool = False) -> RestoredRun:
    """Restores WORKDIR's checkpoint (newest, or `step`) onto the local devices, whatever mesh wrote it."""
    from fusion_jax.config import MeshConfig, load_config
    from fusion_jax.experiment import build_experiment
    from fusion_jax.parallel import make_mesh
    from fusion_jax.training import Checkpointer, Trainer

    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{workdir}: no config.yaml (not a training run directory)")
    config = load_config(config_path)
    exp = build_experiment(config)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    trainer = Trainer(exp.model_factory, exp.loss_fn, config.train, mesh, trainable=exp.trainable,
                      pretrained=exp.pretrained)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                dataclasses.replace(config.checkpoint, async_save=False))
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir}/checkpoints: no checkpoint")
        state, _, _ = checkpointer.restore(trainer.abstract_state_for(mesh), step)
    finally:
        checkpointer.close()
    return RestoredRun(trainer.model(state, use_ema=use_ema), config, int(step),
                       bool(use_ema and state.ema is not None))


def export_model(model: nnx.Module, cfg: Any, out: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Writes OUT/unet and, when `cfg` is an identity method's config, that method's identity/ files (the method
    is the one whose config type `cfg` is; None = a base model)."""
    method = identity_base.for_config(cfg) if cfg is not None else None
    return identity_export.export_identity(model, method, cfg, out, extra)


def export_run(run: RestoredRun, out: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Export a restored run: the objective's method (if any) with its config section."""
    from fusion_jax.experiment.models import identity_method

    method = identity_method(run.config)
    cfg = identity_base.method_config(run.config, method) if method is not None else None
    return identity_export.export_identity(run.model.unet, method, cfg, out, extra)


# Older names (Face Fusion was the only method): same behaviour, any method.
export_face_fusion = export_model


def load_face_fusion_unet(export_dir: str | os.PathLike, **kwargs) -> nnx.Module:
    """An exported model -> our identity model (the UNet with its method's modules, if the export has any)."""
    return identity_export.load_identity_model(export_dir, **kwargs)[0]


def load_identity_modules(unet: nnx.Module, folder: str | os.PathLike):
    """Attaches an export's identity modules to `unet` (in place) and fills them; returns the method config."""
    return identity_export.load_identity_tensors(unet, folder)[2]
