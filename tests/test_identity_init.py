"""model.identity_init: a run starts from an exported identity model (its UNet as model.pipeline, its modules
from the export), so training can continue from a shipped model. Checked on the tiny Face Fusion export: the
trainer's freshly initialised state holds the export's tensors bit for bit, the new LoRA adapters add nothing
(their B factor is zero), so the train model computes what the loaded export computes; bad inputs name the key."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax import weights
from fusion_jax.config import ConfigError
from fusion_jax.experiment import IDENTITY_DIR, IDENTITY_WEIGHTS, build_experiment, load_face_fusion_unet, tiny_pipeline_dir
from fusion_jax.parallel import single_device_mesh
from fusion_jax.training import Trainer
from tests.test_export import exported  # noqa: F401  (the module fixture: tiny run + its export)
from tests.train_helpers import tiny_config


def _continuation(tmp_path, run, out, *overrides):
    """tiny.yaml continuing from the export: the tiny pipeline with the export's UNet, modules from the export."""
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir(run["cache"]), pipeline, ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(os.path.join(out, "unet"), pipeline / "unet")
    return tiny_config(f"model.pipeline={pipeline}", f"model.identity_init={out}", f"workdir={tmp_path / 'run'}",
                       "train.trainable=identity+lora", *overrides)


def _params(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_initial_state_is_the_export(exported, tmp_path):  # noqa: F811
    run, out = exported
    exp = build_experiment(_continuation(tmp_path, run, out))
    trainer = Trainer(exp.model_factory, exp.loss_fn, exp.config.train, single_device_mesh(),
                      trainable=exp.trainable, pretrained=exp.pretrained)
    state = jax.device_get(trainer.init())  # the init jit: the export's tensors arrive as its arguments
    params = {**_params(state.params), **_params(state.frozen)}
    reference = {f"unet/{k}": v for k, v in _params(nnx.state(load_face_fusion_unet(out), nnx.Param)).items()}
    saved = weights.read_tensors(os.path.join(out, IDENTITY_DIR, IDENTITY_WEIGHTS))
    identity = [k for k in reference if "_ref/" in k]
    assert len(identity) == len(saved) > 0  # every exported tensor is one param of the train model
    for key, value in reference.items():  # base UNet (LoRA merged at export) and identity modules, bit for bit
        np.testing.assert_array_equal(params[key], value, err_msg=key, strict=True)
    trainable = _params(state.params)
    lora_b = [k for k in trainable if k.endswith("lora_b")]
    assert lora_b and all(not trainable[k].any() for k in lora_b)  # fresh adapters: W + A B = W at step 0
    assert any(k in trainable for k in identity)  # and the identity projections train on


def test_errors_name_the_key(exported, tmp_path):  # noqa: F811
    run, out = exported
    with pytest.raises(ConfigError, match="model.identity_init.*no such folder"):
        build_experiment(_continuation(tmp_path, run, out, f"model.identity_init={tmp_path / 'missing'}"))
    with pytest.raises(ConfigError, match=r"model.identity_init.*no identity/identity_config.json"):
        build_experiment(_continuation(tmp_path / "a", run, out, f"model.identity_init={tmp_path}"))
    with pytest.raises(ConfigError, match="attaches no identity modules"):
        build_experiment(_continuation(tmp_path / "b", run, out, "objective.name=text_to_image",
                                       "train.trainable=all"))
    # a run whose config attaches other modules than the export's: the paths are named, nothing is half-loaded
    with pytest.raises(ConfigError, match="do not match the ones this run's config attaches"):
        exp = build_experiment(_continuation(tmp_path / "c", run, out, "fusion.blocks=[mid]"))
        exp.model_factory(nnx.Rngs(0))
