"""The exact metrics of the synthetic-face world: an identity embedder and prompt-attribute readers.

Why: on synthetic faces (fusion_jax.data.synthfaces) we know every photo's identity and prompt attributes,
so small CNNs trained on the *train* identities give an ArcFace of this world (identity embeddings whose
cosine similarity says "same person") and readers of the prompt attributes (expression, gaze, background
colour and pattern). Both train in about a minute on 2 CPU cores with a jitted optimizer
step, are checked on *held-out* identities, and are stored as safetensors (config in the metadata).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file, save_file

from fusion_jax import evaluation, saved_settings
from fusion_jax.data import synthfaces

# ------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
    """A small CNN: stride-2 stages, then a linear map of the flattened features."""

    input_size: int = 48  # images are resized (antialiased) to this side before the network
    widths: tuple[int, ...] = (32, 64, 96)  # channels of each stride-2 stage (one stage per entry)
    out_features: int = 128  # width of the output vector (embedding size, or logits for a reader)
    pooling: str = "flatten"  # "flatten" keeps where features are (a mark's side); "mean" is translation-invariant
    center_crop: float = 1.0  # fraction of the image side kept around the centre before resizing (the face)

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, int) or self.input_size < 2 ** len(self.widths):
            raise ValueError(f"input_size must be an int >= 2**len(widths), got {self.input_size!r}")
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths!r}")
        if not isinstance(self.out_features, int) or self.out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {self.out_features!r}")
        if not 0 < self.center_crop <= 1:
            raise ValueError(f"center_crop must be in (0, 1], got {self.center_crop!r}")
        if self.pooling not in ("flatten", "mean"):
            raise ValueError(f"pooling must be 'flatten' or 'mean', got {self.pooling!r}")


class ConvNet(nnx.Module):
    """uint8-range NHWC images -> (N, out_features). Conv3x3 + GroupNorm + GELU, halving size each stage."""

    def __init__(self, config: ConvNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.stem = nnx.Conv(3, config.widths[0], (3, 3), rngs=rngs)
        convs, norms = [], []
        channels = config.widths[0]
        for width in config.widths:
            convs.append(nnx.Conv(channels, width, (3, 3), strides=2, rngs=rngs))
            convs.append(nnx.Conv(width, width, (3, 3), rngs=rngs))
            norms.append(nnx.GroupNorm(width, num_groups=8 if width % 8 == 0 else 1, rngs=rngs))
            norms.append(nnx.GroupNorm(width, num_groups=8 if width % 8 == 0 else 1, rngs=rngs))
            channels = width
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        side = config.input_size
        for _ in config.widths:
            side = -(-side // 2)  # a stride-2 'SAME' convolution rounds up
        pooled = side * side * channels if config.pooling == "flatten" else channels
        self.head = nnx.Linear(pooled, config.out_features, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = prepare_images(images, self.config.input_size, self.config.center_crop)
        x = jax.nn.gelu(self.stem(x))
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.gelu(norm(conv(x)))
        pooled = x.reshape(x.shape[0], -1) if self.config.pooling == "flatten" else x.mean(axis=(1, 2))
        return self.head(pooled)


def prepare_images(images: jax.Array, size: int, center_crop: float = 1.0) -> jax.Array:
    """[0, 255] images of any side -> central crop -> float32 in [-1, 1] at size x size (antialiased resize)."""
    height, width = images.shape[1:3]
    keep_h, keep_w = max(1, round(height * center_crop)), max(1, round(width * center_crop))
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    x = images[:, top:top + keep_h, left:left + keep_w].astype(jnp.float32) / 127.5 - 1.0
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)
    return x


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image by a random integer offset in [-max_shift, max_shift], repeating the edges."""
    n, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, 3))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def _as_uint8_range(images: np.ndarray) -> np.ndarray:
    """Accepts uint8 images, or floats in [0, 1]; returns an (N, H, W, 3) array in the [0, 255] range."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if images.size and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"float images must lie in [0, 1], got range [{images.min()}, {images.max()}]")
    return (np.clip(images, 0, 1) * 255).astype(np.float32)


def _batched_apply(fn: Callable[[np.ndarray], jax.Array], images: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Runs a jitted fn over fixed-size chunks (padded to a power of two) so few shapes are compiled."""
    outputs = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        padded = 1 << max(0, int(np.ceil(np.log2(len(part)))))
        if padded != len(part):
            part = np.concatenate([part, np.repeat(part[-1:], padded - len(part), axis=0)])
        outputs.append(np.asarray(fn(part))[: min(chunk, len(images) - start)])
    return np.concatenate(outputs)


# ------------------------------------------------------------------------------------------------------
# Saving and loading (safetensors; the config goes into the metadata; never pickles)
# ------------------------------------------------------------------------------------------------------


def _save_nets(path: str, kind: str, nets: dict[str, ConvNet], extra: dict[str, Any]) -> None:
    """One safetensors file; parameter names are '<net name><param path>'; configs go into the metadata."""
    tensors = {}
    for name, net in nets.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(net, nnx.Param))[0]:
            tensors[name + jax.tree_util.keystr(key_path)] = np.asarray(leaf)
    configs = {name: dataclasses.asdict(net.config) for name, net in nets.items()}
    metadata = {"kind": kind, "configs": json.dumps(configs), "extra": json.dumps(extra)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def _load_nets(path: str, kind: str) -> tuple[dict[str, ConvNet], dict[str, Any]]:
    """Inverse of `_save_nets`; every parameter must be present with its shape, and nothing else."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no {kind} checkpoint at {path!r}")
    with safe_open(path, "np") as f:
        metadata = f.metadata() or {}
    if metadata.get("kind") != kind:
        raise ValueError(f"{path!r} holds a {metadata.get('kind')!r}, expected a {kind!r}")
    tensors = load_file(path)
    used, nets = set(), {}
    for name, raw in json.loads(metadata["configs"]).items():
        config = ConvNetConfig(**{**raw, "widths": tuple(raw["widths"])})
        graphdef, state = nnx.split(nnx.eval_shape(lambda: ConvNet(config, rngs=nnx.Rngs(0))))
        paths, treedef = jax.tree_util.tree_flatten_with_path(state)
        leaves = []
        for key_path, leaf in paths:
            key = name + jax.tree_util.keystr(key_path)
            if key not in tensors:
                raise ValueError(f"{path!r} is missing parameter {key}")
            if tensors[key].shape != leaf.shape:
                raise ValueError(f"{path!r}: parameter {key} has shape {tensors[key].shape}, expected {leaf.shape}")
            leaves.append(jnp.asarray(tensors[key]))
            used.add(key)
        nets[name] = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    if set(tensors) - used:
        raise ValueError(f"{path!r} has unexpected parameters {sorted(set(tensors) - used)}")
    return nets, json.loads(metadata["extra"])


# ------------------------------------------------------------------------------------------------------
# Training: a jitted optimizer step that samples its own batch; the data stays on the device.
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation of a small classifier on in-memory images."""

    steps: int = 600  # optimizer steps
    batch_size: int = 64  # images per step
    learning_rate: float = 2e-3  # AdamW peak learning rate (cosine decay to 0 after a 5% warmup)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    steps_per_call: int = 50  # steps between progress reports (the only host syncs)
    seed: int = 0  # initialisation and batch-sampling seed
    max_shift: int = 0  # random translation of each training image by up to this many pixels (0 = off)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "steps_per_call"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")


LossFn = Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def build_under_jit(factory: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds a module with its initialisers compiled as one program (un-jitted init is slow, DESIGN 9)."""
    graphdef, _ = nnx.split(nnx.eval_shape(factory))
    state = jax.jit(lambda: nnx.split(factory())[1])()
    return nnx.merge(graphdef, state)


def fit_classifier(
    model: nnx.Module, loss_fn: LossFn, images: np.ndarray, labels: np.ndarray, config: TrainConfig,
    log: Callable[[str], None] | None = None,
) -> tuple[nnx.Module, float]:
    """Trains a copy of `model` on random batches; loss_fn(model, images, labels) -> (loss, accuracy).

    The step count is rounded up to a multiple of steps_per_call. Returns the trained model and the mean
    batch accuracy over the last steps_per_call steps.
    """
    if len(images) != len(labels):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) must have the same length")
    num_chunks = -(-config.steps // config.steps_per_call)
    total_steps = num_chunks * config.steps_per_call
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(1, total_steps // 20), total_steps)
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    graphdef, params = nnx.split(model)
    opt_state = jax.jit(optimizer.init)(params)

    # One jitted step called from Python (dispatch is asynchronous; the host only syncs to log). A lax.scan
    # over steps would save dispatches, but XLA:CPU runs convolutions inside a while loop ~25x slower.
    def train_step(params, opt_state, images, labels, key, step):
        index_key, shift_key = jax.random.split(jax.random.fold_in(key, step))
        index = jax.random.randint(index_key, (config.batch_size,), 0, images.shape[0])
        batch = random_shift(images[index], shift_key, config.max_shift) if config.max_shift else images[index]

        def loss_of(p):
            return loss_fn(nnx.merge(graphdef, p), batch, labels[index])

        (loss, accuracy), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    device_images, device_labels = jnp.asarray(images), jnp.asarray(labels)
    key = jax.random.key(config.seed)
    start = time.perf_counter()
    losses, accuracies = [], []
    for step in range(total_steps):
        params, opt_state, loss, accuracy = train_step(params, opt_state, device_images, device_labels, key, step)
        losses.append(loss)
        accuracies.append(accuracy)
        if (step + 1) % config.steps_per_call == 0:
            accuracy = float(jnp.mean(jnp.stack(accuracies)))
            if log is not None:
                log(f"  step {step + 1}/{total_steps}  loss {float(jnp.mean(jnp.stack(losses))):.3f}  "
                    f"batch accuracy {accuracy:.3f}  ({time.perf_counter() - start:.0f}s)")
            losses, accuracies = [], []
    return nnx.merge(graphdef, params), float(accuracy)


# ------------------------------------------------------------------------------------------------------
# Identity embedder
# ------------------------------------------------------------------------------------------------------


def _unit(x: jax.Array, axis: int = -1) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class _CosineClassifier(nnx.Module):
    """Training wrapper: embedding net + one unit-norm weight vector per training identity (CosFace)."""

    def __init__(self, net: ConvNet, num_classes: int, *, rngs: nnx.Rngs):
        self.net = net
        self.class_weights = nnx.Param(jax.random.normal(rngs.params(), (net.config.out_features, num_classes)))


def _cosface_loss(scale: float, margin: float) -> LossFn:
    """CosFace: softmax over scale * (cos - margin at the true class); pulls photos of a person together."""

    def loss_fn(model: _CosineClassifier, images: jax.Array, labels: jax.Array):
        cos = _unit(model.net(images)) @ _unit(model.class_weights[...], axis=0)
        onehot = jax.nn.one_hot(labels, cos.shape[1])
        loss = optax.softmax_cross_entropy(scale * (cos - margin * onehot), onehot).mean()
        return loss, jnp.mean(jnp.argmax(cos, axis=-1) == labels)

    return loss_fn


class IdentityEmbedder:
    """images (N, H, W, 3), uint8 or float in [0, 1], any size -> unit identity embeddings (N, D) float32."""

    KIND = "synthface_identity_embedder"

    def __init__(self, net: ConvNet, info: dict[str, Any] | None = None):
        self.net = net
        self.info = dict(info or {})  # how it was trained and checked (threshold, accuracies)
        graphdef, state = nnx.split(net)
        apply = jax.jit(lambda state, images: _unit(nnx.merge(graphdef, state)(images)))
        self._apply = lambda images: apply(state, images)

    @property
    def dim(self) -> int:
        return self.net.config.out_features

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _batched_apply(self._apply, _as_uint8_range(images)).astype(np.float32)

    embed = __call__

    def save(self, path: str) -> None:
        _save_nets(path, self.KIND, {"net": self.net}, self.info)

    @classmethod
    def load(cls, path: str) -> "IdentityEmbedder":
        nets, info = _load_nets(path, cls.KIND)
        return cls(nets["net"], info)


def train_identity_embedder(
    images: np.ndarray,
    identities: np.ndarray,
    net_config: ConvNetConfig = ConvNetConfig(),
    train_config: TrainConfig = TrainConfig(),
    margin: float = 0.2,
    scale: float = 16.0,
    log: Callable[[str], None] | None = None,
) -> IdentityEmbedder:
    """Trains the identity embedder with a CosFace loss on labelled photos (uint8 (N, H, W, 3), ids (N,))."""
    images = _as_uint8_range(images)
    identities = np.asarray(identities)
    if identities.shape != (len(images),):
        raise ValueError(f"identities must have shape ({len(images)},), got {identities.shape}")
    classes, labels = np.unique(identities, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("identities must contain at least 2 different identities")
    model = build_under_jit(lambda: _CosineClassifier(
        ConvNet(net_config, rngs=nnx.Rngs(train_config.seed)), len(classes), rngs=nnx.Rngs(train_config.seed + 1)))
    model, accuracy = fit_classifier(model, _cosface_loss(scale, margin), images, labels.astype(np.int32),
                                     train_config, log)
    return IdentityEmbedder(model.net, {"train_batch_accuracy": accuracy, "num_train_identities": len(classes),
                                        "num_train_images": len(images)})


# ------------------------------------------------------------------------------------------------------
# Attribute readers: one net, one softmax head per prompt attribute
# ------------------------------------------------------------------------------------------------------

# Attribute groups a reader net can read. The face attributes need the face at full resolution and the scene
# attributes the image borders, so the default reader is a "face" net plus a "scene" net; "all" is one net.
READER_GROUPS: dict[str, tuple[str, ...]] = {
    "face": ("expression", "gaze"),
    "scene": ("background_colour", "background_pattern"),
    "all": synthfaces.ATTRIBUTE_NAMES,
}
_OFFSETS = tuple(int(o) for o in np.cumsum([0] + [len(v) for v in synthfaces.ATTRIBUTE_VALUES.values()]))
NUM_ATTRIBUTE_LOGITS = _OFFSETS[-1]  # logits of a net reading all four attributes
DEFAULT_READER_NETS: dict[str, ConvNetConfig] = {
    "face": ConvNetConfig(input_size=32, widths=(32, 64, 128), out_features=6, center_crop=0.6),
    "scene": ConvNetConfig(input_size=32, widths=(16, 32, 64), out_features=10),
}


def _check_groups(groups: Any, what: str) -> None:
    """The groups must be known and read every attribute exactly once."""
    unknown = set(groups) - set(READER_GROUPS)
    if unknown:
        raise ValueError(f"{what} has unknown reader groups {sorted(unknown)}; known: {sorted(READER_GROUPS)}")
    covered = sorted(name for group in groups for name in READER_GROUPS[group])
    if covered != sorted(synthfaces.ATTRIBUTE_NAMES):
        raise ValueError(f"{what} must read each of {synthfaces.ATTRIBUTE_NAMES} exactly once, "
                         f"got groups {sorted(groups)}")


def _class_counts(group: str) -> tuple[int, ...]:
    return tuple(len(synthfaces.ATTRIBUTE_VALUES[name]) for name in READER_GROUPS[group])


def _split_logits(logits: jax.Array, counts: tuple[int, ...]) -> list[jax.Array]:
    offsets = np.cumsum((0,) + counts)
    return [logits[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _grouped_softmax_loss(counts: tuple[int, ...]) -> LossFn:
    """Sum of one softmax cross-entropy per attribute of a group; accuracy averaged over the attributes."""

    def loss_fn(model: ConvNet, images: jax.Array, labels: jax.Array):
        losses, hits = [], []
        for a, logits in enumerate(_split_logits(model(images), counts)):
            losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, a]).mean())
            hits.append(jnp.argmax(logits, axis=-1) == labels[:, a])
        return sum(losses), jnp.mean(jnp.stack(hits))

    return loss_fn


class AttributeReader:
    """images -> (N, 4) class indices of ATTRIBUTE_NAMES (expression, gaze, background colour and pattern)."""

    KIND = "synthface_attribute_reader"
    names = synthfaces.ATTRIBUTE_NAMES

    def __init__(self, nets: dict[str, ConvNet], info: dict[str, Any] | None = None):
        _check_groups(nets, "nets")
        for group, net in nets.items():
            if net.config.out_features != sum(_class_counts(group)):
                raise ValueError(f"the {group!r} reader net must output {sum(_class_counts(group))} logits, "
                                 f"got {net.config.out_features}")
        self.nets = nets
        self.info = dict(info or {})  # how it was trained and checked (accuracies)
        order = [synthfaces.ATTRIBUTE_NAMES.index(n) for group in nets for n in READER_GROUPS[group]]
        inverse = np.argsort(order)
        split = {group: nnx.split(net) for group, net in nets.items()}
        counts = {group: _class_counts(group) for group in nets}

        def read(states, images):
            columns = []
            for group, (graphdef, _) in split.items():
                logits = nnx.merge(graphdef, states[group])(images)
                columns += [jnp.argmax(l, axis=-1) for l in _split_logits(logits, counts[group])]
            return jnp.stack(columns, axis=1)[:, inverse]

        apply = jax.jit(read)
        states = {group: state for group, (_, state) in split.items()}
        self._apply = lambda images: apply(states, images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _batched_apply(self._apply, _as_uint8_range(images)).astype(np.int64)

    def read_attributes(self, images: np.ndarray) -> list[synthfaces.PromptAttributes]:
        return [synthfaces.PromptAttributes.from_labels(row) for row in self(images)]

    def save(self, path: str) -> None:
        _save_nets(path, self.KIND, self.nets, self.info)

    @classmethod
    def load(cls, path: str) -> "AttributeReader":
        nets, info = _load_nets(path, cls.KIND)
        return cls(nets, info)


def train_attribute_reader(
    images: np.ndarray,
    attribute_labels: np.ndarray,
    net_configs: dict[str, ConvNetConfig] | None = None,
    train_config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] | None = None,
) -> AttributeReader:
    """Trains the prompt-attribute readers (one net per READER_GROUPS entry) on photos with their (N, 4)
    attribute class indices in ATTRIBUTE_NAMES order."""
    images = _as_uint8_range(images)
    net_configs = dict(DEFAULT_READER_NETS if net_configs is None else net_configs)
    counts = np.array([len(v) for v in synthfaces.ATTRIBUTE_VALUES.values()])
    attribute_labels = np.asarray(attribute_labels)
    if attribute_labels.shape != (len(images), len(counts)):
        raise ValueError(f"attribute_labels must have shape ({len(images)}, {len(counts)}), "
                         f"got {attribute_labels.shape}")
    if attribute_labels.min() < 0 or np.any(attribute_labels.max(axis=0) >= counts):
        raise ValueError(f"attribute_labels must be class indices below {tuple(counts)}")
    _check_groups(net_configs, "net_configs")
    nets, info = {}, {"num_train_images": len(images)}
    for group, config in net_configs.items():
        if config.out_features != sum(_class_counts(group)):
            raise ValueError(f"net_configs[{group!r}].out_features must be {sum(_class_counts(group))}, "
                             f"got {config.out_features}")
        if log is not None:
            log(f" {group} attributes {READER_GROUPS[group]}")
        columns = [synthfaces.ATTRIBUTE_NAMES.index(n) for n in READER_GROUPS[group]]
        model = build_under_jit(lambda: ConvNet(config, rngs=nnx.Rngs(train_config.seed)))
        nets[group], info[f"train_batch_accuracy_{group}"] = fit_classifier(
            model, _grouped_softmax_loss(_class_counts(group)), images,
            attribute_labels[:, columns].astype(np.int32), train_config, log)
    return AttributeReader(nets, info)


def read_background_colour(images: np.ndarray, corner: float = 0.1) -> np.ndarray:
    """Analytic background-colour reader: hue of the two top corners -> index into BACKGROUND_COLOURS, (N,).

    Exact on synthetic photos (the top corners are always background and patterns keep the base hue);
    needs no training, so it also cross-checks the trained reader on generated images.
    """
    images = _as_uint8_range(images).astype(np.float32)
    side = max(1, int(round(images.shape[1] * corner)))
    patches = np.concatenate([images[:, :side, :side], images[:, :side, -side:]], axis=1)
    mean = patches.reshape(len(images), -1, 3).mean(axis=1)
    hues = _hue(mean)
    reference = _hue(np.array([synthfaces.BACKGROUND_RGB[c] for c in synthfaces.BACKGROUND_COLOURS], np.float32))
    distance = np.abs(hues[:, None] - reference[None, :])
    distance = np.minimum(distance, 360 - distance)
    return distance.argmin(axis=1).astype(np.int64)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (..., 3) RGB colours."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


# ------------------------------------------------------------------------------------------------------
# Frechet distance in the identity embedder's feature space (FID with this world's embedder for Inception)
# ------------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D) in float64; covariance unbiased (N - 1), as pytorch-fid's
    `np.cov(act, rowvar=False)`."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    Computed as pytorch-fid's `calculate_frechet_distance`: scipy.linalg.sqrtm of the product; if that is not
    finite (singular product: fewer samples than dimensions), eps * I is added to both covariances first; a
    complex result with imaginary diagonal above 1e-3 is an error, a smaller imaginary part is dropped."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same shape, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"sigma1 and sigma2 must be ({mu1.shape[0]}, {mu1.shape[0]}), got {sigma1.shape} and "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def embedder_frechet_distance(embedder: IdentityEmbedder, images_a: np.ndarray, images_b: np.ndarray) -> float:
    """Frechet distance between two image sets in the identity embedder's (unit-normalised) feature space.

    Like FID it is biased upwards at finite N (more so at small N relative to the 128 dimensions): compare it
    only with a real-vs-real floor computed on sets of the same sizes (`real_frechet_floor`)."""
    return feature_frechet_distance(embedder(images_a), embedder(images_b))


def real_frechet_floor(embedder: IdentityEmbedder, faces: synthfaces.SynthFaceConfig, identity_ids: np.ndarray,
                       photos_a: np.ndarray, photos_b: np.ndarray) -> float:
    """The Frechet distance of real photos against real photos: the same identities, disjoint photo ids (other
    poses, lighting and prompt attributes), i.e. what a perfect generator would score at this N."""
    overlap = set(np.asarray(photos_a).tolist()) & set(np.asarray(photos_b).tolist())
    if overlap:
        raise ValueError(f"photos_a and photos_b must be disjoint, both hold {sorted(overlap)}")
    images_a, _, _ = render_photos(faces, identity_ids, photos_a)
    images_b, _, _ = render_photos(faces, identity_ids, photos_b)
    return embedder_frechet_distance(embedder, images_a, images_b)


# ------------------------------------------------------------------------------------------------------
# Checking and caching: verification on held-out identities, reader accuracy, one cached directory
# ------------------------------------------------------------------------------------------------------


def render_photos(
    faces: synthfaces.SynthFaceConfig, identity_ids: np.ndarray, photo_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every listed photo of every listed identity: images (N, H, W, 3), identities (N,), attribute labels (N, 4)."""
    identities = np.repeat(np.asarray(identity_ids, np.int64), len(photo_ids))
    photos = np.tile(np.asarray(photo_ids, np.int64), len(identity_ids))
    images, labels = synthfaces.render_batch(identities, photos, faces)
    return images, identities, labels


def verification_report(
    embed_fn: evaluation.EmbedFn,
    threshold_images: np.ndarray, threshold_identities: np.ndarray,
    test_images: np.ndarray, test_identities: np.ndarray,
    num_pairs: int = 2000, seed: int = 0,
) -> dict[str, float]:
    """Same/different verification: threshold chosen on one set of pairs, accuracy measured on another."""
    def pair_similarities(images, identities):
        embeddings = embed_fn(images)
        first, second, same = evaluation.verification_pairs(identities, num_pairs, seed)
        return evaluation.cosine_similarity(embeddings[first], embeddings[second]), same

    sims, same = pair_similarities(threshold_images, threshold_identities)
    threshold = evaluation.best_threshold(sims, same)
    test_sims, test_same = pair_similarities(test_images, test_identities)
    return {
        "threshold": threshold,
        "threshold_pairs_accuracy": evaluation.verification_accuracy(sims, same, threshold),
        "verification_accuracy": evaluation.verification_accuracy(test_sims, test_same, threshold),
        "same_similarity_mean": float(test_sims[test_same].mean()),
        "different_similarity_mean": float(test_sims[~test_same].mean()),
    }


@dataclasses.dataclass(frozen=True)
class SynthMetricSetup:
    """Data and model sizes of the synthetic-face metric models (defaults: about a minute each, 2 CPU cores)."""

    faces: synthfaces.SynthFaceConfig = synthfaces.SynthFaceConfig()  # the dataset (and its held-out split)
    train_identities: int = 300  # first identities of the train split used to train embedder and reader
    train_photos: int = 20  # photos 0 .. n-1 of each (many photos per person generalise better than many people)
    eval_identities: int = 200  # identities for the threshold (train split, unseen photos) and the test (held out)
    eval_photos: int = 4  # photos per evaluation identity
    verification_pairs: int = 2000  # same pairs and as many different pairs, for threshold and test each
    embedder_net: ConvNetConfig = ConvNetConfig(
        input_size=32, widths=(32, 64, 128), center_crop=0.6)  # identity embedder: sees the central face region
    embedder_train: TrainConfig = TrainConfig(steps=600, max_shift=4)  # identity embedder optimisation
    margin: float = 0.2  # CosFace margin
    scale: float = 16.0  # CosFace logit scale
    reader_nets: tuple[tuple[str, ConvNetConfig], ...] = tuple(DEFAULT_READER_NETS.items())  # (group, net) pairs
    reader_net: ConvNetConfig | None = None  # if set: one net reads all attributes (replaces reader_nets)
    reader_train: TrainConfig = TrainConfig(steps=400)  # attribute reader optimisation

    def __post_init__(self) -> None:
        if not 2 <= self.train_identities <= self.faces.num_train_identities:
            raise ValueError(f"train_identities must be in [2, faces.num_train_identities="
                             f"{self.faces.num_train_identities}], got {self.train_identities}")
        if not 2 <= self.eval_identities <= min(self.faces.num_heldout_identities, self.train_identities):
            raise ValueError(f"eval_identities must be in [2, min(faces.num_heldout_identities, train_identities)], "
                             f"got {self.eval_identities}")
        if self.train_photos < 2 or self.eval_photos < 2:
            raise ValueError(f"train_photos and eval_photos must be >= 2, got {self.train_photos}, {self.eval_photos}")

    def reader_configs(self) -> dict[str, ConvNetConfig]:
        """The reader nets to train, keyed by attribute group."""
        return {"all": self.reader_net} if self.reader_net is not None else dict(self.reader_nets)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class SynthFaceMetrics:
    """The trained metric models of the synthetic world and how well they did on held-out identities."""

    embedder: IdentityEmbedder  # images -> unit identity embeddings
    reader: AttributeReader  # images -> (N, 4) prompt-attribute class indices
    report: dict[str, Any]  # verification and reader accuracies, threshold, timings


EMBEDDER_FILE = "identity_embedder.safetensors"
READER_FILE = "attribute_reader.safetensors"
REPORT_FILE = "synthface_metrics.json"


def prepare_synthface_metrics(
    out_dir: str, image_size: int | None = None, retrain: bool = False, verbose: bool = True,
    setup: SynthMetricSetup | None = None,
) -> SynthFaceMetrics:
    """Loads the embedder and reader cached in `out_dir`, or trains, checks and caches them.

    A cache is reused only if it was made with the same setup. `image_size` overrides setup.faces.image_size.
    The report (also in out_dir/synthface_metrics.json) holds held-out verification accuracy and per-attribute
    reader accuracy on held-out identities.
    """
    setup = setup or SynthMetricSetup()
    if image_size is not None:
        setup = dataclasses.replace(setup, faces=dataclasses.replace(setup.faces, image_size=image_size))
    log = print if verbose else None
    paths = {name: os.path.join(out_dir, name) for name in (EMBEDDER_FILE, READER_FILE, REPORT_FILE)}
    if not retrain and all(os.path.exists(p) for p in paths.values()):
        with open(paths[REPORT_FILE]) as f:
            report = json.load(f)
        if saved_settings.matches(report.get("setup"), setup):
            if log:
                log(f"synthface metrics: loaded from {out_dir} (held-out verification accuracy "
                    f"{report['verification']['verification_accuracy']:.3f})")
            return SynthFaceMetrics(IdentityEmbedder.load(paths[EMBEDDER_FILE]),
                                    AttributeReader.load(paths[READER_FILE]), report)
        if log:
            log(f"synthface metrics: cache in {out_dir} was made with another setup; retraining")

    timings = {}
    start = time.perf_counter()
    faces = setup.faces
    train_ids = synthfaces.split_identity_ids(faces, "train")
    heldout_ids = synthfaces.split_identity_ids(faces, "heldout")[: setup.eval_identities]
    train_images, train_identities, train_labels = render_photos(
        faces, train_ids[: setup.train_identities], np.arange(setup.train_photos))
    threshold_images, threshold_identities, _ = render_photos(
        faces, train_ids[: setup.eval_identities], setup.train_photos + np.arange(setup.eval_photos))
    test_images, test_identities, test_labels = render_photos(faces, heldout_ids, np.arange(setup.eval_photos))
    timings["render_s"] = time.perf_counter() - start
    if log:
        log(f"synthface metrics: rendered {len(train_images)} train and "
            f"{len(threshold_images) + len(test_images)} evaluation photos in {timings['render_s']:.0f}s")
        log("training the identity embedder")

    start = time.perf_counter()
    embedder = train_identity_embedder(train_images, train_identities, setup.embedder_net, setup.embedder_train,
                                       setup.margin, setup.scale, log)
    timings["embedder_train_s"] = time.perf_counter() - start
    verification = verification_report(embedder, threshold_images, threshold_identities, test_images,
                                       test_identities, setup.verification_pairs, faces.seed)
    embedder.info.update(verification)
    if log:
        log(f"identity embedder: held-out verification accuracy {verification['verification_accuracy']:.3f} "
            f"(threshold {verification['threshold']:.3f} chosen on train identities; "
            f"trained in {timings['embedder_train_s']:.0f}s)")
        log("training the attribute reader")

    start = time.perf_counter()
    reader = train_attribute_reader(train_images, train_labels, setup.reader_configs(), setup.reader_train, log)
    timings["reader_train_s"] = time.perf_counter() - start
    reader_accuracy = evaluation.prompt_accuracy(reader, test_images, test_labels, synthfaces.ATTRIBUTE_NAMES)
    reader.info.update({f"heldout_accuracy_{k}": v for k, v in reader_accuracy.items()})
    analytic_colour = float(np.mean(read_background_colour(test_images) == test_labels[:, 2]))
    if log:
        log("attribute reader accuracy on held-out identities: "
            + ", ".join(f"{k} {v:.3f}" for k, v in reader_accuracy.items())
            + f" (trained in {timings['reader_train_s']:.0f}s); analytic background colour {analytic_colour:.3f}")

    report = {"setup": json.loads(setup.to_json()), "verification": verification,
              "reader_accuracy": reader_accuracy, "analytic_background_colour_accuracy": analytic_colour,
              "timings": timings}
    os.makedirs(out_dir, exist_ok=True)
    embedder.save(paths[EMBEDDER_FILE])
    reader.save(paths[READER_FILE])
    with open(paths[REPORT_FILE], "w") as f:
        json.dump(report, f, indent=2)
    return SynthFaceMetrics(embedder, reader, report)
