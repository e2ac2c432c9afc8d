"""The train state pytree, the optimizer built from `TrainConfig`, and the `train.trainable` selector.

The model is split once into a static graphdef and two states: the trainable params (which get gradients,
optimizer state and EMA) and everything else (`frozen`: frozen params and any other variables). Only the
`TrainState` crosses the jit boundary, so its shardings are explicit and it can be donated and checkpointed.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fusion_jax.config import ConfigError, TrainConfig
from fusion_jax.parallel import path_to_str

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all of it is checkpointed).

    `frozen` holds the non-trainable variables. They never change, but are saved too, so a checkpoint is
    self-contained (export and sampling need no base checkpoint); for a frozen SD UNet that is ~3.4 GB in
    float32 per checkpoint, written once per save like the rest.
    """

    step: jax.Array  # int32 scalar: optimizer steps taken (including skipped ones)
    params: nnx.State  # trainable params in train.param_dtype (the fp32 master weights by default)
    frozen: nnx.State  # all other model variables (frozen params, buffers)
    opt_state: Any  # optax state for `params` only
    ema: Optional[nnx.State]  # EMA of `params` in float32 (None when train.ema_decay is None)
    rng: jax.Array  # uint32[2] base PRNG key; step s uses fold_in(rng, s), so resume reproduces exactly
    skipped: jax.Array  # int32 scalar: steps whose update was skipped (non-finite loss or gradient)


def trainable_filter(selector: str) -> Any:
    """`train.trainable` -> nnx filter: 'all' = every nnx.Param; else a regex searched in the param path."""
    if selector in ("all", "", "*"):
        return nnx.Param
    try:
        pattern = re.compile(selector)
    except re.error as e:
        raise ConfigError(f"train.trainable={selector!r} is not a valid regex: {e}") from None

    def selected(path, value) -> bool:
        return isinstance(value, nnx.Param) and bool(pattern.search(".".join(str(p) for p in path)))

    return selected


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * final_lr_ratio` (or constant)."""
    warmup = max(cfg.warmup_steps, 0)
    if cfg.cosine:
        end = cfg.lr * cfg.final_lr_ratio
        if warmup:
            # decay_steps counts the warmup too: the schedule reaches `end` at train.steps.
            return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end)
        return optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1), alpha=cfg.final_lr_ratio)
    if warmup:
        return optax.linear_schedule(0.0, cfg.lr, warmup)
    return optax.constant_schedule(cfg.lr)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices / conv kernels only (not biases, norm scales, scalars)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW with the warmup + cosine schedule."""
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=DTYPES[cfg.mu_dtype] if cfg.mu_dtype else None,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts the floating-point leaves of `tree` to `dtype` (integer leaves, e.g. counters, untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def state_paths(tree: Any) -> list[str]:
    """Dotted path of every leaf (for tests and logs)."""
    return [path_to_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_trainable(params: nnx.State, selector: str) -> None:
    """Error when `train.trainable` selects nothing (a typo would otherwise train nothing, silently)."""
    if not jax.tree.leaves(params):
        raise ConfigError(f"train.trainable={selector!r} selects no parameters of the model")


ModelFactory = Callable[[nnx.Rngs], nnx.Module]
LossFn = Callable[[nnx.Module, Any, jax.Array], "tuple[jax.Array, dict[str, jax.Array]]"]
FilterLike = Union[str, Any]


def remat_policy(name: str) -> Optional[Callable[..., Any]]:
    """`train.remat` -> its `jax.checkpoint` policy (`fusion_jax.models.remat.REMAT_POLICIES`; the experiment sets
    the name on the UNet's blocks with `set_remat(unet, name)`).

    'none' -> None (no remat); 'full' -> save nothing (recompute the whole block in the backward pass);
    'dots_saveable' / 'dots_with_no_batch_dims_saveable' -> keep matmul outputs (docs/DESIGN.md section 9: the
    latter cut one SD block's saved activations from 1359 MiB to 80 MiB).
    """
    from fusion_jax.models.remat import REMAT_POLICIES  # the table the UNet blocks use

    if name not in REMAT_POLICIES:
        raise ConfigError(f"train.remat={name!r}: expected one of {list(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def maybe_remat(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`jax.checkpoint(fn, policy=...)` per `train.remat`, or `fn` unchanged for 'none'."""
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(name))
