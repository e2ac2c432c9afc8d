"""Device mesh, the logical axis rules, and the shardings of params, optimizer state and batches.

Everything about *where* arrays live is decided here, in two tables:

  PARAM_AXIS_RULES    regex on a parameter's path string -> logical axis name per dimension
  LOGICAL_TO_MESH     logical axis name -> mesh axis (or axes)

e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel` (an nnx.Linear kernel, (in, out))
-> ('embed', 'heads') -> P('fsdp', 'tensor'): FSDP over the input dim, tensor parallelism over heads.
Optimizer state (Adam mu / nu, EMA) has the same path suffix as its param, so the same rules shard it.
A dimension its mesh axes do not divide is replicated instead (tiny test models, odd channel counts).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fusion_jax.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes a batch dimension is split over.
BATCH_AXES = ("data", "fsdp")

MeshAxes = Union[None, str, tuple[str, ...]]

# Logical axis name -> mesh axes. Parameter names: embed (model width; FSDP-sharded), heads / mlp (width of
# attention projections / feed-forward; tensor-parallel), conv_out (conv output channels; FSDP-sharded).
# Activation names: batch (split over data and fsdp), act_heads / act_mlp (tensor-parallel), the rest local.
LOGICAL_TO_MESH: dict[str, MeshAxes] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "conv_in": None,
    "conv_out": "fsdp",
    "vocab": "tensor",
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_height": None,
    "act_width": None,
    "act_channels": None,
}

_LINEAR_IN = ("embed", "heads")  # (in, out) kernel of a projection that widens into heads
_LINEAR_OUT = ("heads", "embed")  # (in, out) kernel of a projection back into the residual stream
_CONV = (None, None, "conv_in", "conv_out")  # nnx.Conv kernel (kh, kw, in, out)
_ATTN = r"attn\d*|attention|self_attn|ref_attn"

# Regex (searched in the path string) -> logical axes per dimension. The FIRST matching rule wins; the rank
# must match too (a rule for 2-D kernels never applies to a 4-D conv kernel of the same name).
PARAM_AXIS_RULES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    # Biases, norm scales/offsets, scalars: replicated (small; sharding them only adds collectives).
    (r"(^|\.)(bias|scale|embedding_scale)$", ()),
    # Attention: q/k/v (and Face Fusion's to_k_ref / to_v_ref, FlashFace's ref attention) widen into heads.
    (rf"({_ATTN})\.(to_q|to_k|to_v|to_k_ref|to_v_ref|to_q_ref|q_proj|k_proj|v_proj)\.kernel$", _LINEAR_IN),
    (rf"({_ATTN})\.(to_out\.0|to_out_ref\.0|out_proj)\.kernel$", _LINEAR_OUT),
    # Feed-forward: GEGLU in (embed -> 2*mlp), out (mlp -> embed); CLIP MLP fc1 / fc2.
    (r"ff\.net\.0\.proj\.kernel$", ("embed", "mlp")),
    (r"ff\.net\.2\.kernel$", ("mlp", "embed")),
    (r"mlp\.fc1\.kernel$", ("embed", "mlp")),
    (r"mlp\.fc2\.kernel$", ("mlp", "embed")),
    # Timestep / class embeddings: linear_1 widens, linear_2 maps back.
    (r"(time_embedding|add_embedding)\.linear_1\.kernel$", ("embed", "mlp")),
    (r"(time_embedding|add_embedding)\.linear_2\.kernel$", ("mlp", "embed")),
    # Token / position embedding tables (CLIP).
    (r"(token_embedding|position_embedding)\.embedding$", ("vocab", "embed")),
    # Every conv kernel (conv_in, resnets.*.conv1/conv2/conv_shortcut, down/upsamplers, conv_out, proj_in 1x1).
    (r"\.?kernel$", _CONV),
    # Any other linear kernel (proj_in / proj_out with linear projection, time_emb_proj, identity modules).
    (r"\.?kernel$", ("embed", None)),
)


# ----------------------------------------------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------------------------------------------


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 filled in; errors name the problem before anything compiles."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    named = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {named}")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size}: sizes must be positive (or -1 for 'the rest')")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh ({named}): the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} available devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh ({named}) has {math.prod(sizes)} devices but {num_devices} are available: "
            "the axis sizes must multiply to the device count (use -1 for one axis to fill it in)"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (classic GSPMD propagation; see docs/DESIGN.md section 9)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def single_device_mesh(device: Optional[jax.Device] = None) -> Mesh:
    """A (1, 1, 1) mesh on one device: the unsharded reference run, or a restore onto one device."""
    device = device or jax.devices()[0]
    return jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=[device])


# ----------------------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec.
# ----------------------------------------------------------------------------------------------------------------


def path_to_str(keypath: Sequence[Any]) -> str:
    """A jax key path as a dotted string, e.g. `down_blocks.0.attentions.0.to_q.kernel` (drops `.value`)."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":  # nnx.Variable leaves
        parts.pop()
    return ".".join(parts)


def logical_axes_for_param(path: str, ndim: int) -> tuple[Optional[str], ...]:
    """Logical axis names for a parameter (or optimizer-state leaf) from `PARAM_AXIS_RULES`."""
    if ndim == 0:
        return ()
    for pattern, axes in PARAM_AXIS_RULES:
        if re.search(pattern, path) and (len(axes) == ndim or axes == ()):
            return axes if axes else (None,) * ndim
    return (None,) * ndim


def logical_to_spec(
    logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh
) -> P:
    """PartitionSpec for `shape`; a dim whose mesh axes do not divide it (or are used already) is replicated."""
    spec: list[MeshAxes] = []
    used: set[str] = set()
    for name, dim in zip(logical_axes, shape):
        axes = LOGICAL_TO_MESH.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_TO_MESH:
            raise KeyError(f"logical axis '{name}' has no entry in parallel.LOGICAL_TO_MESH")
        if axes is None:
            spec.append(None)
            continue
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_tuple = tuple(a for a in axes_tuple if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes_tuple)
        if not axes_tuple or dim % size:
            spec.append(None)
            continue
        used.update(axes_tuple)
        spec.append(axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of one parameter from its path string and shape."""
    return logical_to_spec(logical_axes_for_param(path, len(shape)), shape, mesh)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of `tree` (params, optimizer state, EMA, a whole train state).

    Leaves are matched to the rules by their path string, so optimizer-state leaves (`opt_state.0.mu.<param
    path>`) get their param's sharding; scalars (step counters) are replicated. Works on abstract trees
    (`jax.eval_shape` results) so shardings exist before anything is allocated.
    """

    def one(keypath, leaf):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(path_to_str(keypath), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


param_shardings = tree_shardings


def describe_shardings(tree: Any, mesh: Mesh) -> list[tuple[str, tuple[int, ...], P]]:
    """(path, shape, spec) per leaf: for logs and for checking the rules against a real model."""
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = path_to_str(keypath)
        out.append((path, tuple(leaf.shape), param_spec(path, leaf.shape, mesh)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Batches and activations.
# ----------------------------------------------------------------------------------------------------------------


def batch_size_divisor(mesh: Mesh) -> int:
    """A global batch must be a multiple of this (the number of batch shards)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim split over (data, fsdp); other dims replicated."""
    del ndim
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """`batch_sharding` for every leaf of a batch pytree (scalars replicated)."""
    return jax.tree.map(
        lambda x: batch_sharding(mesh) if np.ndim(x) else NamedSharding(mesh, P()), batch
    )


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1, key: str = "data.batch_size") -> None:
    """Clear error when the global batch cannot be split over the batch shards and micro-batches."""
    shards = batch_size_divisor(mesh)
    if batch_size % (shards * grad_accum):
        raise ConfigError(
            f"{key}={batch_size} must be a multiple of (data x fsdp) x train.grad_accum = "
            f"{shards} x {grad_accum} = {shards * grad_accum}"
        )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host batch (numpy, this process's rows) -> global jax arrays sharded over (data, fsdp).

    On one process this is a device_put; on many, each process passes its own rows and
    `jax.make_array_from_process_local_data` assembles the global array.
    """
    shardings = batch_shardings(batch, mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[Optional[str]], mesh: Optional[Mesh] = None):
    """`jax.lax.with_sharding_constraint` by logical names (for activations inside models); no-op without mesh."""
    mesh = mesh or _current_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh)))


def _current_mesh() -> Optional[Mesh]:
    try:
        mesh = jax.sharding.get_abstract_mesh()
    except Exception:  # pragma: no cover - older jax
        return None
    if mesh is None or mesh.empty:
        return None
    return mesh  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Multi-host.
# ----------------------------------------------------------------------------------------------------------------

# Environment variables that mean "this is one process of a multi-process job".
_DISTRIBUTED_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit: with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    "FUSION_JAX_DISTRIBUTED",  # explicit opt-in (=1); jax auto-detects the cluster (TPU pod, SLURM, ...)
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "TPU_WORKER_HOSTNAMES",  # TPU pod slice VM (set on every worker)
)


def distributed_requested(mode: str = "auto", environ: Optional[dict] = None) -> bool:
    """True when `jax.distributed.initialize()` should run: mode 'on', or 'auto' with a multi-host env."""
    environ = os.environ if environ is None else environ
    if mode == "on":
        return True
    if mode == "off":
        return False
    if environ.get("FUSION_JAX_DISTRIBUTED", "") == "0":
        return False
    if any(environ.get(k) for k in _DISTRIBUTED_ENV):
        # A single-host TPU VM also sets TPU_WORKER_HOSTNAMES (to one host): only >1 host counts.
        hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
        if hosts and not any(environ.get(k) for k in _DISTRIBUTED_ENV if k != "TPU_WORKER_HOSTNAMES"):
            return len([h for h in hosts.split(",") if h]) > 1
        return True
    # SLURM with more than one task.
    return int(environ.get("SLURM_NTASKS", "1") or 1) > 1


_initialized = False


def _backend_initialized() -> bool:
    """Whether an XLA backend exists already (then `jax.distributed.initialize()` can no longer run)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of jax changed
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` once when `distributed_requested(mode)`; returns whether it did.

    Must run before anything touches devices: entry points call it right after reading the config and
    before building models or data (`train/train.py`, `python -m fusion_jax.training`); `train()` calls it
    again (a no-op then). Coordinator address, process count and id come from the environment
    (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) or jax's cluster auto-detection (TPU pod,
    SLURM). On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`): without
    it a multi-process CPU job has no all-reduce (tests run 2 processes x 4 fake CPU devices this way).
    """
    global _initialized
    if _initialized or not distributed_requested(mode):
        return False
    if _backend_initialized():
        raise RuntimeError(
            f"distributed={mode}: jax.distributed.initialize() must run before any JAX call that creates the "
            "XLA backend (jax.devices(), an array, a jit), but something already did. Call "
            "fusion_jax.parallel.maybe_initialize_distributed(config.distributed) first in the entry point, "
            "before building the experiment (train/train.py does)."
        )
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True
