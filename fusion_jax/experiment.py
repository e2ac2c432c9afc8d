"""The real model in the trainer: `ExperimentConfig` -> model factory, loss, batch iterator (and export).

    exp = build_experiment(config)          # validates first: errors name the config key, nothing compiled
    train(config, exp.model_factory, exp.loss_fn, exp.batch_iterator_factory, trainable=exp.trainable)

What is built from which section:
- `model`: a base SD pipeline folder (`model.pipeline`; 'tiny' = the project's tiny random pipeline, written once
  to a cache folder) loaded with `fusion_jax.weights`, or an inline randomly initialised UNet preset
  (`model.unet_preset`: 'tiny' | 'mid' | 'sd15', no VAE / text encoder, for throughput runs).
  `model.latents` says where the UNet's inputs come from: `vae` (target and reference images encoded by the
  frozen VAE inside the train step), `preencoded` (pre-encoded VAE moments from the batch, sampled in the step)
  or `pixel` (the UNet denoises pixels; it must have 3 input channels).
- `objective`: `face_fusion` = `identity.fusion.fusion_loss` with the `fusion` section (identity projections are
  attached to the UNet by the model factory); `text_to_image` = the plain denoising loss with text dropout.
- `data`: `synthetic` (random tensors of the right shapes), `synthfaces`, `folder` (a built face_identities
  dataset at `data.path`) or `preencoded` (a train/preencode.py folder at `data.path`).
- `train.trainable`: 'identity' | 'identity+lora' (LoRA adapters of rank `fusion.lora_rank` are attached then)
  | 'all' | a regex over UNet param paths ('up_blocks\\.3\\..*to_[kv]_ref').

Frozen encoders. The train model is `TrainModel(unet, vae, text_encoder)`; the trainable selector only ever picks
UNet params, so the VAE and text encoder get no gradients, no optimizer state and no EMA. They are part of the
train state's `frozen` collection and therefore written with every checkpoint (about 0.5 GB in float32 for SD 1.5's
VAE + CLIP-L, against 3.4 GB for its UNet): checkpoints stay self-contained (export and resume need nothing but the
workdir), at that cost. Use `model.latents: preencoded` to train without them at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.config import ConfigError, ExperimentConfig
from fusion_jax.identity import fusion as fusion_lib
from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig, set_attention_kernel, set_remat
from fusion_jax.schedulers import NoiseSchedule, add_noise, training_target
from fusion_jax.tiny import tiny_pipeline_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SD_VAE_SCALE = 0.18215  # SD 1.x latent scaling factor (presets have no VAE)
PRESET_VAE_FACTOR = 8  # presets stand for SD-shaped models: pixels / 8 = latent side


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


# ----------------------------------------------------------------------------------------------------------------
# Validation (before anything is loaded or compiled)
# ----------------------------------------------------------------------------------------------------------------


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
    sel = config.train.trainable
    if sel in fusion_lib.TRAINABLE and sel != "all" and o.name != "face_fusion":
        raise ConfigError(f"train.trainable={sel!r} selects Face Fusion modules, but objective.name={o.name!r} "
                          "attaches none (use 'all' or a regex)")
    if config.mesh and (d.pipeline.resolution <= 0 or d.pipeline.reference_size <= 0):
        raise ConfigError("data.pipeline.resolution / reference_size must be positive")


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class TrainModel(nnx.Module):
    """What the train step sees: the UNet (trained) and the frozen encoders (None with a preset / pre-encoded)."""

    def __init__(self, unet: nnx.Module, vae: Optional[nnx.Module] = None, text_encoder: Optional[nnx.Module] = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder


@dataclasses.dataclass
class _Loaded:
    """Host copies of a pipeline's components (graphdef + numpy state), merged anew for each trace."""

    unet: tuple
    vae: Optional[tuple]
    text_encoder: Optional[tuple]
    tokenizer: Any
    schedule: NoiseSchedule


def _host_split(module: nnx.Module) -> tuple:
    graphdef, state = nnx.split(module)
    return graphdef, jax.tree.map(np.asarray, state)


def _load_pipeline(config: ExperimentConfig) -> _Loaded:
    from fusion_jax import weights

    m = config.model
    path = tiny_pipeline_dir(m.tiny_cache_dir) if m.pipeline == "tiny" else m.pipeline
    dtype, param_dtype = DTYPES[config.train.compute_dtype], DTYPES[config.train.param_dtype]
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    unet = weights.load_unet(path, **kw)
    need_encoders = m.latents != "preencoded"
    vae = weights.load_vae(path, **kw)  # small; its config (scaling factor, downscale) is needed in every mode
    text_encoder = weights.load_text_encoder(path, **kw) if need_encoders else None
    tokenizer = None
    if need_encoders:
        from fusion_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(weights.resolve_model_path(path) / "tokenizer")
    return _Loaded(_host_split(unet), _host_split(vae) if need_encoders else None,
                   _host_split(text_encoder) if text_encoder is not None else None, tokenizer,
                   weights.load_schedule(path))


def _prepare_unet(unet: nnx.Module, config: ExperimentConfig, rngs: nnx.Rngs) -> nnx.Module:
    m = config.model
    set_attention_kernel(unet, m.attention_kernel, m.query_chunk_size)
    set_remat(unet, config.train.remat != "none")
    if config.objective.name == "face_fusion":
        fusion_lib.attach_identity_projections(unet, config.fusion, rngs=rngs)
        if config.train.trainable == "identity+lora":
            fusion_lib.attach_lora(unet, config.fusion.lora_rank, rngs=rngs)
    return unet


def trainable_selector(config: ExperimentConfig) -> Callable[[Any, Any], bool]:
    """`train.trainable` -> an nnx filter over `TrainModel` paths that only ever selects UNet params."""
    from fusion_jax.training.state import trainable_filter as regex_filter

    sel = config.train.trainable
    inner = fusion_lib.trainable_filter(sel) if sel in fusion_lib.TRAINABLE else regex_filter(sel)
    if isinstance(inner, type):
        kind = inner
        inner = lambda path, value: isinstance(value, kind)  # noqa: E731

    def selected(path, value) -> bool:
        return len(path) > 1 and path[0] == "unet" and bool(inner(path[1:], value))

    return selected


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------


def _latents_from_moments(mean, logvar, key, scale, shift):
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - shift) * scale


def _encode_images(vae, images: jax.Array, key: jax.Array) -> jax.Array:
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    z = vae.latents_from_images(flat, key)
    return z.reshape(lead + z.shape[1:])


def make_loss(config: ExperimentConfig, *, schedule: NoiseSchedule, empty_ids: Optional[np.ndarray],
              empty_text_emb: Optional[np.ndarray], latent_scale: tuple[float, float]):
    """`loss_fn(model, batch, rng) -> (loss, aux)`: inputs from the frozen encoders (or the batch), then the
    objective. Encoder outputs are under `stop_gradient`."""
    mode, objective, fcfg = config.model.latents, config.objective, config.fusion
    scale, shift = latent_scale

    def inputs(model: TrainModel, batch, rng):
        k_x, k_ref = jax.random.split(rng)
        if mode == "preencoded":
            x0 = _latents_from_moments(batch["latent_mean"], batch["latent_logvar"], k_x, scale, shift)
            refs = _latents_from_moments(batch["reference_latent_mean"], batch["reference_latent_logvar"], k_ref,
                                         scale, shift)
            text = batch["text_embedding"]
            empty = jnp.asarray(empty_text_emb)[None]
        else:
            if mode == "vae":
                x0 = _encode_images(model.vae, batch["target"], k_x)
                refs = _encode_images(model.vae, batch["references"], k_ref)
            else:  # pixel
                x0, refs = batch["target"], batch["references"]
            text = model.text_encoder(batch["input_ids"]).last_hidden_state
            empty = model.text_encoder(jnp.asarray(empty_ids)[None]).last_hidden_state
        return jax.tree.map(jax.lax.stop_gradient, (x0, refs, text, empty))

    def loss_fn(model: TrainModel, batch, rng):
        k_in, k_obj = jax.random.split(rng)
        x0, refs, text, empty = inputs(model, batch, k_in)
        dtype = model.unet.dtype
        x0, refs, text, empty = (a.astype(dtype) for a in (x0, refs, text, empty))
        if objective.name == "face_fusion":
            fbatch = {"latents": x0, "text_emb": text, "empty_text_emb": empty, "reference_latents": refs}
            return fusion_lib.fusion_loss(model.unet, fbatch, k_obj, schedule, fcfg)
        k_t, k_noise, k_text = jax.random.split(k_obj, 3)
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
        drop = jax.random.bernoulli(k_text, objective.text_dropout, (b,))
        ehs = jnp.where(drop[:, None, None], jnp.broadcast_to(empty, text.shape), text)
        pred = model.unet(add_noise(schedule, x0, noise, t), t, ehs).astype(jnp.float32)
        target = training_target(schedule, x0, noise, t).astype(jnp.float32)
        return jnp.mean((pred - target) ** 2), {"text_dropped": jnp.mean(drop.astype(jnp.float32))}

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


class SyntheticFaceBatches:
    """`data.source: synthetic` for the real model: deterministic random batches with the fields the loss reads
    (images in [-1, 1] and token ids, or pre-encoded moments and text embeddings). Batch i depends only on
    (seed, i); the state is one int."""

    def __init__(self, float_spec: dict, int_spec: dict, batch_size: int, seed: int):
        if batch_size % jax.process_count():
            raise ConfigError(f"data.batch_size={batch_size} must be a multiple of {jax.process_count()} processes")
        self.float_spec, self.int_spec = float_spec, int_spec  # name -> (shape, low, high)
        self.batch_size, self.seed, self.index = batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng((self.seed, self.index))
        b = self.batch_size
        out = {k: rng.uniform(lo, hi, (b,) + s).astype(np.float32) for k, (s, lo, hi) in self.float_spec.items()}
        out.update({k: rng.integers(lo, hi, (b,) + s).astype(np.int32) for k, (s, lo, hi) in self.int_spec.items()})
        self.index += 1
        rows = b // jax.process_count()
        lo = jax.process_index() * rows
        return {k: v[lo:lo + rows] for k, v in out.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state) -> None:
        self.index = int(state["index"]) if state else 0


class DeviceBatches:
    """Wraps a tf.data stream: keeps only the fields the loss reads (no strings / int64 bookkeeping)."""

    def __init__(self, stream, keys: tuple[str, ...]):
        self.stream, self.keys = stream, keys

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.stream)
        return {k: batch[k] for k in self.keys}

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state) -> None:
        self.stream.set_state(state)


IMAGE_KEYS = ("target", "references", "input_ids")
PREENCODED_KEYS = ("latent_mean", "latent_logvar", "reference_latent_mean", "reference_latent_logvar",
                   "text_embedding")


# ----------------------------------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------------------------------


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
    dtype, param_dtype = DTYPES[config.train.compute_dtype], DTYPES[config.train.param_dtype]
    loaded = None
    if m.unet_preset is not None:
        unet_config = UNET_PRESETS[m.unet_preset]()
        schedule, tokenizer = NoiseSchedule(), None
        vae_factor, latent_scale = PRESET_VAE_FACTOR, (SD_VAE_SCALE, 0.0)
        text_dim = unet_config.cross_attention_dims()[0]
        empty_ids, empty_text = None, np.zeros((m.text_length, text_dim), np.float32)
    else:
        loaded = _load_pipeline(config)
        vae_module = nnx.merge(*loaded.vae) if loaded.vae is not None else None
        unet_config = nnx.merge(*loaded.unet).config
        from fusion_jax import weights

        path = tiny_pipeline_dir(m.tiny_cache_dir) if m.pipeline == "tiny" else m.pipeline
        vae_config = vae_module.config if vae_module is not None else weights.load_vae(path).config
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
    if m.latents == "pixel" and unet_config.in_channels != 3:
        raise ConfigError(f"model.latents=pixel needs a UNet with 3 input channels, this one has "
                          f"{unet_config.in_channels}")

    # The loaded weights travel as an argument of the trainer's init jit (`pretrained`), not as constants
    # captured by this closure: at Stable Diffusion size those would be gigabytes baked into the program.
    pretrained = None if loaded is None else {
        name: getattr(loaded, name)[1] for name in ("unet", "vae", "text_encoder") if getattr(loaded, name)}

    def model_factory(rngs: nnx.Rngs, weights_in: Any = None) -> TrainModel:
        if loaded is None:
            unet = UNet2DConditionModel(unet_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            vae = text_encoder = None
        else:
            states = weights_in if weights_in is not None else pretrained

            def merged(name):
                return nnx.merge(getattr(loaded, name)[0], states[name]) if name in states else None

            unet, vae, text_encoder = merged("unet"), merged("vae"), merged("text_encoder")
        return TrainModel(_prepare_unet(unet, config, rngs), vae, text_encoder)

    loss_fn = make_loss(config, schedule=schedule, empty_ids=empty_ids, empty_text_emb=empty_text,
                        latent_scale=latent_scale)

    p = d.pipeline
    text_len = tokenizer.max_length if tokenizer is not None else m.text_length
    vocab = 1
    if loaded is not None and loaded.text_encoder is not None:
        vocab = nnx.merge(*loaded.text_encoder).config.vocab_size

    def batch_iterator_factory(cfg: ExperimentConfig):
        per_host = cfg.data.batch_size // jax.process_count()
        n, r, s = p.num_references, p.resolution, p.reference_size
        if cfg.data.source == "synthetic":
            if m.latents == "preencoded":
                h, hr, c = r // vae_factor, s // vae_factor, unet_config.in_channels
                td = unet_config.cross_attention_dims()[0]
                floats = {"latent_mean": ((h, h, c), -1.0, 1.0), "latent_logvar": ((h, h, c), -8.0, -6.0),
                          "reference_latent_mean": ((n, hr, hr, c), -1.0, 1.0),
                          "reference_latent_logvar": ((n, hr, hr, c), -8.0, -6.0),
                          "text_embedding": ((text_len, td), -1.0, 1.0)}
                ints = {}
            else:
                floats = {"target": ((r, r, 3), -1.0, 1.0), "references": ((n, s, s, 3), -1.0, 1.0)}
                ints = {"input_ids": ((text_len,), 0, vocab)}
            return SyntheticFaceBatches(floats, ints, cfg.data.batch_size, cfg.data.seed)
        if cfg.data.source == "preencoded":
            from fusion_jax.data.preencoded import PreencodedConfig, make_preencoded_pipeline

            pc = PreencodedConfig(num_references=n, p_drop_text=0.0, p_drop_reference=0.0, seed=cfg.data.seed,
                                  batch_size=per_host, num_parallel_calls=p.num_parallel_calls, prefetch=p.prefetch)
            return DeviceBatches(make_preencoded_pipeline(cfg.data.path, pc), PREENCODED_KEYS)
        from fusion_jax.data.pipeline import make_pipeline

        if cfg.data.source == "synthfaces":
            from fusion_jax.data.synthfaces import SynthFaces

            source = SynthFaces(cfg.data.synthfaces, split="train")
        else:  # folder
            from fusion_jax.data.face_identities import FaceIdentitiesSource

            source = FaceIdentitiesSource(cfg.data.path)
        pc = dataclasses.replace(p, batch_size=per_host, seed=cfg.data.seed, p_drop_text=0.0, p_drop_reference=0.0,
                                 process_index=None, process_count=None, tokenize=tokenizer)
        return DeviceBatches(make_pipeline(source, pc), IMAGE_KEYS)

    return Experiment(config, model_factory, loss_fn, batch_iterator_factory, trainable_selector(config),
                      unet_config, schedule, tokenizer, pretrained)


@dataclasses.dataclass
class RestoredRun:
    """A training run's model as of one checkpoint (see `restore_run`)."""

    model: TrainModel  # params (or EMA params) of the checkpoint merged into the model
    config: ExperimentConfig  # the run's resolved config (WORKDIR/config.yaml)
    step: int  # the checkpoint's step
    used_ema: bool  # True when the EMA params were asked for and the run kept an EMA


def restore_run(workdir: str, step: Optional[int] = None, use_ema: bool = False) -> RestoredRun:
    """Restores WORKDIR's checkpoint (newest, or `step`) onto the local devices, whatever mesh wrote it."""
    from fusion_jax.config import MeshConfig, load_config
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


def run(config: ExperimentConfig, workdir: Optional[str] = None):
    """Builds the experiment and trains it (`fusion_jax.training.train`); returns its TrainResult."""
    from fusion_jax.training import train

    exp = build_experiment(config)
    return train(config, exp.model_factory, exp.loss_fn, exp.batch_iterator_factory, workdir,
                 trainable=exp.trainable, pretrained=exp.pretrained)


# ----------------------------------------------------------------------------------------------------------------
# Export: diffusers UNet + identity modules
# ----------------------------------------------------------------------------------------------------------------

IDENTITY_DIR = "identity"
IDENTITY_WEIGHTS = "identity_modules.safetensors"
IDENTITY_CONFIG = "identity_config.json"
IDENTITY_FORMAT = "fusion_jax.face_fusion.identity_modules/1"
_LORA_A = re.compile(r"\.lora\.lora_a$")


def merged_base_state_dict(unet: nnx.Module) -> dict[str, np.ndarray]:
    """The base UNet's torch-style state dict, LoRA adapters merged into their kernels (W + A B)."""
    from fusion_jax import weights

    sd = weights.state_dict(unet)
    base = nnx.eval_shape(lambda: UNet2DConditionModel(unet.config, rngs=nnx.Rngs(0)))
    base_keys = set(weights.torch_keys(base))
    for key in [k for k in sd if _LORA_A.search(k)]:
        prefix = key[: -len("lora.lora_a")]
        delta = sd[key].astype(np.float32) @ sd[prefix + "lora.lora_b"].astype(np.float32)  # (in, out)
        weight = sd[prefix + "weight"]
        sd[prefix + "weight"] = (weight.astype(np.float32) + delta.T).astype(weight.dtype)
    return {k: v for k, v in sd.items() if k in base_keys}


def export_face_fusion(unet: nnx.Module, fusion_cfg: Optional[fusion_lib.FusionConfig], out: str | os.PathLike,
                       extra: Optional[dict] = None) -> Path:
    """Writes OUT/unet (diffusers UNet2DConditionModel folder; LoRA merged) and, when the UNet has identity
    modules, OUT/identity/{identity_modules.safetensors, identity_config.json}."""
    from fusion_jax import weights

    out = Path(out)
    weights.write_component(out / "unet", weights._diffusers_config(unet.config, "UNet2DConditionModel"),
                            merged_base_state_dict(unet), weights.DIFFUSERS_WEIGHTS + ".safetensors")
    identity = {k: v for k, v in weights.state_dict(unet).items() if fusion_lib._IDENTITY_PARAM.search(k)}
    if identity:
        from safetensors.numpy import save_file

        folder = out / IDENTITY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        layers = sorted({k.split(".attn2.")[0] for k in identity}, key=lambda n: list(unet.transformer_blocks()).index(n))
        meta = {"format": IDENTITY_FORMAT, "fusion": dataclasses.asdict(fusion_cfg) if fusion_cfg else None,
                "layers": layers, "keys": sorted(identity), "unet_config": unet.config.to_dict(), **(extra or {})}
        tmp = folder / (IDENTITY_WEIGHTS + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in identity.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / IDENTITY_WEIGHTS)
        with open(folder / IDENTITY_CONFIG, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return out


def load_identity_modules(unet: nnx.Module, folder: str | os.PathLike) -> fusion_lib.FusionConfig:
    """Attaches Face Fusion identity projections to `unet` (in place) and fills them from an export's
    `identity/` folder (or its parent). Returns the FusionConfig they were trained with."""
    from fusion_jax import weights
    from fusion_jax.weights import read_tensors

    folder = Path(folder)
    if (folder / IDENTITY_DIR / IDENTITY_CONFIG).is_file():
        folder = folder / IDENTITY_DIR
    with open(folder / IDENTITY_CONFIG) as f:
        meta = json.load(f)
    if meta.get("format") != IDENTITY_FORMAT:
        raise ValueError(f"{folder / IDENTITY_CONFIG}: format {meta.get('format')!r}, expected {IDENTITY_FORMAT!r}")
    raw = dict(meta["fusion"] or {})
    if "blocks" in raw:
        raw["blocks"] = tuple(raw["blocks"])
    cfg = fusion_lib.FusionConfig(**raw)
    fusion_lib.attach_identity_projections(unet, cfg)
    tensors = read_tensors(folder / IDENTITY_WEIGHTS)
    weights.load_state_dict(unet, tensors, allow_missing=(r".*",), source=str(folder / IDENTITY_WEIGHTS))
    missing = set(fusion_lib.fusion_state_dict_keys(unet)) - set(tensors)
    if missing:
        raise ValueError(f"{folder}: identity modules missing from the file: {sorted(missing)[:5]}")
    return cfg


def load_face_fusion_unet(export_dir: str | os.PathLike, **kwargs) -> nnx.Module:
    """An exported model (OUT of `export_face_fusion`) -> our UNet with its identity modules attached."""
    from fusion_jax import weights

    unet = weights.load_unet(Path(export_dir) / "unet", subfolder="", **kwargs) if (
        Path(export_dir) / "unet" / "config.json").is_file() else weights.load_unet(export_dir, **kwargs)
    if (Path(export_dir) / IDENTITY_DIR / IDENTITY_CONFIG).is_file():
        load_identity_modules(unet, export_dir)
    return unet


__all__ = [
    "Experiment", "TrainModel", "UNET_PRESETS", "build_experiment", "check_config", "export_face_fusion",
    "load_face_fusion_unet", "load_identity_modules", "make_loss", "restore_run", "RestoredRun", "run", "tiny_pipeline_dir", "trainable_selector",
]
