"""The identity-method interface: one class per method, a registry by name.

An identity method turns reference photos of a person into something a Stable Diffusion UNet consumes. The
shared layers (the sampler, the trainer's experiment builder, the CLI, export) call only this interface, never a
method by name; a method is one module that subclasses `IdentityMethod` and calls `register(...)`:

    @register
    class FaceFusion(IdentityMethod):
        name = "face_fusion"            # registry key; objective.name in configs, --method on the CLI
        section = "fusion"              # its config section (top-level YAML key, `fusion.combine=...` overrides)
        config_class = FusionConfig     # typed dataclass of that section
        trainable_presets = ("identity", "identity+lora")   # train.trainable names it defines ('all' and regexes
                                                            # are generic)
        ...

What a method owns (each a method below):
- model: `attach` gives a base UNet the method's new modules and returns the *identity model* the loss and the
  sampler call (the UNet itself for cross-attention methods; a wrapper holding a second network for FlashFace);
  `base_unet` returns the UNet inside it; `trainable_filter` maps its presets to parameter filters.
- training: `loss(model, batch, rng, schedule, cfg)` on the generic batch (`TrainBatch` keys below) plus the
  image-stream fields it names in `batch_keys`.
- sampling: `sampling_inputs` (host side: validate the user's strengths / boxes and turn them into arrays for
  the jitted sampler; the sampler itself checks and adds 'references', 'reference_valid' and 'empty_ids'), `encode_references` (once per image, before the denoising loop: whatever can
  be cached across steps) and `guided_prediction` (the guided noise prediction of one step).
- export: `export_tensors` / `load_tensors` (one format for all methods: `identity/<name>.safetensors` plus
  `identity_config.json` naming the method; written and read by `fusion_jax.identity.export`).

Generic training batch (`loss`'s `batch`), all arrays in the UNet's compute dtype:
  'latents' (B, H, W, C) target latents; 'text_emb' (B, L, D) caption embeddings; 'empty_text_emb' (1 or B, L, D);
  'reference_latents' (B, N, h, w, C) latents of N reference photos of the target's person; plus every key of
  `batch_keys` as the stream gives it (e.g. 'face_mask' (B, R, R, 1) at pixel resolution).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import jax
import numpy as np

ParamFilter = Callable[[tuple, Any], bool]


@dataclasses.dataclass(frozen=True)
class ReferenceRequest:
    """What a caller asks the sampler for, before validation (host arrays; see `sampling.generate`)."""

    references: Any  # (B, N, H, W, 3) or (B, K, N, H, W, 3) aligned crops in [-1, 1]
    reference_valid: Any = None  # (B, K, N) bool, False for padding references; None = all valid
    strength: Any = None  # identity strength: scalar / (K,) / (B, K); None = the method config's default
    boxes: Any = None  # (B, K, 4) pixel (x0, y0, x1, y1) of each person's region / face in the generated image
    # (B, K, N, D) ArcFace embeddings of the reference faces (the CLI fills them when the face detector has a
    # recognition model); None = not available (methods that need them say so, or read their own config)
    face_embeddings: Any = None
    # (B, K, H, W) bool instance masks of each person's region in the generated image (an alternative to boxes
    # for the methods with region masks; `identity.fusion.region_masks_from_pixels`)
    masks: Any = None
    # (B, H, W, 3) style images in [-1, 1], one per row, for the methods that read one (`accepts_style_images`:
    # FaceStudio's style branch); None = the method config's own (e.g. `facestudio.style_image`) or none
    style_images: Any = None


@dataclasses.dataclass(frozen=True)
class SamplingParts:
    """Traced values the generic sampler hands a method inside the jitted function (one generation call)."""

    text_uncond: jax.Array  # (B, L, D) negative-prompt embeddings
    text_cond: jax.Array  # (B, L, D) prompt embeddings
    empty_text: jax.Array  # (B, L, D) empty-prompt embeddings
    ref_latents: jax.Array  # (B, K, N, h, w, C) scaled VAE latents of the references (posterior mean)
    inputs: dict  # the arrays `sampling_inputs` returned (sharded over the batch like everything per-example)
    schedule: Any  # the pipeline's NoiseSchedule
    batch: int  # B


class IdentityMethod:
    """Base class of identity methods (see the module docstring). Subclasses set the class attributes and
    override the methods; defaults are given where most methods agree."""

    name: ClassVar[str]  # registry key ('face_fusion', 'flashface', ...)
    section: ClassVar[str]  # config section name (top-level key of ExperimentConfig)
    config_class: ClassVar[type]  # the section's frozen dataclass
    trainable_presets: ClassVar[tuple[str, ...]] = ()  # train.trainable names this method defines
    batch_keys: ClassVar[tuple[str, ...]] = ()  # image-stream fields its loss reads beyond the generic batch
    display_name: ClassVar[str] = ""  # human name for messages and tables ('Face Fusion')
    accepts_identity_masks: ClassVar[bool] = False  # whether `sampling_inputs` reads `ReferenceRequest.masks`
    accepts_style_images: ClassVar[bool] = False  # whether `sampling_inputs` reads `ReferenceRequest.style_images`

    # ---------------------------------------------------------------------------------------------- model
    def attach(self, unet, cfg, *, trainable: str = "all", rngs=None):
        """Give a base UNet this method's new modules (in place where possible); return the identity model."""
        raise NotImplementedError

    def base_unet(self, model):
        """The UNet inside an identity model (its config gives latent channels, block layout...)."""
        return model

    def trainable_filter(self, preset: str, cfg) -> ParamFilter:
        """An nnx filter `(path, value) -> bool` over the identity model's params for one of `trainable_presets`."""
        raise NotImplementedError

    def prepare_model(self, model, cfg):
        """Attach the frozen encoders the config names by folder (a CLIP style encoder, a prior...) before
        sampling or training; return the model (default: unchanged). Errors name the config key and folder."""
        return model

    # ------------------------------------------------------------------------------------------- training
    def loss(self, model, batch: dict, rng: jax.Array, schedule, cfg) -> tuple[jax.Array, dict]:
        """`(loss, aux)` of one batch (the trainer's `loss_fn` contract)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- sampling
    def sampling_inputs(self, model, cfg, request: ReferenceRequest, *, batch: int, image_size: tuple[int, int],
                        latent_size: tuple[int, int]) -> dict:
        """Host side: check `request` (errors name the argument) and return the per-example arrays the jitted
        sampler needs (every leaf with leading axis B). `request.references` arrives as (B, K, N, H, W, 3) and
        `request.reference_valid` as (B, K, N); a method that changes them (e.g. pads to 4 references) returns
        them under the same keys."""
        raise NotImplementedError

    def encode_references(self, model, cfg, parts: SamplingParts, key: jax.Array):
        """Traced, once per generation before the loop: a pytree reused by every step (e.g. cached reference
        tokens), or None when everything happens per step."""
        return None

    def guided_prediction(self, model, cfg, sampling_cfg, cache, parts: SamplingParts, x_in: jax.Array,
                          t: jax.Array, step: jax.Array, key: jax.Array) -> jax.Array:
        """Traced, once per step: the guided noise prediction (B, h, w, C) float32 for `x_in` at timestep `t`."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- export
    def export_tensors(self, model, cfg) -> dict[str, np.ndarray]:
        """The method's own trained tensors (torch-style names) for `identity/<name>.safetensors`."""
        raise NotImplementedError

    def load_tensors(self, unet, cfg, tensors: dict[str, np.ndarray], source: str):
        """Attach the modules to `unet` and fill them from `tensors` (every key mapped or reported, naming
        `source`); return the identity model."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ CLI
    def reference_size(self, cfg) -> Optional[int]:
        """Pixel side of the reference crops this method expects (None: the caller's choice)."""
        return None

    def reference_photos(self, groups, analyzer, size: int, margin: float, cfg):
        """Reference photo paths per person -> `fusion_jax.references.ReferenceSet` of aligned crops (default: the
        largest face of each photo; errors are `references.ReferenceError`s naming the flag and file)."""
        from fusion_jax import references

        return references.reference_set(groups, analyzer, size, margin)

    def sampling_defaults(self, cfg) -> dict:
        """`SamplingConfig` fields the method's paper samples with, used where the user gave none (e.g.
        FaceStudio: Euler-ancestral, 25 steps); default: none (the generic defaults)."""
        return {}

    def add_arguments(self, parser) -> None:
        """Method-specific flags of `infer/generate.py` (default: none)."""

    def apply_arguments(self, args, cfg, sampling_cfg) -> tuple[Any, Any]:
        """(cfg, sampling_cfg) with the method's flags applied (default: unchanged)."""
        return cfg, sampling_cfg


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------

_METHODS: dict[str, IdentityMethod] = {}


def register(cls: type[IdentityMethod]) -> type[IdentityMethod]:
    """Class decorator: registers one instance of `cls` under `cls.name` and its config section."""
    from fusion_jax import config as config_lib

    for attr in ("name", "section", "config_class"):
        if not hasattr(cls, attr):
            raise TypeError(f"identity method {cls.__name__} must set the class attribute {attr!r}")
    if cls.name in _METHODS and type(_METHODS[cls.name]) is not cls:
        raise ValueError(f"identity method {cls.name!r} is already registered by {type(_METHODS[cls.name]).__name__}")
    _METHODS[cls.name] = cls()
    config_lib.register_section(cls.section, cls.config_class, owner=f"identity method {cls.name!r}")
    return cls


def _load_builtin() -> None:
    import importlib

    from fusion_jax.identity import BUILTIN_METHODS

    for module in BUILTIN_METHODS:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    _load_builtin()
    return tuple(_METHODS)


def get(name: str, *, what: str = "identity method") -> IdentityMethod:
    """The registered method `name`; the error lists the known names (`what` names the flag or config key)."""
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(f"{what}: unknown identity method {name!r}; registered: {sorted(_METHODS)}")
    return _METHODS[name]


def for_config(cfg) -> IdentityMethod:
    """The method whose config section type `cfg` is (e.g. a FusionConfig -> Face Fusion)."""
    _load_builtin()
    matches = [m for m in _METHODS.values() if type(cfg) is m.config_class]
    if len(matches) != 1:
        raise ValueError(f"no single identity method takes a {type(cfg).__name__} config "
                         f"(registered: {[(m.name, m.config_class.__name__) for m in _METHODS.values()]})")
    return matches[0]


def default_method() -> IdentityMethod:
    """The method used when a caller gives references but no method: the first of `BUILTIN_METHODS` (the
    project's core method, Face Fusion)."""
    from fusion_jax.identity import BUILTIN_METHODS

    _load_builtin()
    module = BUILTIN_METHODS[0]
    return next(m for m in _METHODS.values() if type(m).__module__ == module)


def method_config(config, method: IdentityMethod):
    """The method's section of an ExperimentConfig."""
    return getattr(config, method.section)


def default_config(method: IdentityMethod, cfg: Optional[Any] = None):
    """`cfg`, or the method's default config."""
    return cfg if cfg is not None else method.config_class()


__all__ = ["IdentityMethod", "ReferenceRequest", "SamplingParts", "register", "names", "get", "for_config",
           "default_method",
           "method_config", "default_config", "ParamFilter"]
