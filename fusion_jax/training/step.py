"""The sharded train step: one `jax.jit` with explicit in/out shardings and a donated `TrainState`.

`Trainer` binds a model factory, a loss and a mesh: it splits the model (graphdef + trainable params + the
rest), derives every sharding from `fusion_jax.parallel`'s rules, initialises the state under jit with those
out_shardings (docs/DESIGN.md section 9: optimizer state initialised outside jit can land on one device), and
compiles the step. The step has no host syncs: metrics come back as device arrays; the loop reads them.

Loss contract: `loss_fn(model, batch, rng) -> (scalar loss, dict of scalar aux metrics)`. `batch` is a pytree
whose leaves all have the (global) batch as leading dim; the model sees params cast to train.compute_dtype
('auto' resolved by `fusion_jax.precision`: bfloat16 on GPU / TPU, float32 on CPU).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fusion_jax import precision
from fusion_jax.config import ConfigError, TrainConfig
from fusion_jax.parallel import BATCH_AXES, batch_sharding, tree_shardings
from fusion_jax.training.state import (
    DTYPES,
    LossFn,
    ModelFactory,
    TrainState,
    cast_floating,
    check_trainable,
    make_optimizer,
    trainable_filter,
)


def _tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _split_micro_batches(batch: Any, accum: int, mesh: Mesh) -> Any:
    """(B, ...) -> (accum, B/accum, ...) so that each device keeps its own rows in every micro-batch.

    Rows are taken as (B/accum, accum) then transposed: row r goes to micro-batch r % accum, and the batch
    shards (contiguous row blocks) stay on their devices (a plain reshape to (accum, B/accum) would move
    whole micro-batches onto a few devices).
    """

    def one(x):
        b = x.shape[0]
        x = x.reshape((b // accum, accum) + x.shape[1:])
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, batch)


class Trainer:
    """Model + loss + optimizer + mesh -> sharded init and a compiled train step.

    Args:
      model_factory: `rngs -> nnx.Module`; called under `jax.eval_shape` / `jax.jit`, never eagerly.
      loss_fn: `(model, batch, rng) -> (loss, aux)`.
      cfg: the `train` config section.
      mesh: the device mesh (`parallel.make_mesh`).
      trainable: nnx filter choosing the trained params; default from `cfg.trainable`.
      pretrained: optional pytree of host arrays (e.g. loaded base weights). When given, the factory is called
        as `model_factory(rngs, pretrained)` inside the init jit with these arrays as its *arguments*, so large
        checkpoints are transferred to the devices instead of being baked into the program as constants.
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        loss_fn: LossFn,
        cfg: TrainConfig,
        mesh: Mesh,
        trainable: Optional[Any] = None,
        pretrained: Optional[Any] = None,
    ):
        if cfg.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={cfg.grad_accum}: must be >= 1")
        if cfg.ema_decay is not None and not 0.0 <= cfg.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={cfg.ema_decay}: must be in [0, 1) or None")
        self.cfg = cfg
        self.mesh = mesh
        self.loss_fn = loss_fn
        self.model_factory = model_factory
        self.pretrained = pretrained
        self.trainable = trainable if trainable is not None else trainable_filter(cfg.trainable)
        self.tx, self.schedule = make_optimizer(cfg)

        abstract_pretrained = None if pretrained is None else jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), pretrained)
        abstract_model = nnx.eval_shape(lambda: self._make_model(abstract_pretrained))
        self.graphdef, abstract_params, _ = nnx.split(abstract_model, self.trainable, ...)
        check_trainable(abstract_params, cfg.trainable)

        self.abstract_state = jax.eval_shape(self._init_fn, abstract_pretrained)
        self.state_shardings = tree_shardings(self.abstract_state, mesh)
        self.batch_sharding = batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self._step = jax.jit(
            self._step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )

    # -- state ---------------------------------------------------------------------------------------------

    def _make_model(self, pretrained):
        rngs = nnx.Rngs(self.cfg.seed)
        return self.model_factory(rngs) if self.pretrained is None else self.model_factory(rngs, pretrained)

    def _init_fn(self, pretrained=None) -> TrainState:
        cfg = self.cfg
        model = self._make_model(pretrained)
        _, params, frozen = nnx.split(model, self.trainable, ...)
        params = cast_floating(params, DTYPES[cfg.param_dtype])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=self.tx.init(params),
            ema=cast_floating(params, jnp.float32) if cfg.ema_decay is not None else None,
            rng=jax.random.PRNGKey(cfg.seed + 1),
            skipped=jnp.zeros((), jnp.int32),
        )

    def init(self) -> TrainState:
        """A freshly initialised, sharded state (initialised under jit, directly into its shardings)."""
        return self._init(self.pretrained)

    def abstract_state_for(self, mesh: Mesh) -> Any:
        """ShapeDtypeStructs carrying the shardings of `mesh`: the restore target for another mesh/device count."""
        shardings = tree_shardings(self.abstract_state, mesh)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, shardings
        )

    def model(self, state: TrainState, use_ema: bool = False) -> nnx.Module:
        """The model with the state's params (or EMA params) merged in, e.g. for sampling or export."""
        params = state.params
        if use_ema and state.ema is not None:
            params = cast_floating(state.ema, DTYPES[self.cfg.param_dtype])
        return nnx.merge(self.graphdef, params, state.frozen)

    # -- step ----------------------------------------------------------------------------------------------

    def _loss_and_grads(self, params, frozen, batch, rng):
        compute = precision.compute_dtype(self.cfg.compute_dtype)  # 'auto': the backend's (fusion_jax.precision)
        frozen_c = cast_floating(frozen, compute)

        def loss_of(p, micro, micro_rng):
            model = nnx.merge(self.graphdef, cast_floating(p, compute), frozen_c)
            loss, aux = self.loss_fn(model, micro, micro_rng)
            return loss.astype(jnp.float32), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), aux)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        accum = self.cfg.grad_accum
        if accum == 1:
            (loss, aux), grads = grad_fn(params, batch, rng)
            return loss, aux, grads

        micro_batches = _split_micro_batches(batch, accum, self.mesh)
        (_, aux_shape), grads_shape = jax.eval_shape(
            grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng
        )
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)  # noqa: E731

        def body(carry, xs):
            index, micro = xs
            (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
            loss_sum, aux_sum, grad_sum = carry
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return (loss_sum + loss, jax.tree.map(jnp.add, aux_sum, aux), jax.tree.map(jnp.add, grad_sum, grads)), None

        init = (jnp.zeros((), jnp.float32), zeros(aux_shape), zeros(grads_shape))
        (loss_sum, aux_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro_batches))
        mean = lambda t: jax.tree.map(lambda x: x / accum, t)  # noqa: E731
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
        return loss_sum / accum, mean(aux_sum), grads

    def _step_fn(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, aux, grads = self._loss_and_grads(state.params, state.frozen, batch, rng)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Non-finite grads would poison Adam's moments even if the update were masked afterwards: zero them
        # before the update and keep the old params / optimizer state / EMA when the step is not finite.
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, opt_state = self.tx.update(safe_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = _tree_where(finite, params, state.params)
        opt_state = _tree_where(finite, opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            decay = self.cfg.ema_decay
            new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
            ema = _tree_where(finite, new_ema, ema)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        applied = state.step - state.skipped  # updates applied before this one = the schedule's position
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(self.schedule(applied), jnp.float32),
            "skipped_steps": skipped,
            "finite": finite.astype(jnp.int32),
            **{f"aux/{k}": v for k, v in aux.items()},
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema=ema, skipped=skipped
        )
        return new_state, metrics

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (donates `state`). `batch` leaves: global arrays or host arrays (device_put)."""
        return self._step(state, batch)

    def lower(self, batch_shapes: Any):
        """`jax.jit(...).lower` of the step for abstract batch shapes (benchmarks: FLOPs, compile time)."""
        batch_abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_sharding), batch_shapes
        )
        state_abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )
        return self._step.lower(state_abstract, batch_abstract)
