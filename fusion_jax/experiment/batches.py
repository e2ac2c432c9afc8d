"""Batch streams of an experiment (`data.source`): synthetic tensors, synthfaces, a built face dataset folder,
or a pre-encoded folder; only the fields the loss reads reach the device."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from fusion_jax.config import ConfigError, ExperimentConfig

# Fields of the image stream (`data.pipeline.make_pipeline`) every objective reads; identity methods add theirs.
IMAGE_KEYS = ("target", "input_ids")
REFERENCE_IMAGE_KEYS = ("references",)
PREENCODED_KEYS = ("latent_mean", "latent_logvar", "text_embedding")
REFERENCE_PREENCODED_KEYS = ("reference_latent_mean", "reference_latent_logvar")


def stream_keys(base: tuple[str, ...], reference: tuple[str, ...], method) -> tuple[str, ...]:
    """The stream fields an objective reads: the base fields, plus the references and the method's own fields."""
    return base if method is None else base + reference + tuple(method.batch_keys)


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
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise KeyError(f"the batch stream has no field(s) {missing} (has {sorted(batch)})")
        return {k: batch[k] for k in self.keys}

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state) -> None:
        self.stream.set_state(state)


def synthetic_spec(config: ExperimentConfig, method, *, vae_factor: int, unet_config, text_len: int, vocab: int,
                   latents: str) -> tuple[dict, dict]:
    """(float fields, int fields) of synthetic batches: the shapes the real stream would give."""
    p = config.data.pipeline
    n, r, s = p.num_references, p.resolution, p.reference_size
    if latents == "preencoded":
        h, hr, c = r // vae_factor, s // vae_factor, unet_config.out_channels
        td = unet_config.cross_attention_dims()[0]
        floats = {"latent_mean": ((h, h, c), -1.0, 1.0), "latent_logvar": ((h, h, c), -8.0, -6.0),
                  "text_embedding": ((text_len, td), -1.0, 1.0)}
        if method is not None:
            floats.update({"reference_latent_mean": ((n, hr, hr, c), -1.0, 1.0),
                           "reference_latent_logvar": ((n, hr, hr, c), -8.0, -6.0)})
        ints = {}
    else:
        floats = {"target": ((r, r, 3), -1.0, 1.0)}
        if method is not None:
            floats["references"] = ((n, s, s, 3), -1.0, 1.0)
        ints = {"input_ids": ((text_len,), 0, vocab)}
    # the image stream's per-example fields a method may ask for (`data.pipeline` output signature)
    stream_fields = {"face_mask": ((r, r, 1), 0.0, 1.0), "masked_target": ((r, r, 3), -1.0, 1.0),
                     "face_embedding": ((512,), -0.1, 0.1)}
    for key in (method.batch_keys if method is not None else ()):
        if key not in stream_fields:
            raise ConfigError(f"data.source=synthetic cannot make the field {key!r} that objective.name="
                              f"{config.objective.name!r} reads (it makes {sorted(stream_fields)})")
        floats[key] = stream_fields[key]
    return floats, ints


def make_batch_iterator_factory(config: ExperimentConfig, method, *, tokenizer, vae_factor: int, unet_config,
                                vocab: int):
    """`factory(cfg) -> iterator` of host batches for `train(...)` (re-created on resume with the same config)."""
    m, p = config.model, config.data.pipeline
    text_len = tokenizer.max_length if tokenizer is not None else m.text_length

    def factory(cfg: ExperimentConfig):
        per_host = cfg.data.batch_size // jax.process_count()
        if cfg.data.source == "synthetic":
            floats, ints = synthetic_spec(cfg, method, vae_factor=vae_factor, unet_config=unet_config,
                                          text_len=text_len, vocab=vocab, latents=m.latents)
            return SyntheticFaceBatches(floats, ints, cfg.data.batch_size, cfg.data.seed)
        if cfg.data.source == "preencoded":
            from fusion_jax.data.preencoded import PreencodedConfig, make_preencoded_pipeline

            pc = PreencodedConfig(num_references=p.num_references, vary_references=p.vary_references,
                                  p_drop_text=0.0, p_drop_reference=0.0,
                                  seed=cfg.data.seed, batch_size=per_host, num_parallel_calls=p.num_parallel_calls,
                                  prefetch=p.prefetch)
            keys = stream_keys(PREENCODED_KEYS, REFERENCE_PREENCODED_KEYS, method)
            return DeviceBatches(make_preencoded_pipeline(cfg.data.path, pc), keys)
        from fusion_jax.data.pipeline import make_pipeline

        if cfg.data.source == "synthfaces":
            from fusion_jax.data.synthfaces import SynthFaces

            source = SynthFaces(cfg.data.synthfaces, split="train")
        else:  # folder
            from fusion_jax.data.face_identities import FaceIdentitiesSource

            source = FaceIdentitiesSource(cfg.data.path)
        pc = dataclasses.replace(p, batch_size=per_host, seed=cfg.data.seed, p_drop_text=0.0, p_drop_reference=0.0,
                                 process_index=None, process_count=None, tokenize=tokenizer)
        return DeviceBatches(make_pipeline(source, pc), stream_keys(IMAGE_KEYS, REFERENCE_IMAGE_KEYS, method))

    return factory


def check_batch_source(config: ExperimentConfig, method: Optional[Any]) -> None:
    """Pre-encoded data has no per-example image fields: a method that reads some cannot train on it."""
    if method is not None and method.batch_keys and config.model.latents == "preencoded" \
            and config.data.source == "preencoded":
        raise ConfigError(f"objective.name={config.objective.name!r} reads {list(method.batch_keys)} from the image "
                          "stream; data.source=preencoded has none (use data.source folder / synthfaces)")
