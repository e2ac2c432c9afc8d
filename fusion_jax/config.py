"""Typed experiment configs: frozen dataclasses, YAML files with `base:` inheritance, `key=value` overrides.

Why: every run is described by one resolved, validated config that is saved next to its checkpoints, and every
mistake in a config (unknown key, wrong type, bad choice) is reported before anything is compiled, naming the
full dotted key and the file or override it came from.

How a config is resolved (`load_config`):
  1. the YAML file is read; its `base:` (a path or a list of paths, relative to the YAML file) is resolved
     first, recursively, and the file's own keys are deep-merged on top;
  2. each file is validated against the dataclass schema *before* merging, so an error names the file that
     holds the bad value;
  3. `key=value` overrides (dotted keys, e.g. `train.lr=1e-4`, `mesh.data=-1`) are parsed by the type of
     the field they set, then applied in order.

Adding a section owned by another module is one line in `ExperimentConfig`:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the UNet
Identity methods register their own sections instead (`register_section`, called by
`fusion_jax.identity.base.register`): `fusion:` for Face Fusion, `flashface:` for FlashFace, ... are top-level keys
like the others, but this module never imports a method; `config.fusion` reads the registered section.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Optional, Sequence, Union

import yaml

# Sections owned by other modules, reused as they are (their fields are the YAML keys).
from fusion_jax.data.configs import PipelineConfig, SynthFaceConfig


class ConfigError(ValueError):
    """A config problem; the message names the dotted key and where the value came from."""


# ----------------------------------------------------------------------------------------------------------------
# Sections owned by the trainer.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh over axes (data, fsdp, tensor). Exactly one size may be -1 (= all remaining devices)."""

    data: int = -1  # pure data parallelism: batch split, params replicated
    fsdp: int = 1  # fully sharded data parallelism: batch split AND params/optimizer state sharded
    tensor: int = 1  # tensor parallelism: attention heads and MLP width split


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warmup and (optional) cosine decay, clipping, EMA, accumulation."""

    steps: int = 1000  # total optimizer steps (the cosine schedule decays over these)
    lr: float = 1e-4  # peak learning rate, reached after `warmup_steps`
    warmup_steps: int = 100  # linear warmup from 0 to `lr`
    cosine: bool = True  # cosine decay from `lr` to `lr * final_lr_ratio` after warmup; False = constant
    final_lr_ratio: float = 0.0  # end of the cosine schedule as a fraction of `lr`
    weight_decay: float = 1e-2  # AdamW decoupled weight decay (not applied to biases / norm scales)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    clip_norm: Optional[float] = 1.0  # global gradient-norm clip; None = no clipping
    ema_decay: Optional[float] = None  # EMA of the trainable params (e.g. 0.9999); None = no EMA kept
    grad_accum: int = 1  # micro-batches per step (lax.scan inside the jitted step); batch_size must divide
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the stored (master) params
    # params are cast to this for forward/backward; 'auto' = bfloat16 on GPU / TPU, float32 on CPU (the rule table
    # of fusion_jax.precision, resolved where the model is built and in the train step)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    mu_dtype: Optional[Literal["float32", "bfloat16"]] = None  # Adam first-moment dtype; None = param dtype
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"  # block remat
    seed: int = 0  # seeds model init and the per-step RNG (dropout, noise, timesteps)
    # which params train: 'all', a Face Fusion mode ('identity' = the new to_k_ref / to_v_ref, 'identity+lora'),
    # or a regex searched in the param path ('to_[kv]_ref'). Frozen encoders (VAE, text encoder) never train.
    trainable: str = "all"
    max_skipped_steps: Optional[int] = 100  # abort with an error once more steps were skipped (NaN); None = never


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under WORKDIR/checkpoints/<step>/."""

    every: int = 1000  # save every N steps (and at the end, and on SIGTERM); 0 = only at the end
    keep_last: int = 3  # keep the newest K checkpoints
    keep_every: Optional[int] = None  # also keep forever every checkpoint whose step is a multiple of M
    async_save: bool = True  # write in a background thread while training continues
    resume: bool = True  # continue from the newest checkpoint in the workdir when there is one


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics to WORKDIR/metrics.jsonl and TensorBoard event files; a tqdm progress bar."""

    every: int = 10  # read metrics from the device and write them every N steps (the only host sync)
    tensorboard: bool = True  # write TensorBoard event files under WORKDIR/tensorboard
    progress_bar: bool = True  # tqdm bar with ETA on process 0
    sample_every: int = 0  # call the sample hook (image grids) every N steps; 0 = never


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from (`fusion_jax.experiment.make_batch_iterator`)."""

    # synthetic = random tensors of the model's batch shapes (throughput tests, smoke runs);
    # synthfaces = procedural identities (`data.synthfaces`); folder = a built face_identities dataset at
    # `data.path` (train/build_dataset.py); preencoded = a train/preencode.py folder at `data.path`.
    source: Literal["synthetic", "synthfaces", "folder", "preencoded"] = "synthetic"
    batch_size: int = 8  # global batch per optimizer step (all hosts, all micro-batches)
    seed: int = 0  # seeds shuffling / synthetic batches (independent of train.seed)
    path: str = ""  # folder: the face_identities data_dir; preencoded: the pre-encoded folder
    # The tf.data stream (synthfaces / folder / preencoded). Its batch_size, seed, process_* and tokenize are set
    # from data.batch_size / data.seed / JAX / the model's tokenizer; its p_drop_* flags are not used (condition
    # dropout is drawn in the loss: fusion.text_dropout / reference_dropout, objective.text_dropout).
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    synthfaces: SynthFaceConfig = dataclasses.field(default_factory=SynthFaceConfig)  # data.source: synthfaces


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The networks: a base SD pipeline (UNet + frozen VAE + frozen text encoder) or an inline UNet preset."""

    # A diffusers SD pipeline folder or cached HF repo id; 'tiny' = the project's tiny random pipeline
    # (`fusion_jax.tiny.write_tiny_pipeline`, written once to `tiny_cache_dir`). Ignored with `unet_preset`.
    pipeline: str = "tiny"
    # Inline randomly initialised UNet for throughput tests, no VAE / text encoder: 'tiny' | 'mid' | 'sd15'
    # (`fusion_jax.experiment.UNET_PRESETS`); needs latents: preencoded and data.source: synthetic.
    unet_preset: Optional[str] = None
    tiny_cache_dir: str = ""  # where 'tiny' is written; '' = $XDG_CACHE_HOME (or ~/.cache)/fusion_jax/tiny_pipeline
    # Where the UNet's inputs come from: vae = encode target / reference images with the frozen VAE in the train
    # step; preencoded = sample the batch's pre-encoded VAE moments (data.source: preencoded or synthetic);
    # pixel = the UNet denoises [-1, 1] pixels directly (a UNet with 3 input channels).
    latents: Literal["vae", "preencoded", "pixel"] = "vae"
    # Activations run in train.compute_dtype; params are stored in train.param_dtype (the frozen VAE and text
    # encoder too). Attention implementation of the UNet (`fusion_jax.models.attention`).
    attention_kernel: str = "auto"
    query_chunk_size: int = 1024  # query block of the explicit 'chunked' kernel and of identity attention
    text_length: int = 77  # unet_preset with data.source synthetic: text tokens per prompt
    # An identity export (`fusion-jax export` folder, or its identity/ subfolder) of the objective's method whose
    # tensors initialise the method's modules: training continues from it (pair it with model.pipeline = a
    # pipeline holding the export's UNet). Modules the export lacks (e.g. fresh LoRA adapters) keep their init.
    identity_init: str = ""


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What is trained."""

    # text_to_image = the plain denoising loss with text dropout (base models); any registered identity method
    # (`fusion_jax.identity.base.names()`: face_fusion, flashface, ...) = that method's loss, with its settings in
    # its own section (e.g. `fusion` for face_fusion).
    name: str = "face_fusion"
    text_dropout: float = 0.1  # text_to_image: probability of replacing a caption by the empty prompt
    # text_to_image: Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's loss is weighted by
    # min(SNR_t, gamma) / SNR_t (epsilon), / (SNR_t + 1) (v_prediction) or x1 (sample); 0 = off (plain mean)
    min_snr_gamma: float = 0.0

    # Allowed values of str fields that are only known at run time (checked when the file is read; not a field).
    _config_choices = {"name": lambda: ("text_to_image",) + _identity_method_names()}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment. New sections: add one `name: Section = dataclasses.field(default_factory=Section)`."""

    workdir: str = ""  # run directory (checkpoints/, metrics.jsonl, tensorboard/, config.yaml); '' = must be set
    distributed: Literal["auto", "on", "off"] = "auto"  # jax.distributed.initialize(): auto = when env says so
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # optimisation
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)  # Orbax checkpoints
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)  # metrics and samples
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # batch source
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # networks and latents
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)  # loss
    # The registered sections (identity methods' configs), as (name, section) pairs; read them as attributes
    # (`config.fusion`), write them as top-level YAML keys. Every registered section is present (defaults when the
    # file does not set it).
    sections: tuple = ()

    def __getattr__(self, name: str):
        # Only reached when normal attribute lookup fails: registered sections.
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in self.__dict__.get("sections", ()):
            if key == name:
                return value
        if name in registered_sections():
            return registered_sections()[name]()  # registered after this config was built: its defaults
        raise AttributeError(f"{type(self).__name__} has no field or registered section {name!r}")

    def with_section(self, name: str, value: Any) -> "ExperimentConfig":
        """A copy with registered section `name` replaced by `value`."""
        if name not in registered_sections():
            raise ConfigError(f"no registered config section {name!r} (registered: {sorted(registered_sections())})")
        rest = tuple((k, v) for k, v in self.sections if k != name)
        return dataclasses.replace(self, sections=tuple(sorted(rest + ((name, value),))))


# ----------------------------------------------------------------------------------------------------------------
# Registered sections (identity methods).
# ----------------------------------------------------------------------------------------------------------------

_REGISTERED: dict[str, tuple[type, str]] = {}  # section name -> (dataclass, owner description)


def register_section(name: str, cls: type, owner: str = "") -> None:
    """Add a top-level section `name` of dataclass `cls` to ExperimentConfig (called when a method registers)."""
    static = {f.name for f in dataclasses.fields(ExperimentConfig)}
    if name in static:
        raise ValueError(f"config section {name!r} ({owner}) clashes with a built-in ExperimentConfig field")
    if name in _REGISTERED and _REGISTERED[name][0] is not cls:
        raise ValueError(f"config section {name!r} is already registered by {_REGISTERED[name][1]}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r} ({owner}) must be a dataclass, got {cls!r}")
    _REGISTERED[name] = (cls, owner)


def _load_plugins() -> None:
    from fusion_jax.identity import base

    base.names()  # imports the built-in identity methods, which register their sections


def registered_sections() -> dict[str, type]:
    """Section name -> dataclass of every registered section (built-in identity methods loaded first)."""
    _load_plugins()
    return {name: cls for name, (cls, _) in _REGISTERED.items()}


def _identity_method_names() -> tuple[str, ...]:
    from fusion_jax.identity import base

    return base.names()


def _sections_to_write(cfg: "ExperimentConfig") -> list[str]:
    """Registered sections a resolved config writes: the objective's method section, and any other section that
    differs from its defaults. Sections of methods a run does not use stay out of its saved config.yaml, so that
    it loads again after unrelated methods change their options."""
    from fusion_jax.identity import base

    registered = registered_sections()
    name = cfg.objective.name
    used = base.get(name).section if name in base.names() else None
    return [key for key in registered if key == used or getattr(cfg, key) != registered[key]()]


def _schema(cls: type) -> dict[str, Any]:
    """Field name -> type of a config dataclass; ExperimentConfig's registered sections included."""
    hints = dict(_resolved_hints(cls))
    if cls is ExperimentConfig:
        hints.pop("sections")
        hints.update(registered_sections())
    return hints


# ----------------------------------------------------------------------------------------------------------------
# Type checking / parsing of single values.
# ----------------------------------------------------------------------------------------------------------------

_NONE_STRINGS = ("none", "null", "~")
_TRUE_STRINGS = ("true", "yes", "on", "1")
_FALSE_STRINGS = ("false", "no", "off", "0")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce(value: Any, tp: Any, key: str, where: str, *, from_string: bool) -> Any:
    """Checks `value` against type `tp` and converts it (strings from the command line are parsed by `tp`)."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: key '{key}': expected {expected}, got {type(value).__name__} {value!r}")

    origin = typing.get_origin(tp)
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_string and str(value).lower() in _NONE_STRINGS)):
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for arg in rest:
            try:
                return _coerce(value, arg, key, where, from_string=from_string)
            except ConfigError as e:
                errors.append(e)
        raise fail(_type_name(tp)) from errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (from_string and str(value) == str(choice)):
                return choice
        raise ConfigError(f"{where}: key '{key}': expected one of {list(choices)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in _TRUE_STRINGS + _FALSE_STRINGS:
            return str(value).lower() in _TRUE_STRINGS
        raise fail("bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and from_string:
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept numeric strings for float fields everywhere.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("str")
    if origin in (tuple, list):
        if from_string and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            elif text.startswith("("):
                value = yaml.safe_load("[" + text[1:-1] + "]") if text.endswith(")") else text
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"{_type_name(tp)} with {len(args)} items")
            items = [
                _coerce(v, a, f"{key}[{i}]", where, from_string=from_string)
                for i, (v, a) in enumerate(zip(value, args))
            ]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]", where, from_string=from_string) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: key '{key}': unsupported field type {_type_name(tp)}")


# ----------------------------------------------------------------------------------------------------------------
# Nested dicts <-> dataclasses.
# ----------------------------------------------------------------------------------------------------------------


def _validate_mapping(cls: type, data: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """Validates a (partial) nested dict against dataclass `cls`; returns it with values converted."""
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"{where}: key '{key}': expected a mapping (a section), got {type(data).__name__}")
    hints = _schema(cls)
    out = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown config key '{key}' (known keys here: {known})")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            out[name] = _validate_mapping(tp, value, where, key + ".")
        else:
            out[name] = _check_choice(cls, name, _coerce(value, tp, key, where, from_string=False), key, where)
    return out


def _check_choice(cls: type, name: str, value: Any, key: str, where: str) -> Any:
    """Run-time choices of a str field (`_config_choices` of its dataclass), e.g. registered method names."""
    choices = getattr(cls, "_config_choices", {}).get(name)
    if choices is not None and value not in choices():
        raise ConfigError(f"{where}: key '{key}': expected one of {list(choices())}, got {value!r}")
    return value


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def from_dict(cls: type, data: dict, where: str = "<dict>") -> Any:
    """Builds dataclass `cls` from a nested dict (missing keys keep their defaults)."""
    data = _validate_mapping(cls, data, where)
    return _build(cls, data)


def _build(cls: type, data: dict) -> Any:
    hints = _schema(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        kwargs[name] = _build(tp, value) if dataclasses.is_dataclass(tp) else value
    if cls is ExperimentConfig:
        registered = registered_sections()
        kwargs["sections"] = tuple(sorted((name, kwargs.pop(name, None) or section())
                                          for name, section in registered.items()))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists) suitable for YAML / JSON."""

    def plain(v):
        if isinstance(v, ExperimentConfig):
            out = {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name != "sections"}
            out.update({name: plain(getattr(v, name)) for name in _sections_to_write(v)})
            return out
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Files and overrides.
# ----------------------------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _load_yaml_tree(cls: type, path: str, seen: tuple[str, ...]) -> dict:
    """Reads `path` and its `base:` chain; each file is validated alone, then merged (child wins)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` chain: {' -> '.join(seen + (path,))}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: key 'base': expected a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        merged = _deep_merge(merged, _load_yaml_tree(cls, base_path, seen + (path,)))
    return _deep_merge(merged, _validate_mapping(cls, data, path))


def parse_override(cls: type, override: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': parsed}}}, `value` parsed by the type of field a.b.c."""
    where = f"command-line override '{override}'"
    if "=" not in override:
        raise ConfigError(f"{where}: expected key=value")
    dotted, text = override.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    node_cls = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"{where}: unknown config key '{dotted}' ('{'.'.join(parts[:i])}' is not a section)")
        hints = _schema(node_cls)
        if part not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown config key '{dotted}' (known keys here: {known})")
        owner_cls, node_cls = node_cls, hints[part]
    if dataclasses.is_dataclass(node_cls):
        raise ConfigError(f"{where}: key '{dotted}' is a section; set its fields, e.g. {dotted}.<field>=...")
    value = _check_choice(owner_cls, parts[-1], _coerce(text, node_cls, dotted, where, from_string=True), dotted,
                          where)
    out: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def load_config(
    path: Optional[str] = None, overrides: Sequence[str] = (), cls: type = ExperimentConfig
) -> Any:
    """Resolves YAML `path` (with its `base:` chain; None = defaults) plus `key=value` overrides into `cls`.

    `path` is a file (absolute or relative to the current folder) or a shipped config's name (`tiny`,
    `configs/tiny.yaml`, `synthfaces/face_fusion`): `fusion_jax.config_files.resolve_config`."""
    if path:
        from fusion_jax.config_files import ConfigNotFound, resolve_config

        try:
            path = resolve_config(path)
        except ConfigNotFound as e:
            raise ConfigError(f"config file not found: {e}") from None
    data = _load_yaml_tree(cls, path, ()) if path else {}
    for override in overrides:
        data = _deep_merge(data, parse_override(cls, override))
    return _build(cls, data)


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Returns a copy of `cfg` with `key=value` overrides applied."""
    data = to_dict(cfg)
    for override in overrides:
        data = _deep_merge(data, parse_override(type(cfg), override))
    return from_dict(type(cfg), data, "<overrides>")


def save_config(cfg: Any, path: str) -> None:
    """Writes the resolved config as YAML (loadable again with `load_config(path)`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"# Resolved {type(cfg).__name__} (all bases and overrides applied).\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)


def split_argv(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """`['--config', 'x.yaml', 'a.b=1', ...]` -> ('x.yaml', ['a.b=1', ...]) for entry points."""
    path, overrides, it = None, [], iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or key=value overrides")
    return path, overrides
